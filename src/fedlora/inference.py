"""Using a finished run's adapter: classify text, generate from an instruction, export a merged model.

Every function loads the adapter the way a user would — PEFT's ``PeftModel.from_pretrained`` on the run's base model,
with the run's pooling (:func:`fedlora.models.load_adapter`) — so what they print is what any PEFT user of the
adapter gets.  ``run`` is a run directory, its ``adapter/`` folder or any fedlora adapter folder; ``client=K``
picks client K's personal adapter (``personal/client-K``) of a personalised method (FedSA-LoRA).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fedlora.errors import ConfigError, DataError
from fedlora.lora import ADAPTER_INFO


def adapter_folder(run: str | Path, client: int | None = None) -> Path:
    """The PEFT folder of ``run`` (global adapter, or client ``client``'s personal one); checked, not loaded."""
    path = Path(run).expanduser()
    if not path.exists():
        raise ConfigError(f"{run}: no such run directory or adapter folder")
    if client is not None:
        root = path.parent if path.name == "adapter" else path
        folder = root / "personal" / f"client-{client}"
        if not (folder / "adapter_config.json").is_file():
            kept = sorted((root / "personal").glob("client-*"), key=lambda p: int(p.name.split("-")[1])) \
                if (root / "personal").is_dir() else []
            have = ", ".join(p.name.split("-")[1] for p in kept[:20]) or "none (its method keeps no personal part)"
            raise ConfigError(f"{run} has no personal adapter for client {client}; clients with one: {have}")
        return folder
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "config.toml").is_file():
        raise ConfigError(f"{run} is a run directory without an exported adapter (the run did not finish: continue it "
                          f"with `fedlora run --resume {run}`)")
    raise ConfigError(f"{run} is neither a fedlora run directory nor an adapter folder (no adapter_config.json)")


def adapter_metadata(folder: Path) -> dict:
    """``fedlora.json`` of an adapter folder (what PEFT's files cannot say), with defaults for older folders."""
    from fedlora.tasks import TASKS

    info_file = folder / ADAPTER_INFO
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    if "task" not in info:  # a folder from before fedlora.json said it: the task whose PEFT type it has
        peft = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        info["task"] = next((n for n, c in TASKS.items() if c.task_type == peft.get("task_type")), "classification")
    info.setdefault("max_length", 128)
    info.setdefault("columns", dict(TASKS[info["task"]].default_columns))
    return info


def _expect(info: dict, command: str) -> None:
    """Refuse ``command`` (predict / generate) for an adapter of a task that is used by the other one."""
    from fedlora.tasks import TASKS

    use = TASKS[info["task"]].use_command
    if use != command:
        wanted = next(n for n, c in TASKS.items() if c.use_command == command)
        raise ConfigError(f"`{command}` needs {_a(wanted)} adapter; this one is {_a(info['task'])} adapter: use "
                          f"`fedlora {use}`")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# ---------------------------------------------------------------------------------------------------- predict
def predict(run: str | Path, inputs: Iterable, *, client: int | None = None, base_model: str | None = None,
            batch_size: int = 32) -> list[dict]:
    """Classify each input with the run's adapter: ``[{"label": ..., "probabilities": {label: p}}]``.

    An input is a text, a ``(text, text_pair)`` pair for sentence-pair tasks, or a row (dict) with the run's own
    column names (``data.text_column`` / ``data.text_pair_column``, recorded in the adapter folder)."""
    folder = adapter_folder(run, client)
    info = adapter_metadata(folder)
    _expect(info, "predict")
    texts, pairs = _classification_inputs(list(inputs), info)
    from fedlora.models import load_adapter

    tokenizer, model = load_adapter(folder, base_model=base_model)
    labels = info.get("labels") or [str(i) for i in range(model.config.num_labels)]
    enc = tokenizer(texts, pairs, truncation=True, max_length=int(info["max_length"]))
    out: list[dict] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            stop = start + batch_size
            batch = tokenizer.pad({k: v[start:stop] for k, v in enc.items()}, return_tensors="pt")
            probs = torch.softmax(model(**batch).logits.float(), dim=-1)
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                out.append({"label": labels[best], "probabilities": dict(zip(labels, row))})
    return out


def _classification_inputs(items: list, info: dict) -> tuple[list[str], list[str] | None]:
    if not items:
        raise DataError("nothing to predict: give at least one text")
    cols = info["columns"]
    pair_col = cols.get("text_pair") or ""
    texts, pairs = [], []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            missing = [c for c in (cols["text"], pair_col) if c and c not in item]
            if missing:
                raise DataError(f"input row {i} has no column {missing[0]!r} (columns: {', '.join(map(str, item))});"
                                f" this run reads {cols['text']!r}" + (f" and {pair_col!r}" if pair_col else ""))
            item = (item[cols["text"]], item[pair_col]) if pair_col else item[cols["text"]]
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise DataError(f"input {i}: a sentence pair has two texts, got {len(item)}")
            text, pair = item
        else:
            text, pair = item, None
        if not isinstance(text, str) or not text.strip() or (pair is not None and (not isinstance(pair, str)
                                                                                   or not pair.strip())):
            raise DataError(f"input {i} is empty or not text: {item!r}")
        if bool(pair_col) != (pair is not None):
            raise DataError(f"input {i}: this adapter was trained on "
                            + (f"sentence pairs ({cols['text']!r}, {pair_col!r}): give two texts"
                               if pair_col else f"single texts ({cols['text']!r}): give one text"))
        texts.append(text)
        pairs.append(pair)
    return texts, (pairs if pair_col else None)


# ---------------------------------------------------------------------------------------------------- generate
def generate(run: str | Path, inputs: Iterable, *, client: int | None = None, base_model: str | None = None,
             max_new_tokens: int = 64) -> list[str]:
    """Greedy generation from an instruction run's adapter, one response per input.

    An input is an instruction, an ``(instruction, input)`` pair, or a row with the run's own column names
    (``data.instruction_column`` / ``data.input_column``).  The prompt is built exactly as in training (the Alpaca
    template, truncated to ``model.max_length`` the same way); generation stops at the end-of-sequence token."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    folder = adapter_folder(run, client)
    info = adapter_metadata(folder)
    _expect(info, "generate")
    rows = _instruction_rows(list(inputs), info)
    from fedlora.data.instruction import InstructionTask
    from fedlora.models import load_adapter

    tokenizer, model = load_adapter(folder, base_model=base_model)
    examples = InstructionTask.prompts_only(info["columns"]).tokenise(tokenizer, rows, int(info["max_length"]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    with torch.no_grad():
        for prompt in examples.prompt_ids:  # one at a time: no padding, so no position can differ from training
            ids = torch.tensor([prompt], dtype=torch.long)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            new = gen[0, len(prompt):].tolist()
            out.append(tokenizer.decode(new[:new.index(eos)] if eos in new else new, skip_special_tokens=True))
    return out


def _instruction_rows(items: list, info: dict) -> list[dict]:
    if not items:
        raise DataError("nothing to generate from: give at least one instruction")
    cols = info["columns"]
    rows = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            if cols["instruction"] not in item:
                raise DataError(f"input row {i} has no column {cols['instruction']!r} (columns: "
                                f"{', '.join(map(str, item))}); this run reads {cols['instruction']!r}"
                                + (f" and {cols['input']!r}" if cols.get("input") else ""))
            instruction, extra = item[cols["instruction"]], item.get(cols.get("input") or "", "") or ""
        elif isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise DataError(f"input {i}: give an instruction and at most one input, got {len(item)} texts")
            instruction, extra = item
        else:
            instruction, extra = item, ""
        if not isinstance(instruction, str) or not instruction.strip() or not isinstance(extra, str):
            raise DataError(f"input {i} is empty or not text: {item!r}")
        rows.append({cols["instruction"]: instruction, cols.get("input") or "input": extra, cols["output"]: ""})
    return rows


# ---------------------------------------------------------------------------------------------------- export
MERGED_POOLING_MODULE = "fedlora_pooling.py"


def export_merged(run: str | Path, out: str | Path, *, client: int | None = None,
                  base_model: str | None = None) -> Path:
    """Merge the adapter into its base model (PEFT's ``merge_and_unload``) and save a plain transformers model with
    its tokenizer in ``out``: ``AutoModelFor....from_pretrained(out)`` needs neither PEFT nor fedlora.

    A classifier that pools differently from its architecture's own head (``model.pooling = mean | cls``, the
    bundled MiniLM's default) cannot be expressed by the stock class: the folder then also holds a small
    ``fedlora_pooling.py`` named in ``config.json``'s ``auto_map``, and
    ``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)`` gives the run's exact
    predictions (without ``trust_remote_code`` transformers would read a randomly initialised pooler)."""
    folder = adapter_folder(run, client)
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; choose a new --out")
    info = adapter_metadata(folder)
    from fedlora.models import load_adapter

    tokenizer, model = load_adapter(folder, base_model=base_model)
    merged = model.merge_and_unload()
    pooling = getattr(merged.config, "fedlora_pooling", "pooler")
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    if pooling != "pooler":  # a classifier pooled unlike its architecture's own head
        _write_pooling_module(target, type(merged))
    (target / "fedlora.json").write_text(json.dumps({**info, "merged_from": str(folder.resolve())}, indent=1) + "\n",
                                         encoding="utf-8")
    return target


def _write_pooling_module(target: Path, cls: type) -> None:
    """``fedlora_pooling.py`` + ``auto_map``: the architecture's own class with fedlora's pooler in place of its own."""
    from fedlora import pooling

    source = Path(pooling.__file__).read_text(encoding="utf-8")
    start, end = source.index("class _MaskedPooler"), source.index("def sentence_transformers_pooling")
    module = (
        '"""Written by `fedlora export --merged`: the model class of this folder with the pooling it was trained\n'
        'with (config.fedlora_pooling). Load with AutoModelForSequenceClassification.from_pretrained(folder,\n'
        'trust_remote_code=True)."""\n'
        "from __future__ import annotations\n\nimport torch\nfrom torch import Tensor, nn\n"
        f"from {cls.__module__} import {cls.__name__} as _Base\n\n\n"
        + source[start:end].rstrip() + "\n\n\n"
        f"class Fedlora{cls.__name__}(_Base):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        encoder = getattr(self, self.base_model_prefix)\n"
        "        pooler = _MaskedPooler(config.fedlora_pooling)\n"
        "        encoder.pooler = pooler\n\n"
        "        def keep_mask(module, args, kwargs):\n"
        "            mask = kwargs.get('attention_mask')\n"
        "            pooler.mask = mask if mask is not None or len(args) < 2 else args[1]\n\n"
        "        encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)\n")
    (target / MERGED_POOLING_MODULE).write_text(module, encoding="utf-8")
    config_file = target / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModelForSequenceClassification": f"fedlora_pooling.Fedlora{cls.__name__}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines input file for ``predict`` / ``generate`` (one object per line; blank lines skipped)."""
    from fedlora.report import json_object_lines

    if not Path(path).is_file():
        raise DataError(f"input file not found: {path}")
    rows = json_object_lines(Path(path), " (one JSON object per line, with the run's column names)")
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def write_jsonl(rows: Sequence[dict], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)


__all__ = ["predict", "generate", "export_merged", "adapter_folder", "read_jsonl", "write_jsonl"]

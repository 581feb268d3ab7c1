"""LoRA on a shared frozen base model through PEFT, and the one place that converts to and from PEFT: which linear
modules LoRA wraps and their shapes, PEFT's ``LoraConfig`` with per-module ranks and alphas, one named adapter per
rank configuration (:class:`AdapterPool`), our flat keys onto the PEFT model's parameters (:class:`LoraSlots`), and
the exported adapter folder (:func:`export_peft_adapter`, ``fedlora.json``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora.adapters import (A_SUFFIX, B_SUFFIX, PEFT_PREFIX, R_SUFFIX, ROLE_HEAD, Adapter, LoraModule, module_of,
                              role_of)
from fedlora.errors import ModelError, UpdateError


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


class CoreLinear(nn.Linear):
    """A LoRA ``lora_B`` layer with an ``r × r`` core before it: ``x ↦ B·(R·x)`` (LoRA-SB's ``ΔW = s·B·R·A``; Ponkshe
    et al., arXiv 2411.19557).  PEFT has no such layer; this one takes the place of the adapter's ``lora_B`` module,
    so PEFT's forward (``lora_B(lora_A(dropout(x))) · s``) computes it unchanged.  ``weight`` is B; the core is a
    plain ``nn.Linear`` child (``core``), which Opacus gives per-example gradients like any linear layer.  PEFT's own
    merge reads B alone, so a model with cores is never merged: the exported adapter folds each core into B
    (:meth:`fedlora.adapters.Adapter.folded`)."""

    def __init__(self, b: nn.Linear):
        super().__init__(b.in_features, b.out_features, bias=False, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(b.weight)
        r = b.in_features
        self.core = nn.Linear(r, r, bias=False, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            self.core.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.core(x), self.weight)


def add_lora_cores(peft_model) -> None:
    """Give every LoRA module of ``peft_model``'s ``default`` adapter an ``r × r`` core (R = 0) between A and B
    (:class:`CoreLinear`); frozen, like every parameter until a client's plan makes it trainable."""
    found = False
    for module in peft_model.modules():
        lora_B = getattr(module, "lora_B", None)
        if isinstance(lora_B, nn.ModuleDict) and "default" in lora_B and not isinstance(lora_B["default"], CoreLinear):
            lora_B["default"] = CoreLinear(lora_B["default"])
            found = True
    if not found:
        raise ModelError("the PEFT model has no LoRA modules to give a core")
    for p in peft_model.parameters():
        p.requires_grad_(False)


def _adapter_of(pname: str) -> str:
    """The adapter a LoRA parameter belongs to: the name after ``lora_A.`` / ``lora_B.`` (a core's parameter,
    ``lora_B.<adapter>.core.weight``, belongs to its B's adapter)."""
    for part in (".lora_A.", ".lora_B."):
        if part in pname:
            return pname.split(part, 1)[1].split(".", 1)[0]
    raise KeyError(pname)


class AdapterPool:
    """One frozen base model, several named PEFT adapters: one per rank configuration in use.

    Clients with different ranks (FlexLoRA, HetLoRA) need LoRA layers of different shapes.  Rather than resizing one
    adapter in place (the source of the released FlexLoRA code's defect, docs/methods.md §9), each distinct
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
                self._shapes = {k: v for k, v in self._shapes.items() if _adapter_of(k) != gone}
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
            adapter = _adapter_of(pname)
            if adapter == active:
                if p.numel() == 0 and pname in self._shapes:
                    p.data = torch.zeros(self._shapes.pop(pname), dtype=p.dtype, device=p.device)
            elif p.numel() > 0:
                self._shapes[pname] = tuple(p.shape)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def peft_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors under the keys ``peft.get_peft_model_state_dict`` returns (adapter name stripped)."""
    return {PEFT_PREFIX + k: v for k, v in adapter.to_flat().items()}


def adapter_from_peft_state_dict(state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | float) -> Adapter:
    """Inverse of :func:`peft_state_dict`; ``alphas`` gives alpha per module (or one value for all).  A module missing
    a factor, or whose factors disagree on the rank, is an :class:`UpdateError`."""
    flat = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state_dict.items()}
    names = sorted({module_of(k) for k in flat if role_of(k) != ROLE_HEAD})
    modules = {}
    for name in names:
        a, b = flat.get(name + A_SUFFIX), flat.get(name + B_SUFFIX)
        if a is None or b is None:
            raise UpdateError(f"module {name!r} lacks its {'lora_A' if a is None else 'lora_B'} tensor")
        if a.shape[0] != b.shape[1]:
            raise UpdateError(f"module {name!r}: A has rank {a.shape[0]} but B has rank {b.shape[1]}")
        alpha = alphas if isinstance(alphas, (int, float)) else alphas[name]
        core = flat.get(name + R_SUFFIX)
        if core is not None and tuple(core.shape) != (a.shape[0], a.shape[0]):
            raise UpdateError(f"module {name!r}: its core has shape {tuple(core.shape)}, expected {a.shape[0]}x{a.shape[0]}")
        modules[name] = LoraModule(a.clone(), b.clone(), float(alpha), None if core is None else core.clone())
    head = {k: v.clone() for k, v in flat.items() if role_of(k) == ROLE_HEAD}
    return Adapter(modules, head)


def export_peft_adapter(adapter: Adapter, lora_cfg, task_type: str, base_model_path: str, out_dir: Path) -> None:
    """Write ``adapter`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) with
    per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``), loadable by ``PeftModel.from_pretrained``.
    Cores (LoRA-SB's R) are folded into B first: the same update in the form PEFT loads."""
    from safetensors.torch import save_file

    adapter = adapter.folded()
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: m.alpha for n, m in adapter.modules.items()}
    config = _lora_config(lora_cfg, task_type, ranks, alphas)
    config.base_model_name_or_path = base_model_path
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {k: v.detach().contiguous().float() for k, v in peft_state_dict(adapter).items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


ADAPTER_INFO = "fedlora.json"  # written beside adapter_config.json: what PEFT's own files cannot say


def save_default_adapter(peft_model, out_dir: Path) -> None:
    """The model's ``default`` LoRA adapter (as loaded in its slots) as a PEFT folder, by PEFT's ``save_pretrained``."""
    peft_model.save_pretrained(str(out_dir), selected_adapters=["default"])


def load_peft_adapter(base_model: nn.Module, folder: Path):
    """A saved PEFT adapter folder on ``base_model`` (PEFT's ``PeftModel.from_pretrained``), in eval mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(folder))
    model.eval()
    return model


def adapter_info(model, cfg, label_names: list | None, columns: dict | None = None) -> dict:
    """What a loader needs beyond PEFT's files to rebuild the run's exact model: the pooling (a stock
    ``AutoModelForSequenceClassification`` classifies from BERT's pooler), the labels in order, task and method."""
    from fedlora import __version__

    info = {"fedlora_version": __version__, "task": cfg.data.task, "method": cfg.method, "base_model": cfg.model.name,
            "max_length": cfg.model.max_length}
    if columns is not None:  # what `fedlora predict/generate --file` reads (the task's recorded_columns)
        info["columns"] = columns
    if label_names is not None:  # a classifier (a causal LM has no labels)
        base = getattr(model, "base_model", model)
        config = getattr(getattr(base, "model", base), "config", None)
        info["pooling"] = getattr(config, "fedlora_pooling", "pooler")
        info["labels"] = [str(v) for v in (label_names or [])]
    return info


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
            if f".lora_B.{a}.core." in name:  # a core (CoreLinear): flat key <module>.lora_R.weight
                key = name.replace(f".lora_B.{a}.core.weight", R_SUFFIX)
            elif f".lora_A.{a}." in name or f".lora_B.{a}." in name:
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

    def standalone(self, adapter: Adapter) -> "LoraSlots":
        """Slots of the same keys, shapes and dtypes that are tensors of their own (not the model's), holding
        ``adapter``: a client trained in a group (:mod:`fedlora.client_group`) keeps its factors here."""
        own = LoraSlots({k: nn.Parameter(torch.empty_like(p), requires_grad=False) for k, p in self.params.items()},
                        dict(self.shapes), dict(self.alphas))
        own.load(adapter)
        return own

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
            modules[name] = LoraModule(flat[name + A_SUFFIX], flat[name + B_SUFFIX], self.alphas[name],
                                       flat.get(name + R_SUFFIX))
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

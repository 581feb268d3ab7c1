"""One server-side representation of a LoRA adapter (what methods compute with; :mod:`fedlora.lora` converts it
to and from PEFT).

Per target module we keep the factors ``A (r × d_in)`` and ``B (d_out × r)`` and ``alpha``; the update the module
adds to its frozen weight is ``ΔW = s·B·A`` with ``s = alpha / r`` (Hu et al., ICLR 2022; docs/methods.md §1).
Task-head tensors (for example a sequence classifier trained through PEFT's ``modules_to_save``) travel beside the
factors.  A module may also carry an ``r × r`` *core* ``R`` between the factors (LoRA-SB, Fed-SB):
``ΔW = s·B·R·A``; PEFT has no such layer, so an exported adapter folds it into B (:meth:`Adapter.folded`).

*Flat keys* are PEFT's adapter state-dict keys without the ``base_model.model.`` prefix:
``bert.encoder.layer.0.attention.self.query.lora_A.weight`` and ``classifier.weight``.  They are the names used on
the wire and by every method.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.errors import UpdateError

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
R_SUFFIX = ".lora_R.weight"

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_R = "lora_R"
ROLE_HEAD = "head"
ROLES = (ROLE_A, ROLE_B, ROLE_R, ROLE_HEAD)


def role_of(key: str) -> str:
    """The role of a flat key: ``lora_A``, ``lora_B``, ``lora_R`` (a core) or ``head``."""
    if key.endswith(A_SUFFIX):
        return ROLE_A
    if key.endswith(B_SUFFIX):
        return ROLE_B
    if key.endswith(R_SUFFIX):
        return ROLE_R
    return ROLE_HEAD


def module_of(key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX, R_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"{key} is not a LoRA factor key")


@dataclass
class LoraModule:
    """The LoRA factors of one target module: ``ΔW = (alpha / r) · B @ A``, or ``(alpha / r) · B @ R @ A`` with an
    ``r × r`` core ``R`` (LoRA-SB's trainable matrix; None = no core)."""

    A: Tensor
    B: Tensor
    alpha: float
    R: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        B = self.B if self.R is None else self.B @ self.R
        return self.scale * (B @ self.A)

    def clone(self) -> "LoraModule":
        return LoraModule(self.A.clone(), self.B.clone(), self.alpha, None if self.R is None else self.R.clone())


@dataclass
class Adapter:
    """A LoRA adapter: factors per target module plus task-head tensors, keyed by module path."""

    modules: dict[str, LoraModule]
    head: dict[str, Tensor] = field(default_factory=dict)

    # ---------------------------------------------------------------- flat tensors (the wire representation)
    def to_flat(self, roles: tuple[str, ...] | frozenset[str] = ROLES) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, m in self.modules.items():
            if ROLE_A in roles:
                out[name + A_SUFFIX] = m.A
            if ROLE_B in roles:
                out[name + B_SUFFIX] = m.B
            if ROLE_R in roles and m.R is not None:
                out[name + R_SUFFIX] = m.R
        if ROLE_HEAD in roles:
            out.update(self.head)
        return out

    def with_tensors(self, flat: dict[str, Tensor]) -> "Adapter":
        """A copy where the given flat tensors replace ours; every key must exist with the same shape.  Each
        tensor of the result is copied once (a replaced tensor of ours is not copied first)."""
        given: dict[str, dict[str, Tensor]] = {}
        head = {}
        for key, value in flat.items():
            role = role_of(key)
            if role == ROLE_HEAD:
                if key not in self.head:
                    raise UpdateError(f"unexpected head tensor {key!r}")
                _check_shape(key, self.head[key], value)
                head[key] = value
                continue
            name = module_of(key)
            if name not in self.modules:
                raise UpdateError(f"unexpected LoRA tensor {key!r}: no such target module")
            attr = {ROLE_A: "A", ROLE_B: "B", ROLE_R: "R"}[role]
            ours = getattr(self.modules[name], attr)
            if ours is None:
                raise UpdateError(f"unexpected LoRA tensor {key!r}: module {name!r} has no core")
            _check_shape(key, ours, value)
            given.setdefault(name, {})[attr] = value
        modules = {}
        for name, m in self.modules.items():
            new = given.get(name, {})
            R = new.get("R", m.R)
            modules[name] = LoraModule(new.get("A", m.A).clone(), new.get("B", m.B).clone(), m.alpha,
                                       None if R is None else R.clone())
        return Adapter(modules, {k: head.get(k, v).clone() for k, v in self.head.items()})

    def clone(self) -> "Adapter":
        return Adapter({n: m.clone() for n, m in self.modules.items()}, {k: v.clone() for k, v in self.head.items()})

    def folded(self) -> "Adapter":
        """The same update as a plain LoRA adapter: each core folded into its B (``B ← B·R``, exact), the form PEFT
        loads.  An adapter without cores is returned as it is."""
        if all(m.R is None for m in self.modules.values()):
            return self
        modules = {n: LoraModule(m.A, m.B if m.R is None else (m.B.double() @ m.R.double()).to(m.B.dtype), m.alpha)
                   for n, m in self.modules.items()}
        return Adapter(modules, dict(self.head))

    # ---------------------------------------------------------------- counts
    def num_parameters(self, roles: tuple[str, ...] | frozenset[str] = ROLES) -> int:
        return sum(t.numel() for t in self.to_flat(roles).values())

    def num_bytes(self, roles: tuple[str, ...] | frozenset[str] = ROLES) -> int:
        """Raw tensor bytes (no container overhead); the wire counts serialised bytes, see :mod:`fedlora.wire`."""
        return sum(t.numel() * t.element_size() for t in self.to_flat(roles).values())


def _check_shape(key: str, ours: Tensor, theirs: Tensor) -> None:
    if tuple(ours.shape) != tuple(theirs.shape):
        raise UpdateError(f"tensor {key!r} has shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")


def seeded_lora_A(module_name: str, rank: int, d_in: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """PEFT's default LoRA-A init (Kaiming-uniform, a=√5 ⇒ U(−1/√d_in, 1/√d_in)), drawn from a generator seeded by
    ``(seed, module_name)``, so every client regenerates the identical A without it being sent (FFA-LoRA,
    docs/methods.md §3).
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module_name}".encode()) + 1_000_003 * seed)
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def initial_adapter(shapes: dict[str, tuple[int, int]], rank: int | dict[str, int], alpha: float, seed: int,
                    head: dict[str, Tensor] | None = None, core: bool = False) -> Adapter:
    """Round-0 adapter: seeded A, B = 0 for each module ``name -> (d_out, d_in)``, at one rank or per-module ranks
    (``core``: with an ``r × r`` core R = 0 as well).

    A's rows come from one generator stream per module, so a rank-r A is the first r rows of a rank-r' A (r < r')."""
    ranks = rank if isinstance(rank, dict) else {name: rank for name in shapes}
    modules = {
        name: LoraModule(seeded_lora_A(name, ranks[name], d_in, seed), torch.zeros(d_out, ranks[name]), float(alpha),
                         torch.zeros(ranks[name], ranks[name]) if core else None)
        for name, (d_out, d_in) in shapes.items()
    }
    return Adapter(modules, {k: v.clone() for k, v in (head or {}).items()})

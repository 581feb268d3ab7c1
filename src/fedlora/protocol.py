"""The messages between a federated method and the engines: what a client gets (:class:`ClientPlan`), what it sends
back (:class:`Update`), what a method knows before round 1 (:class:`FederationSpec`), the server's state
(:class:`ServerState`) and what a method's client-side hooks see (:class:`ClientContext`, :class:`LocalHooks`).

Plain data over adapter tensors, importing neither the methods nor the engines, so both can import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from fedlora.adapters import Adapter


@dataclass(frozen=True)
class ClientPlan:
    """What one client receives for one round.

    ``download`` holds the tensors sent over the wire (flat keys); anything the client needs that is not in it comes
    from the shared-seed initial adapter every client can regenerate (FFA-LoRA's A, a frozen head).  ``train`` and
    ``upload`` are sets of roles (``lora_A``, ``lora_B``, ``head``).
    """

    client_id: int
    download: dict[str, Tensor]
    train: frozenset[str]
    upload: frozenset[str]
    config: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    """Per-module LoRA ranks for this round; empty = the client's configured ranks (:class:`FederationSpec`)."""
    merge: dict[str, Tensor] = field(default_factory=dict)
    """Tensors the client merges into its frozen base before training (FLoRA); counted as downlink traffic."""
    modules: frozenset[str] | None = None
    """Only these LoRA modules train and are uploaded (layer-subset methods); None = every module."""
    keep: frozenset[str] = frozenset()
    """Roles the client keeps between rounds (personalised methods: FedSA-LoRA's B and head): trained, never
    uploaded, restored at its next round from its own store (a file in the in-process engine, the node's
    ``context.state`` on Flower); a client without them starts them from the shared-seed initial adapter."""
    privacy: Any = None
    """This client's DP-SGD parameters for the run (:class:`fedlora.privacy.ClientPrivacy`: σ, q, steps per round,
    C, δ), set by the engine from the run's DP plan — a Flower node trains with what the server calibrated; None =
    no DP."""

    def uploaded(self, adapter: Adapter) -> dict[str, Tensor]:
        """The flat tensors of ``adapter`` this plan uploads: its ``upload`` roles, restricted to ``modules``."""
        flat = adapter.to_flat(self.upload)
        if self.modules is None:
            return flat
        from fedlora.adapters import ROLE_HEAD, module_of, role_of

        return {k: v for k, v in flat.items() if role_of(k) == ROLE_HEAD or module_of(k) in self.modules}


@dataclass
class Update:
    """What one client sends back: the uploaded tensors, its number of training examples and its metrics."""

    client_id: int
    num_examples: int
    tensors: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    """Structured client reports beside the tensors (Fed-piLot: the chosen layers and their IG-Scores)."""


@dataclass
class FederationSpec:
    """What a method may know before round 1: module shapes, every client's per-module ranks, alpha and the seed.

    ``initial(k)`` is the adapter client ``k`` starts from when nothing is sent for a tensor: A drawn from the shared
    seed (PEFT's Kaiming init), B = 0, at the client's ranks.
    """

    shapes: dict[str, tuple[int, int]]
    client_ranks: dict[int, dict[str, int]]
    alpha: float
    seed: int
    head: dict[str, Tensor] = field(default_factory=dict)
    layer_groups: list[list[str]] = field(default_factory=list)
    """Layer-assignment methods: module names per transformer block (see :mod:`fedlora.layers`)."""
    memory: Any = None
    """Layer-assignment methods: the :class:`fedlora.memory.MemoryModel` of one client training step."""
    budgets: dict[int, float] = field(default_factory=dict)
    """Layer-assignment methods: each client's training-memory budget in bytes."""
    alpha_per_rank: float = 0.0
    """> 0: every module's alpha is ``alpha_per_rank · r`` (FLoRA's convention), so the scale is the same at every
    rank; 0: ``alpha`` for every rank (``s = alpha / r``)."""
    core: bool = False
    """True when every LoRA module has an ``r × r`` core R between its factors (``Method.lora_core``: Fed-SB); the
    initial adapter then carries R = 0."""

    def alpha_of(self, rank: int) -> float:
        """The LoRA alpha a module of this rank trains with."""
        return self.alpha_per_rank * rank if self.alpha_per_rank > 0 else self.alpha

    def scale_of(self, rank: int) -> float:
        """The LoRA scale ``s = alpha / r`` a module of this rank trains with."""
        return self.alpha_of(rank) / rank

    def initial(self, client_id: int | None = None, ranks: dict[str, int] | None = None,
                seed: int | None = None) -> Adapter:
        from fedlora.adapters import initial_adapter

        if ranks is None:
            ranks = self.client_ranks[client_id] if client_id is not None else self.global_ranks()
        adapter = initial_adapter(self.shapes, ranks, self.alpha, self.seed if seed is None else seed, head=self.head,
                                  core=self.core)
        if self.alpha_per_rank > 0:
            for module in adapter.modules.values():
                module.alpha = self.alpha_of(module.rank)
        return adapter

    def ranks_of(self, plan: ClientPlan) -> dict[str, int]:
        """The per-module ranks a client trains at in one round: the plan's own (a method that changes a client's
        ranks between rounds, as HetLoRA's pruning does) or else the client's configured ranks (``client_ranks``,
        resolved once by the engine from ``lora.*``).  The engines and the robust wrapper look a plan's ranks up
        here; a method making plans reads ``client_ranks`` (the configured ones) or its own state."""
        return plan.ranks or self.client_ranks[plan.client_id]

    def global_ranks(self) -> dict[str, int]:
        """Per module, the largest rank any client uses."""
        return {n: max(r[n] for r in self.client_ranks.values()) for n in self.shapes}


@dataclass
class ServerState:
    """The global adapter plus whatever a method keeps between rounds (momentum, scores, ...)."""

    adapter: Adapter
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientContext:
    """What a method's client-side hooks may use in one client round, in every engine: the shared model with this
    client's LoRA ``slots`` loaded, its training ``examples``, the task's ``loss_fn``, the ``train`` config section,
    the federation ``spec``, the round, the run's seed, and ``start()``, which gives the adapter the client starts
    from before its download is applied (the shared-seed initial adapter at its ranks; made on demand, so that it
    is not held while the client trains)."""

    model: Any
    slots: Any
    examples: Any
    loss_fn: Callable
    train: Any
    spec: FederationSpec
    round_idx: int
    seed: int
    start: Callable[[], Adapter]


class LocalHooks:
    """A method's hooks inside one client's local training (the role PEFT's ``LoraVariant`` plays for a LoRA layer):
    a term added to the loss once per optimiser step, and metrics reported with the upload.  One instance per client
    round, made by :meth:`Method.local_hooks` after the client's starting adapter is loaded."""

    def penalty(self, slots: Any) -> Tensor | None:
        """A term added to the first micro-batch's loss of every step (None = none).  Not allowed under DP-SGD: it
        would not be part of the privatised per-example gradient."""
        return None

    def metrics(self, slots: Any, trained: Adapter) -> dict[str, float]:
        """Numbers the client reports beside its upload, computed at the end of local training."""
        return {}

"""The method interface (DESIGN.md): what each client gets in a round, and how the server combines what comes back.

A method is plain Python over adapter tensors. It knows nothing of engines, files or processes:

* :meth:`Method.configure` turns the global state into one :class:`ClientPlan` per sampled client;
* the engine runs local training and hands back one :class:`Update` per client;
* :meth:`Method.aggregate` combines the updates into the next global state.

New methods register themselves with :func:`register` (one file per method, no if/elif over names).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from fedlora.adapters import Adapter
from fedlora.robust import combine
from fedlora.server_optimizer import ServerOptimizer, server_step


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
        adapter = initial_adapter(self.shapes, ranks, self.alpha, self.seed if seed is None else seed, head=self.head)
        if self.alpha_per_rank > 0:
            for module in adapter.modules.values():
                module.alpha = self.alpha_of(module.rank)
        return adapter

    def global_ranks(self) -> dict[str, int]:
        """Per module, the largest rank any client uses."""
        return {n: max(r[n] for r in self.client_ranks.values()) for n in self.shapes}


@dataclass
class ServerState:
    """The global adapter plus whatever a method keeps between rounds (momentum, scores, ...)."""

    adapter: Adapter
    extra: dict[str, Any] = field(default_factory=dict)


def data_weights(updates: list[Update]) -> list[float]:
    """``p_k = n_k / Σ_j n_j`` over the clients that reported this round (algorithms.md §0.3)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("cannot weight updates: total number of examples is 0")
    return [u.num_examples / total for u in updates]


def weighted_average(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """``Σ_k p_k · t_k`` accumulated in float64, returned in the dtype of the first tensor."""
    return combine(tensors, weights, "mean")


def average_uploaded(state: ServerState, updates: list[Update], robust: Any = None, server: Any = None) -> ServerState:
    """FedAvg of every uploaded tensor with data-size weights (or the robust rule of ``cfg.robust``); tensors nobody
    uploads keep their global value.  With a ``server`` section other than plain FedAvg, the average is not adopted
    outright: the server optimiser steps along ``average − global`` (:mod:`fedlora.server_optimizer`)."""
    if not updates:
        return state
    weights = data_weights(updates)
    rule = getattr(robust, "aggregation", "mean")
    trim = getattr(robust, "trim_fraction", 0.1)
    keys = updates[0].tensors.keys()
    merged = {k: combine([u.tensors[k] for u in updates], weights, rule, trim) for k in keys}
    extra = dict(state.extra)
    opt = ServerOptimizer.from_config(server)
    if not opt.is_identity:
        current = state.adapter.to_flat()
        merged, extra = server_step(opt, current, merged, extra)
    return ServerState(state.adapter.with_tensors(merged), extra)


def average_head(state: ServerState, updates: list[Update], weights: list[float]) -> dict[str, Tensor]:
    """Data-weighted mean of the task-head tensors the clients uploaded (empty for causal LMs, which have none)."""
    keys = [k for k in state.adapter.head if all(k in u.tensors for u in updates)] if updates else []
    return {k: combine([u.tensors[k] for u in updates], weights, "mean") for k in keys}


def client_factors(updates: list[Update], module: str) -> tuple[list[Tensor], list[Tensor]]:
    """Every client's ``(B_k, A_k)`` for one module, in update order."""
    from fedlora.adapters import A_SUFFIX, B_SUFFIX

    return [u.tensors[module + B_SUFFIX] for u in updates], [u.tensors[module + A_SUFFIX] for u in updates]


class Method(ABC):
    """Base class of a federated LoRA method. Subclasses set ``name`` and ``summary`` and implement two hooks."""

    name: ClassVar[str]
    summary: ClassVar[str]
    citation: ClassVar[str] = ""
    heterogeneous_ranks: ClassVar[bool] = False
    """False: every client must use the same ranks; the engine gives all the smallest configuration in use."""
    averages_tensors: ClassVar[bool] = True
    """True when aggregation is a per-tensor average, so ``robust.*`` rules and norm bounds apply."""
    accepts_server_optimizer: ClassVar[bool] = False
    """True when the aggregate is :func:`average_uploaded` (an average of uploaded tensors), so ``server.optimizer``
    can step along it; methods with their own server rule refuse ``server.*`` (see the engine's option check)."""
    own_server_step: ClassVar[str] = ""
    """Where a method without ``accepts_server_optimizer`` has its own server step, said in the refusal."""
    needs_memory_model: ClassVar[bool] = False
    """True for layer-assignment methods: the engine builds layer groups, the memory model and client budgets."""
    scores_layers_by_gradient: ClassVar[bool] = False
    """True when clients score LoRA layers by gradient norms at the downloaded adapter (Fed-piLot's IG-Score): at
    B = 0 those are all zero under a zero classification head, so ``model.head_init = "auto"`` keeps the model's
    random head for such methods."""

    def __init__(self, cfg: Any, spec: FederationSpec | None = None):
        self.cfg = cfg
        self.spec = spec

    def init_state(self, initial: Adapter) -> ServerState:
        """The server state before round 1, from the shared-seed initial adapter."""
        return ServerState(initial.clone())

    @abstractmethod
    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        """One plan per sampled client."""

    @abstractmethod
    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        """Combine the round's updates into the next global state."""

    def average(self, state: ServerState, updates: list[Update]) -> ServerState:
        """:func:`average_uploaded` with this run's ``robust`` rule and ``server`` optimiser."""
        return average_uploaded(state, updates, getattr(self.cfg, "robust", None), getattr(self.cfg, "server", None))

    def global_adapter(self, state: ServerState) -> Adapter:
        """The adapter that is evaluated and exported (PEFT format)."""
        return state.adapter

    def base_delta(self, state: ServerState) -> dict[str, Tensor] | None:
        """Dense updates merged into the frozen base weights (FLoRA); None for methods that never touch the base."""
        return None

    def export_adapter(self, state: ServerState) -> Adapter:
        """The whole learned update as one PEFT adapter (what ``adapter/`` holds at the end of a run)."""
        return self.global_adapter(state)

    @classmethod
    def alpha_per_rank(cls, cfg: Any) -> float:
        """The engine's LoRA alpha rule for this method: 0 = ``lora.alpha`` at every rank (``s = alpha / r``);
        c > 0 = ``alpha = c·r`` (the same scale c at every rank; FLoRA's convention)."""
        return 0.0

    def head_roles(self) -> frozenset[str]:
        return frozenset({"head"}) if getattr(self.cfg.lora, "head", "aggregate") == "aggregate" else frozenset()


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def method_summaries() -> dict[str, str]:
    return {n: _REGISTRY[n].summary for n in available_methods()}

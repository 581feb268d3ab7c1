"""The method interface (docs/architecture.md): what each client gets in a round, and how the server combines what comes back.

A method is plain Python over adapter tensors. It knows nothing of engines, files or processes:

* :meth:`Method.configure` turns the global state into one :class:`ClientPlan` per sampled client;
* the engine runs local training and hands back one :class:`Update` per client;
* :meth:`Method.aggregate` combines the updates into the next global state.

New methods register themselves with :func:`register` (one file per method, no if/elif over names).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor

from fedlora.adapters import Adapter
from fedlora.protocol import ClientContext, ClientPlan, FederationSpec, LocalHooks, ServerState, Update
from fedlora.robust import combine
from fedlora.server_optimizer import ServerOptimizer, server_step


def data_weights(updates: list[Update]) -> list[float]:
    """``p_k = n_k / Σ_j n_j`` over the clients that reported this round (choice P5, docs/oracles.md)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("cannot weight updates: total number of examples is 0")
    return [u.num_examples / total for u in updates]


def weighted_average(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """``Σ_k p_k · t_k`` accumulated in float64, returned in the dtype of the first tensor."""
    return combine(tensors, weights, "mean")


def average_uploaded(state: ServerState, updates: list[Update], server: Any = None,
                     merge_tensor: Callable[[list[Tensor], list[float]], Tensor] = weighted_average) -> ServerState:
    """FedAvg of every uploaded tensor with data-size weights (``merge_tensor`` merges one tensor across clients:
    the weighted mean, or a robust rule set by :class:`fedlora.robust.RobustAggregation`); tensors nobody uploads
    keep their global value.  With a ``server`` section other than plain FedAvg, the average is not adopted outright:
    the server optimiser steps along ``average − global`` (:mod:`fedlora.server_optimizer`)."""
    if not updates:
        return state
    weights = data_weights(updates)
    keys = updates[0].tensors.keys()
    merged = {k: merge_tensor([u.tensors[k] for u in updates], weights) for k in keys}
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


@dataclass(frozen=True)
class MethodConfig:
    """What a method reads of a run's configuration: its own typed sections (those it names in
    ``Method.config_sections``) and the aggregation settings every averaging method shares — whether the task head is
    aggregated (``lora.head``) and the server optimiser (``server``).  The rest of the experiment config (data, model,
    training, DP, …) is the engine's; robust rules (``robust``) are not a method's either: they wrap it
    (:func:`fedlora.robust.with_robust`)."""

    sections: dict[str, Any] = field(default_factory=dict)
    head: str = "aggregate"
    server: Any = None


class Method(ABC):
    """Base class of a federated LoRA method. Subclasses set ``name`` and ``summary`` and implement two hooks."""

    name: ClassVar[str]
    summary: ClassVar[str]
    citation: ClassVar[str] = ""
    heterogeneous_ranks: ClassVar[bool] = False
    """False: every client must use the same ranks; the engine gives all the smallest configuration in use."""
    averages_tensors: ClassVar[bool] = True
    """True when aggregation is a per-tensor average (:meth:`average`), so the robust wrapper
    (:class:`fedlora.robust.RobustAggregation`: ``robust.*`` rules and norm bounds) can go around it."""
    accepts_server_optimizer: ClassVar[bool] = False
    """True when the aggregate is :func:`average_uploaded` (an average of uploaded tensors), so ``server.optimizer``
    can step along it; methods with their own server rule refuse ``server.*`` (see the engine's option check)."""
    secure_aggregation: ClassVar[bool] = False
    """True when the aggregate is the data-weighted average of the uploads and nothing else of any one update, so the
    server can work from their secure sum alone (``secure.aggregation``, :mod:`fedlora.engine.flower_secure`)."""
    own_server_step: ClassVar[str] = ""
    """Where a method without ``accepts_server_optimizer`` has its own server step, said in the refusal."""
    needs_memory_model: ClassVar[bool] = False
    """True for layer-assignment methods: the engine builds layer groups, the memory model and client budgets."""
    scores_layers_by_gradient: ClassVar[bool] = False
    """True when clients score LoRA layers by gradient norms at the downloaded adapter (Fed-piLot's IG-Score): at
    B = 0 those are all zero under a zero classification head, so ``model.head_init = "auto"`` keeps the model's
    random head for such methods."""

    lora_core: ClassVar[bool] = False
    """True when every LoRA module has a trainable ``r × r`` core R between frozen factors (``ΔW = s·B·R·A``; LoRA-SB,
    Fed-SB): the engine puts the core layers into the model and the adapters carry R (role ``lora_R``)."""

    minimal_overrides: ClassVar[tuple[str, ...]] = ()
    """``--set`` overrides the smallest run of this method needs beyond the defaults (memory budgets, heterogeneous
    ranks); the table-driven test runs every registered method with them, so a new method is tested by registering
    it."""
    streams: ClassVar[bool] = False
    """True when the server folds each upload into an accumulator as it arrives (:meth:`begin`, :meth:`accumulate`,
    :meth:`finish`) instead of holding every update until :meth:`aggregate`."""

    report_columns: ClassVar[dict[str, str]] = {}
    """Client report entries the round's metrics show per client: report key → metrics column (layer methods:
    ``{"layers": "layers_trained", …}``)."""

    config_sections: ClassVar[tuple[str, ...]] = ()
    """The experiment config sections this method owns (``hetlora``, ``pilot``, …): all it receives of them."""
    reads_sections: ClassVar[tuple[str, ...] | None] = None
    """The sections whose values change what this method does (None = all of :attr:`config_sections`): a setting in
    any other method's section is refused by ``fedlora run`` as ignored (:mod:`fedlora.config_ignored`)."""

    def __init__(self, config: Any, spec: FederationSpec | None = None):
        """``config``: a :class:`MethodConfig`, or the experiment config, of which only this method's sections and
        the shared aggregation settings are kept (:meth:`method_config`)."""
        self.config = config if isinstance(config, MethodConfig) else self.method_config(config)
        self.spec = spec

    @classmethod
    def method_config(cls, cfg: Any) -> MethodConfig:
        """The part of an experiment config this method receives."""
        return MethodConfig({name: getattr(cfg, name) for name in cls.config_sections},
                            getattr(getattr(cfg, "lora", None), "head", "aggregate"), getattr(cfg, "server", None))

    def section(self, name: str) -> Any:
        """One of this method's own config sections."""
        return self.config.sections[name]

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, with a :class:`fedlora.errors.ConfigError`, options this method cannot run with (called before any
        data or model is loaded)."""

    # ------------------------------------------------------------------------------------------ client side
    def prepare_client(self, ctx: ClientContext, plan: ClientPlan) -> tuple[ClientPlan, dict[str, Any]]:
        """On the client, before local training: the plan it trains by (a method may finish it here with local
        information: Fed-piLot chooses its layers) and report entries sent beside the upload."""
        return plan, {}

    def training_scope(self, ctx: ClientContext, plan: ClientPlan, report: dict[str, Any]):
        """A context manager around the client's local training (FedRA: the sub-model of its drawn blocks; layer
        methods measure peak memory into ``report``)."""
        return contextlib.nullcontext()

    def local_hooks(self, plan: ClientPlan, slots: Any) -> LocalHooks:
        """The hooks inside this client's local training (a loss term, reported metrics)."""
        return LocalHooks()

    def client_base(self, merge: dict[str, Tensor], previous: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """On a client that keeps state between rounds (a Flower node): the dense offsets its frozen base holds this
        round, from the plan's ``merge`` tensors and the offsets it held before (FLoRA); {} = the plain base."""
        return {}

    # ------------------------------------------------------------------------------------------ server side
    def begin(self, round_idx: int, state: ServerState, plans: list[ClientPlan]) -> Any:
        """Streaming methods (:attr:`streams`): a fresh accumulator for this round."""
        raise NotImplementedError(f"{self.name} does not stream its aggregation")

    def accumulate(self, acc: Any, update: Update) -> None:
        """Streaming methods: fold one accepted upload into the accumulator."""
        raise NotImplementedError(f"{self.name} does not stream its aggregation")

    def finish(self, round_idx: int, state: ServerState, acc: Any) -> ServerState:
        """Streaming methods: the next global state from the round's accumulator."""
        raise NotImplementedError(f"{self.name} does not stream its aggregation")

    def state_during_round(self, state: ServerState) -> ServerState | None:
        """Streaming methods: all that :meth:`finish` reads of the previous state, or None (the default: all of it).
        While the uploads stream in, the engine then holds only this light state — the full one is on disk in the
        last checkpoint, and comes back from there if :meth:`finish` returns the light state itself (no upload) —
        so a round never holds the previous global update next to the new sums (FlexLoRA over 1,613 clients)."""
        return None

    def init_state(self, initial: Adapter) -> ServerState:
        """The server state before round 1, from the shared-seed initial adapter."""
        return ServerState(initial.clone())

    def init_examples(self) -> int:
        """How many server-held examples the initial adapter is fitted on (:meth:`initial_from_gradients`); 0 = none,
        the initial adapter is the shared-seed one."""
        return 0

    def initial_from_gradients(self, initial: Adapter, gradients: dict[str, Tensor]) -> Adapter:
        """The initial adapter fitted to ``gradients``: per LoRA module, the summed loss gradient of its frozen weight
        ``∂L/∂W (d_out × d_in)`` over :meth:`init_examples` server-held examples at the shared-seed initial
        adapter (LoRA-SB's initialisation)."""
        return initial

    @abstractmethod
    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        """One plan per sampled client."""

    @abstractmethod
    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        """Combine the round's updates into the next global state."""

    merge_tensor: Callable[[list[Tensor], list[float]], Tensor] = staticmethod(weighted_average)
    """How :meth:`average` merges one tensor across clients: the data-weighted mean, unless a robust wrapper
    replaced it."""

    def average(self, state: ServerState, updates: list[Update]) -> ServerState:
        """:func:`average_uploaded` with this method's tensor merge and the run's ``server`` optimiser."""
        return average_uploaded(state, updates, self.config.server, self.merge_tensor)

    def plan_as_trained(self, plan: ClientPlan, report: dict[str, Any]) -> ClientPlan:
        """On the server, before an upload is checked: the plan as the client finally trained it, from what it
        reported (Fed-piLot: the layers its own knapsack chose).  Default: the plan as sent."""
        return plan

    def admit(self, plan: ClientPlan, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], float | None]:
        """On the server, each accepted upload before it is kept: the tensors kept and the update norm measured
        (None = not measured).  Plain methods keep the upload as it is; the robust wrapper bounds its norm."""
        return tensors, None

    def personal_roles(self) -> frozenset[str]:
        """Roles each client keeps for itself (personalised methods: FedSA-LoRA's B and head); non-empty turns on
        personalised evaluation, and the run's headline becomes the clients' mean personalised score."""
        return frozenset()

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
        return frozenset({"head"}) if self.config.head == "aggregate" else frozenset()


__all__ = ["ClientContext", "ClientPlan", "FederationSpec", "LocalHooks", "Method", "ServerState", "Update",
           "available_methods", "get_method", "register"]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered methods and those :mod:`fedlora.registry` can load (built-in and entry-point plugins)."""
    from fedlora.registry import method_names

    return sorted(set(_REGISTRY) | set(method_names()))


def get_method(name: str) -> type[Method]:
    """The method class ``name``, importing its module (or loading its entry point) on first use."""
    if name not in _REGISTRY:
        from fedlora.registry import load

        loaded = load(name)
        if isinstance(loaded, type) and issubclass(loaded, Method) and name not in _REGISTRY:
            if getattr(loaded, "name", None) != name:
                raise ValueError(f"entry point {name!r} names a method whose name is {loaded.name!r}")
            register(loaded)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def method_summaries() -> dict[str, str]:
    return {n: get_method(n).summary for n in available_methods()}

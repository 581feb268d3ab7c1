"""Scoring the global model: on the (unseen-task) validation set and, outside DP, on each client's own split."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedlora.adapters import Adapter
from fedlora.config import ExperimentConfig
from fedlora.engine.runtime import Engine, adapter_fits
from fedlora.methods.base import ServerState


class _MergedDelta(Mapping):
    """``base_delta[m] + s·B_m·A_m`` per module, computed when :meth:`BaseWeights.set` reads it: a full-size global
    adapter is merged one module at a time, never as a dictionary of every dense delta."""

    def __init__(self, base_delta: dict | None, adapter: Adapter):
        self.base, self.adapter = base_delta or {}, adapter
        self.names = list(dict.fromkeys([*self.base, *adapter.modules]))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        delta = self.adapter.modules[name].delta().float() if name in self.adapter.modules else None
        if name in self.base:
            return self.base[name] + delta if delta is not None else self.base[name]
        return delta

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def evaluate_global(eng: Engine, method, state: ServerState, generate: bool) -> dict:
    """Score the global model: loaded into the LoRA slots when its ranks fit them, else merged into the base
    (``W0 + offset + s·B·A``, exact, with the slots' B set to zero); the base is restored afterwards."""
    global_adapter = method.global_adapter(state)
    base_delta = method.base_delta(state)
    slots = eng.pool.slots(eng.default_ranks)
    if adapter_fits(global_adapter, eng.default_ranks):
        slots.load(global_adapter)
        eng.base.set(base_delta)
    else:
        slots.load_base_only(dict(global_adapter.head))
        eng.base.set(_MergedDelta(base_delta, global_adapter))
    try:
        return _evaluate(eng, generate)
    finally:
        eng.base.set(base_delta)


def per_client_evaluation(cfg: ExperimentConfig) -> bool:
    """``eval.per_client``, except under DP: a client's accuracy on its own validation rows is a statistic of its
    data released outside the privacy accounting, so private runs score the global model on the server's
    validation set only."""
    return bool(cfg.eval.per_client) and not cfg.dp.enabled


def _evaluate(eng: Engine, generate: bool) -> dict:
    """Global model on the (unseen-task) validation set, and on each client's local validation split."""
    cfg, task = eng.prepared.cfg, eng.prepared.task
    row = task.score(eng.model, eng.tokenizer, eng.global_val, cfg, generate)
    if per_client_evaluation(cfg):
        row.update(task.client_scores(eng.model, eng.tokenizer, eng.client_val, eng.prepared.clients, cfg))
    return row

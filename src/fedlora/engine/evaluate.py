"""Scoring the global model: on the (unseen-task) validation set and, outside DP, on each client's own split."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from torch import Tensor

from fedlora.adapters import ROLES, Adapter
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


def personal_scores(eng: Engine, method, state: ServerState, kept_of) -> dict:
    """Personalised evaluation (methods with :meth:`~fedlora.methods.base.Method.personal_roles`): each client's own
    model — the global part with the tensors it keeps, ``kept_of(k)`` (None: it never trained, so its part is the
    initial one) — on its local validation rows; per client, mean and minimum, as ``personal_<metric>``.  In the
    in-process engine ``kept_of`` reads the client's own file; on Flower each node scores itself."""
    task = eng.prepared.task
    keep = method.personal_roles()
    global_part = method.global_adapter(state)
    shared = global_part.to_flat(frozenset(ROLES) - keep)
    eng.base.set(method.base_delta(state))
    per = {}
    for k, client in enumerate(eng.prepared.clients):
        if client.val_rows:
            per[k] = client_evaluate(eng, k, shared, kept_of(k))
    return personal_summary(per, task.client_metric)


def client_evaluate(eng: Engine, client_id: int, shared: dict[str, Tensor], kept: dict[str, Tensor] | None) -> float:
    """One client's personalised score: its initial adapter with the global ``shared`` tensors and its ``kept`` ones,
    on its validation rows."""
    cfg, task = eng.prepared.cfg, eng.prepared.task
    ranks = eng.spec.client_ranks[client_id]
    start = eng.initial_for(ranks, None).with_tensors(shared)
    slots = eng.pool.slots(ranks)
    slots.load(start.with_tensors(kept) if kept else start)
    return task.client_score(eng.model, eng.tokenizer, eng.client_val[client_id], cfg)


def personal_summary(per: dict[int, float], metric: str) -> dict:
    values = list(per.values())
    return {f"personal_{metric}": per,
            f"personal_{metric}_mean": float(np.mean(values)) if values else None,
            f"personal_{metric}_min": float(np.min(values)) if values else None}

"""The in-process engine's grouped client training (``train.client_group = N``): up to N consecutive sampled clients
train together through one forward pass of the shared base model (:mod:`fedlora.client_group`); every upload is then
received in plan order, so aggregation sums in the same order as sequential training.

What trains one client at a time instead, and why (:func:`why_sequential`; each round's report counts them):

* ``dp`` — DP-SGD clips per-example gradients per client (Opacus hooks on the shared model) and adds each client's
  own noise; grouping it means per-row gradients per client's tensors, not built yet;
* ``scope`` — a method with its own :meth:`~fedlora.methods.base.Method.training_scope` (FedRA's sub-models, the
  layer methods' measured memory) changes the forward pass or measures one client alone;
* ``layers`` — a plan that trains a subset of the LoRA modules (same forward; left for when its memory is modelled);
* ``model`` — a model the packed forward does not handle (:func:`fedlora.grouped.groupable`: decoders, LoRA cores);
* ``task`` — a task without a per-micro-batch loss from logits (instruction tuning averages tokens).
"""
from __future__ import annotations

import dataclasses

from fedlora import wire
from fedlora.client import ClientRun
from fedlora.client_group import train_group
from fedlora.engine.client_round import RoundUpdates, client_work, finish_client, receive_upload, start_client
from fedlora.engine.rundir import fault_point
from fedlora.grouped import GroupedForward, groupable
from fedlora.memory import release_freed_memory
from fedlora.methods.base import Method


def why_sequential(eng, plan, method, model_reason: str | None = None) -> str | None:
    """None when ``plan``'s client can train in a group, else the short reason it trains alone (``model_reason``:
    :func:`fedlora.grouped.groupable` of the engine's model)."""
    if plan.privacy is not None:
        return "dp"
    inner = getattr(method, "inner", method)  # the robust wrapper delegates to the method it wraps
    if (type(inner).training_scope is not Method.training_scope
            or type(inner).prepare_client is not Method.prepare_client):  # may change the plan after this check
        return "scope"
    if plan.modules is not None:
        return "layers"
    if not hasattr(eng.prepared.task, "loss_from_logits"):
        return "task"
    return "model" if model_reason is not None else None


def _send(plan, out: RoundUpdates):
    """The download through the wire (bytes counted), as the client receives it."""
    payload = wire.encode(plan.download)
    out.down_bytes += len(payload)
    if plan.merge:
        out.down_bytes += len(wire.encode(plan.merge))
    return dataclasses.replace(plan, download=wire.decode(payload))


def collect_grouped(t, plans, eng, accountant, method, stream, bar, group: int) -> RoundUpdates:
    """:func:`fedlora.engine.simulation.collect_in_process` with groups of up to ``group`` clients trained together;
    clients :func:`why_sequential` names train alone, in their place in the order."""
    cfg = eng.prepared.cfg
    out = RoundUpdates()
    forward = None
    pending: list = []
    counts: dict[str, int] = {}
    model_reason = groupable(eng.model)

    def receive(plan, blob, update, kept):
        if plan.keep:
            eng.client_states.put(plan.client_id, t, kept)
        receive_upload(eng, plan, blob, update, out, accountant, method, stream)
        if "loss" in update.metrics:
            bar.set_postfix(loss=f"{update.metrics['loss']:.3f}")
        bar.update(1)
        fault_point("train", t)

    def flush():
        nonlocal forward
        if not pending:
            return
        forward = forward or GroupedForward(eng.model)
        starts = []
        for plan in pending:
            kept = eng.client_states.get(plan.client_id) if plan.keep else None
            starts.append(start_client(eng, _send(plan, out), t, method, kept, own_slots=True))
        training = [s for s in starts if s.skipped is None]
        runs = [ClientRun(slots=s.slots, plan=s.plan, examples=s.ctx.examples, train_cfg=cfg.train, round_idx=t,
                          seed=cfg.seed, hooks=s.hooks) for s in training]
        updates = iter(train_group(eng.model, runs, eng.prepared.task.loss_from_logits,
                                   getattr(cfg.train, "precision", "fp32"), forward) if runs else [])
        counts["grouped"] = counts.get("grouped", 0) + len(runs)
        for plan, s in zip(pending, starts):
            blob, update, kept = finish_client(s, s.skipped or next(updates))
            receive(plan, blob, update, kept)
        pending.clear()
        release_freed_memory()

    for plan in plans:
        reason = why_sequential(eng, plan, method, model_reason)
        if reason is None:
            pending.append(plan)
            if len(pending) == group:
                flush()
            continue
        flush()
        counts[reason] = counts.get(reason, 0) + 1
        kept = eng.client_states.get(plan.client_id) if plan.keep else None
        blob, update, kept = client_work(eng, _send(plan, out), t, method, kept)
        receive(plan, blob, update, kept)
        release_freed_memory()
    flush()
    out.grouping = counts
    return out

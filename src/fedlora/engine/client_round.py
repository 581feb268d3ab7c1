"""One client's round, the same in every engine: the client's side (:func:`client_work`: start from the download,
train, encode the upload) and the server's side (:func:`receive_upload`: account, check, bound, accumulate)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from fedlora import wire
from fedlora.adapters import Adapter
from fedlora.attack import client_examples, update_poisoner
from fedlora.client import train_client
from fedlora.engine.runtime import Engine
from fedlora.errors import UpdateError
from fedlora.methods.base import ClientContext, ClientPlan, Method, Update


@dataclass
class RoundUpdates:
    """What the server received in one round: accepted updates, drops with reasons, traffic and update norms."""

    updates: list[Update] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    up_bytes: int = 0
    down_bytes: int = 0
    reports: dict[int, dict] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)  # sampled clients whose reply never came (Flower)
    grouping: dict[str, int] = field(default_factory=dict)  # train.client_group: clients grouped / alone, by reason
    secure: dict = field(default_factory=dict)  # secure.aggregation: what the server received (Flower engine)


@dataclass
class ClientStart:
    """A client's round up to local training: the method's finished plan, its report so far, its slots holding its
    starting adapter, and its hooks; ``skipped`` is its update when nothing fits its budget (it sits out)."""

    plan: ClientPlan
    report: dict
    ctx: ClientContext
    slots: object
    hooks: object = None
    skipped: Update | None = None
    kept: dict[str, Tensor] | None = None
    poison: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None  # attack.*: a malicious client's upload


def start_client(eng: Engine, plan: ClientPlan, t: int, method: Method, kept: dict[str, Tensor] | None = None,
                 own_slots: bool = False) -> ClientStart:
    """The method's :meth:`~Method.prepare_client` (it may finish the plan with local information), then the slots
    loaded with the initial adapter, the plan's download in place (and, for a plan with ``keep`` roles, the tensors
    the client ``kept`` from its last round).  ``own_slots``: tensors of the client's own
    (:meth:`~fedlora.lora.LoraSlots.standalone`, for grouped training) instead of the shared model's."""
    task = eng.prepared.task
    ranks = eng.spec.ranks_of(plan)
    slots = eng.pool.slots(ranks)
    seed = plan.config.get("init_seed")
    examples = client_examples(eng.prepared.cfg.attack, eng.client_train, plan.client_id,
                               getattr(task, "num_labels", 0))  # a label flipper's own copy, flipped
    ctx = ClientContext(eng.model, slots, examples, task.loss, eng.prepared.cfg.train, eng.spec, t, eng.prepared.cfg.seed,
                        start=lambda: eng.initial_for(ranks, seed))
    plan, report = method.prepare_client(ctx, plan)
    kept = kept if plan.keep else None
    if plan.keep and kept is None and plan.config.get("returning"):
        report["state_restarted"] = 1  # it trained before but holds no state: it starts its part afresh
    if plan.modules is not None and not plan.modules and not (plan.train & {"head"}):
        skipped = Update(plan.client_id, len(examples), {},
                         {"loss": float("nan"), "skipped": 1.0, "steps": 0.0})  # nothing fits its budget: sits out
        return ClientStart(plan, report, ctx, slots, skipped=skipped, kept=kept or {})
    # the client's starting point goes into the slots here, and neither it nor the download is held while it
    # trains (a rank-56 SmolLM2 adapter is 68 MB)
    start = ctx.start().with_tensors(plan.download)
    start = start.with_tensors(kept) if kept else start
    poison = update_poisoner(eng.prepared.cfg.attack, plan.client_id, plan.uploaded(start), t, eng.prepared.cfg.seed)
    if own_slots:
        slots = slots.standalone(start)
    else:
        slots.load(start)
    del start
    plan = dataclasses.replace(plan, download={})
    return ClientStart(plan, report, ctx, slots, hooks=method.local_hooks(plan, slots), poison=poison)


def finish_client(started: ClientStart, update: Update) -> tuple[bytes, Update, dict[str, Tensor]]:
    """Encode the upload; the tensors the client keeps for its next round (``plan.keep`` roles; never uploaded)."""
    plan = started.plan
    if started.skipped is not None:
        out_kept = started.kept
    else:
        out_kept = started.slots.read().to_flat(plan.keep) if plan.keep else {}
    update.report.update(started.report)
    if started.poison is not None and update.tensors:
        update = dataclasses.replace(update, tensors=started.poison(update.tensors))
    blob = wire.encode(update.tensors)
    return blob, dataclasses.replace(update, tensors={}), out_kept  # from here on only the bytes travel


def client_work(eng: Engine, plan: ClientPlan, t: int, method: Method,
                kept: dict[str, Tensor] | None = None) -> tuple[bytes, Update, dict[str, Tensor]]:
    """A client's side of round ``t``, the same in every engine: :func:`start_client`, train locally inside the
    method's :meth:`~Method.training_scope` with its :meth:`~Method.local_hooks` (DP-SGD when the client has a
    privacy plan), and :func:`finish_client`.  Returns the upload's bytes, the update without tensors, and the
    tensors the client keeps for its next round."""
    cfg = eng.prepared.cfg
    started = start_client(eng, plan, t, method, kept)
    update = started.skipped
    if update is None:
        plan = started.plan
        with method.training_scope(started.ctx, plan, started.report):
            update = train_client(model=eng.model, slots=started.slots, initial=None, plan=plan,
                                  examples=started.ctx.examples, loss_fn=eng.prepared.task.loss, train_cfg=cfg.train,
                                  round_idx=t, seed=cfg.seed, privacy=plan.privacy, accountant=None,
                                  secure_rng=cfg.dp.secure_rng, hooks=started.hooks)
    return finish_client(started, update)


def receive_upload(eng: Engine, plan, blob: bytes, update: Update, out: RoundUpdates, accountant,
                   method: Method, stream=None) -> None:
    """The server's side of one client's round: account its DP-SGD steps, check the upload (a bad one is dropped
    with its reason), let the method admit it (:meth:`~Method.admit`: the robust wrapper bounds its norm), and fold
    it into the method's accumulator or keep it."""
    cfg = eng.prepared.cfg
    out.up_bytes += len(blob)
    privacy = plan.privacy
    if privacy is not None and update.metrics.get("steps"):
        accountant.step(plan.client_id, privacy.noise_multiplier, privacy.sample_rate, int(update.metrics["steps"]))
    ranks = eng.spec.ranks_of(plan)
    plan = method.plan_as_trained(plan, update.report)  # e.g. the layers a Fed-piLot client chose itself
    received, reason = _receive(blob, plan, eng.template_for(ranks), cfg)
    if reason is not None:
        out.dropped[plan.client_id] = reason
        return
    received, norm = method.admit(plan, received)  # the robust wrapper bounds the update's norm
    if norm is not None:
        out.norms[plan.client_id] = norm
    if stream is not None:
        method.accumulate(stream, Update(update.client_id, update.num_examples, received, update.metrics))
        received = {}
    out.updates.append(Update(update.client_id, update.num_examples, received, update.metrics, update.report))
    if update.report:
        out.reports[plan.client_id] = update.report


def _receive(blob: bytes, plan, initial: Adapter, cfg) -> tuple[dict, str | None]:
    """Server-side checks of one upload; a bad one is dropped with its reason instead of stopping the run."""
    try:
        limit = int(cfg.robust.max_update_mb * 1e6)
        return wire.receive_update(blob, plan.uploaded(initial), who=f"client {plan.client_id}",
                                   max_bytes=limit), None
    except UpdateError as exc:
        return {}, str(exc)


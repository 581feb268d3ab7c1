"""Several clients' local rounds trained together (``train.client_group``; docs/design/client_group.md).

Each client is a :class:`~fedlora.client.ClientRun` — its own tensors, seed, batch sampler, optimiser, loss term and
FedProx anchor, exactly as when it trains alone.  Step j of every client that still has a step j runs together: micro-
batch c of each goes through one packed forward pass of the shared frozen model (:mod:`fedlora.grouped`), the loss
``Σ_g w_g·(ℓ_g + penalty_g)`` is backpropagated once (client g's tensors reach only its own rows, so each gets
exactly its own gradient), then every client takes its own optimiser step.  Dropout masks come from each client's own
random state, so the uploads equal sequential training's up to the order of float sums (tests/test_client_group.py:
≤ 1e-10 relative in float64).  Non-private clients only: DP-SGD needs per-example gradients per client
(:func:`fedlora.engine.client_group.why_sequential` lists what falls back).
"""
from __future__ import annotations

import torch
from torch import nn

from fedlora.client import ClientRun, autocast
from fedlora.dpsgd import PlainStep
from fedlora.grouped import GroupedForward, Member
from fedlora.protocol import Update


def train_group(model: nn.Module, runs: list[ClientRun], loss_from_logits, precision: str = "fp32",
                forward: GroupedForward | None = None) -> list[Update]:
    """Train ``runs`` (non-private clients whose slots are their own tensors) side by side; their uploads in order.
    ``loss_from_logits(logits, labels)`` is the task's mean loss over a micro-batch's rows.  The global random state is
    left where sequential training leaves it: at the last client's."""
    if any(r.privacy is not None for r in runs):
        raise ValueError("grouped training runs non-private clients only (DP-SGD clients train one at a time)")
    forward = forward or GroupedForward(model)
    members = []
    for r in runs:
        torch.manual_seed(r.seed)  # dropout, as train_client seeds it
        members.append(Member(r.slots, torch.get_rng_state()))
    steppers = [PlainStep(model, r.optimizer) for r in runs]
    model.train()
    try:
        for j in range(max(r.steps for r in runs)):
            active = [g for g, r in enumerate(runs) if j < r.steps]
            batches = {}
            for g in active:
                steppers[g].optimizer.zero_grad(set_to_none=True)
                batches[g] = runs[g].next_batch()
            sums = {g: 0.0 for g in active}
            for c in range(max(len(batches[g][1]) for g in active)):
                group = [g for g in active if c < len(batches[g][1])]
                chunks = [batches[g][1][c] for g in group]
                inputs = [runs[g].examples.batch(chunk) for g, chunk in zip(group, chunks)]
                with autocast(model, precision):  # the loss too, as train_client computes it (fp32 under autocast)
                    logits = forward.logits(inputs, [members[g] for g in group])
                    losses = [loss_from_logits(logits[members[g].rows], batch["labels"])
                              for g, batch in zip(group, inputs)]
                total = 0.0
                for g, chunk, loss in zip(group, chunks, losses):
                    weight = steppers[g].chunk_weight(len(chunk), batches[g][0])
                    extra = runs[g].penalty(steppers[g], weight) if c == 0 else None
                    if extra is not None:
                        loss = loss + extra
                    total = total + loss * weight
                    sums[g] += float(loss.detach()) * len(chunk)
                total.backward()
            for g in active:
                size = batches[g][0]
                steppers[g].step(runs[g].params, size, extra_grad=runs[g].prox)
                if size:
                    runs[g].losses.append(sums[g] / size)
    finally:
        for r in runs:
            r.release()
        torch.set_rng_state(members[-1].rng)
    return [r.update(s) for r, s in zip(runs, steppers)]

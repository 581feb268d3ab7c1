"""The loss gradient of every LoRA-wrapped frozen weight on a server-held sample: what a method fits its initial
adapter to (LoRA-SB's initialisation for Fed-SB, :meth:`fedlora.methods.base.Method.initial_from_gradients`).

Whose data: the server's.  In simulation the server draws ``n`` rows, seeded, from the union of the clients' training
rows — the authors' code does the same (the first rows of the pooled training set) — which models a server holding
a small sample of in-distribution data (public, or given with consent).  It is not client data released through the
protocol, and it is not covered by the clients' DP accounting, so a method that needs it refuses DP-SGD unless the
user says the sample is public (see the method's own config section).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from fedlora.adapters import Adapter


def server_sample(sizes: list[int], n: int, seed: int) -> list[tuple[int, list[int]]]:
    """``n`` rows drawn without replacement (seeded) from clients holding ``sizes`` rows: ``[(client, rows), …]``
    in client order, each client's rows ascending.  All rows when ``n`` is at least their number."""
    total = sum(sizes)
    picked = np.arange(total) if n >= total else np.sort(np.random.default_rng([seed, 43]).choice(total, n, replace=False))
    bounds = np.cumsum([0, *sizes])
    out = []
    for k in range(len(sizes)):
        rows = picked[(picked >= bounds[k]) & (picked < bounds[k + 1])] - bounds[k]
        if len(rows):
            out.append((k, rows.tolist()))
    return out


def summed_weight_gradients(eng, initial: Adapter, n: int, log=print) -> dict[str, Tensor]:
    """``Σ_i ∂ℓ_i/∂W`` (float64, ``d_out × d_in``) for every LoRA module's frozen base weight ``W``, over ``n`` rows of
    the server's sample (:func:`server_sample`), with ``initial`` in the LoRA slots (B = 0: the LoRA layers add
    nothing, so this is the gradient of full fine-tuning at the pretrained weights).  The model is in training mode
    (dropout on, seeded), as a first fine-tuning step would be; micro-batches of ``train.batch_size / grad_accum``."""
    cfg, task = eng.prepared.cfg, eng.prepared.task
    sample = server_sample([len(x) for x in eng.client_train], n, cfg.seed)
    slots = eng.pool.slots(eng.default_ranks)
    slots.load(initial)
    inner = eng.model.base_model.model
    weights = {name: inner.get_submodule(name).get_base_layer().weight for name in slots.shapes}
    sums = {name: torch.zeros(w.shape, dtype=torch.float64) for name, w in weights.items()}
    micro = max(1, cfg.train.batch_size // cfg.train.grad_accum)
    t0, seen = time.time(), 0
    log(f"{cfg.method}: fitting the initial adapter to the loss gradient of {len(weights)} frozen weights on "
        f"{sum(len(r) for _, r in sample)} server-held examples")
    torch.manual_seed(cfg.seed + 97)  # dropout
    eng.model.train()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for k, rows in sample:
            examples = eng.client_train[k]
            for start in range(0, len(rows), micro):
                chunk = rows[start:start + micro]
                loss = task.loss(eng.model, examples.batch(chunk))
                (loss * len(chunk)).backward()  # a mean over the micro-batch → its sum over examples
                for name, w in weights.items():
                    if w.grad is not None:
                        sums[name] += w.grad.double()
                        w.grad = None
                seen += len(chunk)
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        eng.model.eval()
    log(f"{cfg.method}: gradients of {seen} examples in {time.time() - t0:.1f} s")
    return sums

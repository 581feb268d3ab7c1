"""Grouped client training (``train.client_group``) against one client at a time, through the real engine.

    python bench/client_batching.py [--clients 8] [--group 8] [--repeats 3] [--steps 10] [--threads N]

The demo's settings (all-MiniLM-L6-v2, FFA-LoRA r=8 on query/value, batch 16, SST-2 at length 48, Dirichlet
clients), round 1, every client: the engine's in-process ``collect`` (download over the wire, local training,
upload encoding and checks; no evaluation) timed with ``train.client_group = 1`` and ``= --group``, interleaved
(the order alternates per repeat, after one warm-up of each), medians reported.  The largest relative difference
between the two runs' uploads is printed too (float summation order only).

The ceiling is what the issue measured by hand: the same steps as plain PEFT + AdamW loops, 8 batches of 16 one after
another against one batch of 128 (their concatenation, padded together), ``ceiling = Σ t(16) / t(128)``.  Grouped
training packs real tokens without padding (the demo's batches of 16 are ~60 % padding), so it can pass that ceiling.
Last line ``speedup=<x> ceiling=<y>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from tqdm.auto import tqdm

from machine import cpu_model, first_round

from fedlora.data.tasks import ClassificationTask
from fedlora.engine.client_group import collect_grouped
from fedlora.engine.simulation import collect_in_process


def _round(eng, prepared, method, plans, group: int) -> tuple[float, list]:
    """One round's client work; ``group = -1``: the grouped (packed) path with one client per group."""
    prepared.cfg.train.client_group = group
    t0 = time.perf_counter()
    if group == -1:
        with tqdm(total=len(plans), disable=True) as bar:
            out = collect_grouped(1, plans, eng, None, method, None, bar, 1)
    else:
        out = collect_in_process(1, plans, eng, prepared, None, False, method)
    return time.perf_counter() - t0, out.updates


def _max_relerr(a: list, b: list) -> tuple[float, str]:
    """The largest per-tensor relative difference ‖a − b‖/‖a‖ between two rounds' uploads, and its tensor."""
    worst, where = 0.0, ""
    for ua, ub in zip(a, b):
        for k, v in ua.tensors.items():
            err = float((v - ub.tensors[k]).norm() / v.norm().clamp(min=1e-12))
            if err > worst:
                worst, where = err, f"client {ua.client_id}, {k}"
    return worst, where


def _plain(model, slots, batch, steps: int) -> float:
    params = slots.set_trainable(frozenset({"lora_B", "head"}))
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        ClassificationTask.loss(model, batch).backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - t0


def ceiling(eng, clients: int, batch_size: int, steps: int) -> tuple[float, int, int, int]:
    """Σ over clients of a batch-16 plain loop / one batch-128 loop over the same rows; their tokens computed
    (padded) and real."""
    rng = np.random.default_rng(0)
    slots = eng.pool.slots(eng.default_ranks)
    small, rows = [], []
    for k in range(clients):
        ex = eng.client_train[k]
        idx = rng.choice(len(ex), size=min(batch_size, len(ex)), replace=False)
        small.append(ex.batch(idx))
        rows.append((ex, idx))
    width = max(b["input_ids"].shape[1] for b in small)
    big = {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) if b[key].dim() == 2
                           else b[key] for b in small]) for key in small[0]}
    _plain(model := eng.model, slots, small[0], 1)  # warm-up
    t_small = sum(_plain(model, slots, b, steps) for b in small)
    t_big = _plain(model, slots, big, steps)
    real = int(sum(int(b["attention_mask"].sum()) for b in small))
    return t_small / t_big, sum(b["input_ids"].numel() for b in small), int(big["input_ids"].numel()), real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per setting (0: only check the uploads)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepared, eng, method, plans = first_round([f"clients.num={args.clients}", f"train.local_steps={args.steps}"])
    cfg = prepared.cfg
    print(f"# Grouped client training, {len(plans)} clients × {args.steps} steps of batch {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU: {cpu_model()}")
    _, ref = _round(eng, prepared, method, plans, 1)  # warm-ups
    _, grp = _round(eng, prepared, method, plans, args.group)
    _round(eng, prepared, method, plans, -1)
    order = [1, args.group, -1]
    times: dict[int, list[float]] = {g: [] for g in order}
    for r in range(args.repeats):
        for g in (order if r % 2 == 0 else order[::-1]):
            times[g].append(_round(eng, prepared, method, plans, g)[0])
    if not args.repeats:
        times = {g: [float("nan")] for g in order}
    med = {g: statistics.median(v) for g, v in times.items()}
    one, many = med[1], med[args.group]
    labels = {1: "1 (one client at a time, padded batches)", args.group: f"{args.group} (packed, grouped)",
              -1: "packed, one client per group (isolates packing from grouping)"}
    print()
    print("| train.client_group | s / round (median) | runs | vs 1 |")
    print("|---|---|---|---|")
    for g in order:
        print(f"| {labels[g]} | {med[g]:.2f} | {', '.join(f'{t:.2f}' for t in times[g])} | {one / med[g]:.2f}x |")
    err, where = _max_relerr(ref, grp)
    median = statistics.median(float((v - ug.tensors[k]).norm() / v.norm().clamp(min=1e-12))
                               for ur, ug in zip(ref, grp) for k, v in ur.tensors.items())
    print(f"relative difference between the uploads (grouped vs one at a time), per tensor: largest {err:.2e} "
          f"({where}), median {median:.2e}")
    ceil, small_tokens, big_tokens, real = ceiling(eng, len(plans), cfg.train.batch_size, args.steps)
    print(f"ceiling: {len(plans)} × batch-{cfg.train.batch_size} loops / one loop over their concatenation = "
          f"{ceil:.2f}x (tokens computed: {small_tokens} in the separate batches, {big_tokens} padded together, "
          f"{real} real)")
    print(f"speedup={one / many:.2f} ceiling={ceil:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

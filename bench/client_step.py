"""Seconds per local step: FedIT, FFA-LoRA and FFA-LoRA + DP-SGD through fedlora's client, against a plain
PEFT + torch loop on the same batch (all-MiniLM-L6-v2, LoRA r=8 on query/value, batch 16, sequence 128).
Also the measured upload bytes per client per round, FFA-LoRA / FedIT.

    python bench/client_step.py [--steps 10] [--repeats 3]

Every figure is measured in this run, side by side; the table reports medians and ratios to the plain loop.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from fedlora import wire
from fedlora.adapters import initial_adapter
from fedlora.client import train_client
from fedlora.config import load_config
from fedlora.data.sources import read_rows
from fedlora.data.tasks import ClassificationTask, Examples
from fedlora.methods import ServerState, get_method
from fedlora.models import LoraSlots, inject_lora, load_classifier
from fedlora.privacy import ClientPrivacy

BATCH, SEQ = 16, 128


def _batch_examples(tokenizer) -> Examples:
    rows = read_rows("bundled:sst2/validation")[:BATCH]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=SEQ, padding="max_length")
    # every row is exactly SEQ tokens long (padding counted as tokens, as in a fixed-shape batch)
    return Examples(list(enc["input_ids"]), None, torch.tensor([r["label"] for r in rows]), tokenizer.pad_token_id)


def _plain_loop(model, slots, examples, steps) -> float:
    params = slots.set_trainable(frozenset({"lora_A", "lora_B", "head"}))
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = examples.batch(range(BATCH))
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ClassificationTask.loss(model, batch)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / steps
    for p in params:
        p.requires_grad_(False)
    return dt


def _fedlora_step(model, slots, init, cfg, method, examples, steps, privacy=None) -> tuple[float, int]:
    plan = get_method(method)(cfg).configure(1, ServerState(init), [0])[0]
    t0 = time.perf_counter()
    up = train_client(model=model, slots=slots, initial=init, plan=plan, examples=examples,
                      loss_fn=ClassificationTask.loss, train_cfg=cfg.train, round_idx=1, seed=0, privacy=privacy)
    return (time.perf_counter() - t0) / steps, len(wire.encode(up.tensors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config(None, [f"train.local_steps={args.steps}", f"train.batch_size={BATCH}", "train.lr=1e-3"])
    tokenizer, base = load_classifier(cfg.model, 2, seed=0)
    model = inject_lora(base, cfg.lora)
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, cfg.lora.rank, cfg.lora.alpha, 0, head=slots.head())
    examples = _batch_examples(tokenizer)
    dp = ClientPrivacy(noise_multiplier=1.0, sample_rate=1.0, steps_per_round=args.steps, clip=1.0, delta=1e-5)

    variants = {
        "plain PEFT + torch": lambda: (_plain_loop(model, slots, examples, args.steps), None),
        "fedlora FedIT": lambda: _fedlora_step(model, slots, init, cfg, "fedit", examples, args.steps),
        "fedlora FFA-LoRA": lambda: _fedlora_step(model, slots, init, cfg, "ffa", examples, args.steps),
        "fedlora FFA-LoRA + DP-SGD": lambda: _fedlora_step(model, slots, init, cfg, "ffa", examples, args.steps, dp),
    }
    for fn in variants.values():  # warm-up: first steps allocate
        slots.load(init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    upload: dict[str, int | None] = {}
    for _ in range(args.repeats):  # interleaved, so drift of a shared host hits every variant alike
        for name, fn in variants.items():
            slots.load(init)
            dt, up = fn()
            times[name].append(dt)
            upload[name] = up
    ref = statistics.median(times["plain PEFT + torch"])
    print(f"# client step, MiniLM LoRA r=8 q,v, batch {BATCH} x seq {SEQ}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.repeats} repeats (median)")
    print("| variant | s/step | ratio to plain loop | upload bytes/client/round |")
    print("|---|---|---|---|")
    for name in variants:
        med = statistics.median(times[name])
        up = upload[name]
        print(f"| {name} | {med:.3f} | {med / ref:.2f} | {up if up is not None else '-'} |")
    ratio = upload["fedlora FFA-LoRA"] / upload["fedlora FedIT"]
    print(f"upload_ratio_ffa_over_fedit={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

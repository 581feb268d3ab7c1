"""Signal and noise of one DP-SGD step at the start of training, per method: why a short private run learns
nothing (docs/results.md, privacy study).

    python bench/dp_signal.py [--config examples/ffa_dp_glue.toml] [--client 2] [--batch 32] [--sigma 0.66]
                              [--run runs/<run>]

For the first ``--batch`` local training rows of one client it takes each example's gradient of the tensors the
method trains (FFA-LoRA: B and the classifier; FedIT: A, B and the classifier) at the initial adapter, clips it to
``dp.clip`` and averages, as DP-SGD does.  It prints the per-example norms, the norm of the clipped mean (the signal
of a step) and the norm of the noise DP-SGD adds to that mean, ``σ·C·√D / B`` for D trained numbers.

``--run DIR`` takes the gradients at that run's global adapter (its last checkpoint) instead of the initial one, and
the table adds the 10/50/90 % quantiles of the per-example norms and the share of examples the clip norm cuts: the
evidence for the choice of ``dp.clip`` (docs/methods.md §4).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

TRAINED = {"ffa": ("lora_B", "classifier"), "fedit": ("lora_A", "lora_B", "classifier")}


def main() -> int:
    from fedlora.config import load_config
    from fedlora.data.tasks import ClassificationTask
    from fedlora.engine.simulation import build_engine, prepare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/ffa_dp_glue.toml")
    ap.add_argument("--client", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sigma", type=float, default=0.66, help="noise multiplier (0.66: epsilon 3 in the study)")
    ap.add_argument("--run", default="", help="a run directory: gradients at its last checkpoint's global adapter")
    args = ap.parse_args()
    cfg = load_config(os.path.join(args.run, "config.toml") if args.run else args.config, ["dp.enabled=false"])
    engine = build_engine(prepare(cfg), log=lambda *_: None)
    examples, model, clip = engine.client_train[args.client], engine.model, cfg.dp.clip
    where = "initial adapter"
    if args.run:
        from fedlora.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(args.run))
        engine.pool.slots(engine.default_ranks).load(ckpt.state.adapter)
        where = f"global adapter after round {ckpt.round} of {args.run}"
    print(f"config={args.run or args.config} client={args.client} batch={args.batch} sigma={args.sigma} clip={clip} "
          f"at the {where}")
    print("| method | trained numbers D | per-example grad norm, median (min–max) | 10/50/90 % | share > C "
          "| clipped mean norm (signal) | noise norm σC√D/B | signal / noise |\n|---|---|---|---|---|---|---|---|")
    methods = {cfg.method: TRAINED[cfg.method]} if args.run else TRAINED
    for method, parts in methods.items():
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in name for part in parts))
        norms, clipped, dim = [], [], 0
        for i in range(args.batch):
            model.zero_grad(set_to_none=True)
            ClassificationTask.loss(model, examples.batch([i])).backward()
            grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
            g, dim = torch.cat(grads), sum(x.numel() for x in grads)
            norms.append(float(g.norm()))
            clipped.append(g * min(1.0, clip / float(g.norm())))
        signal = float(torch.stack(clipped).mean(0).norm())
        noise = args.sigma * clip * dim ** 0.5 / args.batch
        q10, q50, q90 = np.quantile(norms, [0.1, 0.5, 0.9])
        print(f"| {method} | {dim:,} | {np.median(norms):.3f} ({min(norms):.3f}–{max(norms):.3f}) "
              f"| {q10:.3f} / {q50:.3f} / {q90:.3f} | {np.mean(np.array(norms) > clip):.2f} | {signal:.4f} "
              f"| {noise:.3f} | {signal / noise:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

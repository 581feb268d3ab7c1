"""Signal and noise of one DP-SGD step at the start of training, per method: why a short private run learns
nothing (docs/results.md, privacy study).

    python bench/dp_signal.py [--config examples/ffa_dp_glue.toml] [--client 2] [--batch 32] [--sigma 0.66]

For the first ``--batch`` local training rows of one client it takes each example's gradient of the tensors the
method trains (FFA-LoRA: B and the classifier; FedIT: A, B and the classifier) at the initial adapter, clips it to
``dp.clip`` and averages, as DP-SGD does.  It prints the per-example norms, the norm of the clipped mean (the signal
of a step) and the norm of the noise DP-SGD adds to that mean, ``σ·C·√D / B`` for D trained numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

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
    args = ap.parse_args()
    cfg = load_config(args.config, ["dp.enabled=false"])
    engine = build_engine(prepare(cfg), log=lambda *_: None)
    examples, model, clip = engine.client_train[args.client], engine.model, cfg.dp.clip
    print(f"config={args.config} client={args.client} batch={args.batch} sigma={args.sigma} clip={clip}")
    print("| method | trained numbers D | per-example grad norm, median (min–max) | clipped mean norm (signal) "
          "| noise norm σC√D/B | signal / noise |\n|---|---|---|---|---|---|")
    for method, parts in TRAINED.items():
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
        print(f"| {method} | {dim:,} | {np.median(norms):.3f} ({min(norms):.3f}–{max(norms):.3f}) | {signal:.4f} "
              f"| {noise:.3f} | {signal / noise:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

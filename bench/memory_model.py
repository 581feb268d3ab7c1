"""Fed-piLot's memory model against measurement: predicted vs measured training memory of one step for several
LoRA layer subsets (memory above the idle loaded model; see fedlora/memory.py).

    python bench/memory_model.py [--model minilm] [--batch 16] [--seq 128] [--smollm2]

The model is calibrated on two profiled steps (only the last layer trained, only the first); every subset below is
then predicted and profiled in its own fresh child process (peak RSS above idle, /proc/self/status).  The last line
is ``max_relerr=<x>`` over the subsets that were not used for calibration.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.memory import analytic_activation_bytes, build_memory_model, profile_step, relative_error

SETTINGS = {
    "minilm": dict(task_type="SEQ_CLS", targets=["query", "value"], layers=6, hidden=384, heads=12, inter=1536,
                   per_layer_params=2 * 8 * (384 + 384)),
    "smollm2": dict(task_type="CAUSAL_LM", targets=["q_proj", "v_proj"], layers=30, hidden=576, heads=9, inter=1536,
                    per_layer_params=8 * (576 + 576) + 8 * (576 + 192)),
}


def subsets(n: int) -> list[list[int]]:
    mid = n // 2
    return [[mid], [n - 2, n - 1], [0, n - 1], list(range(mid, n)), list(range(n)), [1, mid]]


def run(model: str, batch: int, seq: int) -> list[dict]:
    s = SETTINGS[model]
    spec = dict(model=model, task_type=s["task_type"], rank=8, alpha=16.0, targets=s["targets"], batch=batch, seq=seq,
                threads=1)
    measured: dict[tuple, float] = {}

    def measure(layers):
        key = tuple(layers)
        if key not in measured:
            measured[key] = profile_step({**spec, "layers": list(layers)})["measured"]
        return measured[key]

    prior = analytic_activation_bytes(batch, seq, s["hidden"], s["heads"], s["inter"])
    mm = build_memory_model([s["per_layer_params"]] * s["layers"], prior, calibrate_with=measure)
    rows = []
    for layers in subsets(s["layers"]):
        pred, meas = mm.predict(layers), measure(layers)
        rows.append({"model": model, "layers": layers, "predicted": pred, "measured": meas,
                     "relerr": relative_error(pred, meas)})
    print(f"# {model}: batch {batch} x seq {seq}, LoRA r=8 on {'/'.join(s['targets'])}, AdamW; calibrated "
          f"per-block activations {mm.act_bytes[0] / 1e6:.1f} MB (analytic prior {prior / 1e6:.1f} MB), step "
          f"{mm.step_bytes / 1e6:.1f} MB; calibration steps: last only {mm.measurements['last_only'] / 1e6:.1f} MB, "
          f"first only {mm.measurements['first_only'] / 1e6:.1f} MB")
    print("| model | trained layers | predicted MB | measured MB | relative error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {model} | {r['layers']} | {r['predicted'] / 1e6:.1f} | {r['measured'] / 1e6:.1f} | {r['relerr']:.3f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=sorted(SETTINGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (batch 4 x seq 128)")
    args = ap.parse_args()
    rows = run(args.model, args.batch, args.seq)
    if args.smollm2 and args.model != "smollm2":
        rows += run("smollm2", 4, 128)
    print(f"max_relerr={max(r['relerr'] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FlexLoRA rounds (3 by default: the steady state, not only the first round) over the whole FlexLoRA client
population: all 1,613 SuperNI clients of FlexLoRA's release (../shared/data/flexlora_1613), 5 % sampled (80 clients)
a round, on SmolLM2-135M-Instruct with LoRA on all seven projections and FlexLoRA's uniform rank distribution scaled
to the model, with tiny local work (1 step of 1 example).

    python bench/scale.py [--data ../shared/data/flexlora_1613] [--rounds 3] [--method flexlora]

Reports the process's peak resident memory (ru_maxrss) and the seconds per round, measured in this run; the last
line is ``peak_rss_mb=<m> clients=<n>``.  What keeps memory flat: one shared frozen base model, one adapter per rank
configuration (not per client), client data tokenised on first use, no optimiser state kept after a client's round.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/flexlora_1613"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="flexlora")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train.jsonl.gz").is_file():
        print(f"FlexLoRA's 1,613-client SuperNI release is not at {data}: it is not bundled with the package (11 MB); "
              f"get folder data/1613 of alibaba/FederatedScope (branch FlexLoRA) as train.jsonl.gz, "
              f"validation.jsonl.gz and tasks.jsonl, and pass --data DIR", file=sys.stderr)
        return 2
    cfg = load_config(None, [
        f"method={args.method}", f"rounds={args.rounds}", 'model.name="smollm2"', "model.max_length=96",
        f"model.threads={args.threads}",
        'lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]',
        'lora.rank_distribution="uniform"', "lora.rank_types=[[2, 2], [8, 8], [8, 56], [56, 56]]",
        'data.task="instruction"', f'data.train="{data / "train.jsonl.gz"}"',
        f'data.validation="{data / "validation.jsonl.gz"}"', f'data.instructions="{data / "tasks.jsonl"}"',
        'data.client_column="client_id"', 'data.instruction_column="definition"', "data.max_eval_examples=16",
        'clients.partition="by_task"', "clients.num=0", "clients.fraction=0.05",
        "train.batch_size=1", "train.local_steps=1", "train.eval_batch_size=4",
        "eval.per_client=false", "eval.max_new_tokens=8"])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(cfg, out_dir=Path(tmp) / "run", progress=False, log=lambda *_: None)
        summary = json.loads((res.run_dir / "summary.json").read_text())
    total = time.time() - t0
    rows = res.metrics
    print(f"# One {args.method} round over FlexLoRA's full client population, SmolLM2-135M, tiny local work "
          f"(measured, {os.cpu_count()} cores)")
    print("| clients | sampled per round | rounds | s/round (mean) | upload MB/round | download MB/round | "
          "total s (incl. load) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    per_round = sum(r["wall_s"] for r in rows) / len(rows)
    print(f"| {summary['num_clients']} | {rows[0]['clients']} | {len(rows)} | {per_round:.1f} | "
          f"{sum(r['upload_bytes'] for r in rows) / len(rows) / 1e6:.1f} | "
          f"{sum(r['download_bytes'] for r in rows) / len(rows) / 1e6:.1f} | {total:.1f} | {peak_rss_mb():.0f} |")
    print(f"peak_rss_mb={peak_rss_mb():.0f} clients={summary['num_clients']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

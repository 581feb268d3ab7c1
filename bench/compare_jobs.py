"""Wall time of the same `fedlora compare` grid run with ``--jobs 1`` (cells one after another, torch's default
threads) and ``--jobs N`` (N cells at once, cpu_count/N threads each), side by side in one run.

    python bench/compare_jobs.py [--jobs 2] [--config examples/ffa_dp_glue.toml] [--set key=value ...]

The grid is FedIT and FFA-LoRA × 2 seeds (4 cells) of the given config, 2 rounds by default.  Both runs start from
empty directories (no cell is reused).  The last line is ``jobs_speedup=<wall --jobs 1 ÷ wall --jobs N>``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _compare(config: str, overrides: list[str], out: Path, jobs: int) -> float:
    cmd = [sys.executable, "-m", "fedlora", "compare", "--config", config, "--methods", "fedit,ffa", "--seeds", "2",
           "--out", str(out), "--quiet", "--jobs", str(jobs)]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/ffa_dp_glue.toml"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", action="append", default=["rounds=2"], dest="overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        serial = _compare(args.config, args.overrides, Path(tmp) / "serial", 1)
        parallel = _compare(args.config, args.overrides, Path(tmp) / "parallel", args.jobs)
    print(f"cpu_count={os.cpu_count()} cells=4 overrides={args.overrides}")
    print(f"| --jobs | wall s |\n|---|---|\n| 1 | {serial:.1f} |\n| {args.jobs} | {parallel:.1f} |")
    print(f"jobs_speedup={serial / parallel:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

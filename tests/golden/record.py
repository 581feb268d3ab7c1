"""Record the golden outputs: ``python tests/golden/record.py [CASE ...] [--out DIR]`` (default: every case, into
``tests/golden/``).  Run it only where a change is meant to alter results, and say why in the commit."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.golden.cases import CASES, HERE, run_case, stable_metrics  # noqa: E402


def record(case: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_case(case, Path(tmp) / "run")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "adapter" / "adapter_model.safetensors", dest / "adapter.safetensors")
        (dest / "metrics.csv").write_text(stable_metrics(run_dir), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cases", nargs="*", default=sorted(CASES))
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    for case in args.cases:
        record(case, args.out / case)
        print(f"recorded {case} -> {args.out / case}", flush=True)


if __name__ == "__main__":
    main()

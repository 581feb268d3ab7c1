"""The robustness study's table (examples/attack_study.sh): final SST-2 validation accuracy per method, partition,
attack and defence, mean ± standard deviation over the seeds that finished (their number in brackets).

    python examples/attack_study_table.py [RUNS] [--keep docs/data/attack_study/cells] [--write docs/reliability.md]

Reads every finished cell under RUNS (default runs/attack-study; each cell's config.toml says what it ran) and the
cells kept in the repository; ``--keep`` copies finished cells' summary.json, config.toml and metrics.csv there,
``--write`` replaces the table between its markers in the given file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BEGIN, END = "<!-- attack-study table begin -->", "<!-- attack-study table end -->"
ATTACKS = ["none", "scale", "sign_flip", "gaussian", "label_flip"]
DEFENCES = ["mean", "median", "trimmed_mean", "norm_bound"]
METHODS = {"fedit": "FedIT", "ffa": "FFA-LoRA"}


def cell_dirs(root: Path, pattern: str) -> list[Path]:
    """The summary.json of every finished cell under ``root`` matching ``pattern``."""
    return sorted(root.glob(pattern)) if root.is_dir() else []


def read(summaries: list[Path]) -> dict[tuple, dict[int, float]]:
    """(method, partition, attack, defence) → {seed: final accuracy}; a cell met twice (kept and re-run) counts once."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for path in summaries:
        cfg = tomllib.loads((path.parent / "config.toml").read_text())
        robust, attack = cfg.get("robust", {}), cfg.get("attack", {})
        defence = "norm_bound" if robust.get("norm_bound", 0) > 0 else robust.get("aggregation", "mean")
        key = (cfg["method"], cfg["clients"]["partition"], attack.get("kind", "none"), defence)
        out[key][int(cfg["seed"])] = json.loads(path.read_text())["final_accuracy"]
    return out


def table(results) -> str:
    lines = ["| method | partition | attack | " + " | ".join(DEFENCES) + " |", "|---|---|---|" + "---|" * len(DEFENCES)]
    for method in METHODS:
        for part in ("dirichlet", "iid"):
            for attack in ATTACKS:
                row = []
                for defence in DEFENCES:
                    accs = list(results.get((method, part, attack, defence), {}).values())
                    if not accs:
                        row.append("")
                    elif len(accs) == 1:
                        row.append(f"{accs[0]:.3f} (1)")
                    else:
                        row.append(f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f} ({len(accs)})")
                if any(row):
                    lines.append(f"| {METHODS[method]} | {part} | {attack} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs/attack-study")
    ap.add_argument("--keep", default="docs/data/attack_study/cells")
    ap.add_argument("--write")
    args = ap.parse_args()
    keep = Path(args.keep)
    for path in cell_dirs(Path(args.runs), "*/cells/*/summary.json"):
        name = f"{path.parent.parent.parent.name}__{path.parent.name}"  # the compare folder (partition) + the cell
        dest = keep / name
        if not dest.exists():
            dest.mkdir(parents=True)
            for f in ("summary.json", "config.toml", "metrics.csv"):
                if (path.parent / f).is_file():
                    shutil.copy(path.parent / f, dest / f)
    text = table(read(cell_dirs(keep, "*/summary.json")))
    print(text)
    if args.write:
        doc = Path(args.write)
        body = doc.read_text()
        if BEGIN not in body:
            raise SystemExit(f"{doc} has no {BEGIN} marker")
        head, rest = body.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

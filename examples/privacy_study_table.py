"""The privacy study's tables (examples/privacy_study.sh) from the finished cells kept in docs/data/privacy_v2/cells
(or the directory given): every cell's accuracy after rounds 4 / 8 / 12, then per (ε, partition) the mean ± spread
over seeds and FFA-LoRA's margin over FedIT.
    python examples/privacy_study_table.py [CELLS] [--write docs/results.md]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- privacy-v2 table begin -->", "<!-- privacy-v2 table end -->"
EPS_ORDER = {"1": 0, "3": 1, "6": 2, "inf": 3}


def read_cells(root: Path) -> dict[tuple[str, str, str, int], dict]:
    """(method, ε, partition, seed) → accuracies after each evaluated round, the final one and the wall time."""
    out = {}
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"method=(\w+)__dp\.epsilon=(\w+)__clients\.partition=(\w+)__seed=(\d+)", d.name)
        if not m or not (d / "summary.json").is_file():
            continue
        with open(d / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        accs = [float(r["accuracy"]) for r in rows if r.get("accuracy")]
        summary = json.loads((d / "summary.json").read_text())
        # the rounds' own times: summary.json's wall_s covers only the last process of a resumed cell
        wall = sum(float(r["wall_s"]) for r in rows if r.get("wall_s"))
        out[(m[1], m[2], m[3], int(m[4]))] = {"accs": accs, "final": summary["final_accuracy"],
                                              "wall": wall, "eps": summary.get("max_epsilon")}
    return out


def _cell(c: dict | None) -> str:
    if c is None:
        return "(running or to come)"
    return " / ".join(f"{a:.3f}" for a in c["accs"]) + (f" ({c['wall']:.0f} s)" if c["wall"] else "")


def tables(cells) -> str:
    keys = sorted({(e, p, s) for _, e, p, s in cells}, key=lambda k: (EPS_ORDER.get(k[0], 9), k[1] != "label_skew", k[2]))
    lines = ["| ε | partition | seed | FedIT r4 / r8 / r12 | FFA-LoRA r4 / r8 / r12 |", "|---|---|---|---|---|"]
    for e, p, s in keys:
        lines.append(f"| {e} | {p.replace('_', ' ')} | {s} | {_cell(cells.get(('fedit', e, p, s)))} | "
                     f"{_cell(cells.get(('ffa', e, p, s)))} |")
    lines += ["", "| ε | partition | seeds (pairs) | FedIT final | FFA-LoRA final | FFA-LoRA − FedIT (mean ± sd of pairs) |",
              "|---|---|---|---|---|---|"]
    groups = defaultdict(dict)
    for (method, e, p, s), c in cells.items():
        groups[(e, p)].setdefault(s, {})[method] = c["final"]
    for (e, p) in sorted(groups, key=lambda k: (EPS_ORDER.get(k[0], 9), k[1] != "label_skew")):
        pairs = {s: v for s, v in groups[(e, p)].items() if len(v) == 2}
        if not pairs:
            continue
        fedit = [v["fedit"] for v in pairs.values()]
        ffa = [v["ffa"] for v in pairs.values()]
        diff = [b - a for a, b in zip(fedit, ffa)]

        def ms(x):
            return f"{statistics.fmean(x):.3f}" + (f" ± {statistics.stdev(x):.3f}" if len(x) > 1 else "")

        lines.append(f"| {e} | {p.replace('_', ' ')} | {len(pairs)} | {ms(fedit)} | {ms(ffa)} | {ms(diff)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="?", default="docs/data/privacy_v2/cells")
    ap.add_argument("--write", help="replace the table between the markers in this Markdown file")
    args = ap.parse_args()
    table = tables(read_cells(Path(args.cells)))
    print(table)
    if args.write:
        doc = Path(args.write)
        text = doc.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()

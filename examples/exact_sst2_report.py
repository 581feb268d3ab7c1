"""Tables and the accuracy-vs-traffic plot of the exact-aggregation comparison (examples/exact_sst2.sh), from the
finished cells kept in docs/data/exact_sst2/cells (or the directory given).

A cell's score is the mean of its last three evaluations (rounds 6, 8, 10): single evaluations of a label-skewed
federation swing by ±0.03 from one round to the next, more than most differences between methods.  Each method's
learning rate is the one with the best seed-1 score (its global accuracy; a personalised method's own-rows score);
seeds 2 and 3 run at that rate only, so their numbers were not used to choose anything.
    python examples/exact_sst2_report.py [CELLS] [--write docs/results.md] [--plot docs/img/exact_sst2.png]
    python examples/exact_sst2_report.py --best-lr fedit      # prints the seed-1 choice (examples/exact_sst2.sh)
"""
from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ["fedit", "ffa", "fedex", "rolora", "fedsvd", "lorafair", "fedsb", "fedsa"]
NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedex": "FedEx-LoRA", "rolora": "RoLoRA", "fedsvd": "FedSVD",
         "lorafair": "LoRA-FAIR", "fedsb": "Fed-SB", "fedsa": "FedSA-LoRA"}
BEGIN, END = "<!-- exact-sst2 table begin -->", "<!-- exact-sst2 table end -->"


def _last3(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.fmean(values[-3:]) if len(values) >= 3 else None


def read_cells(root: Path) -> dict[tuple[str, str], list[dict]]:
    """(method, lr) → one record per finished seed."""
    cells = defaultdict(list)
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"method=(\w+)__train\.lr=([\d.e+-]+)__seed=(\d+)", d.name)
        if not m or not (d / "metrics.csv").is_file() or not (d / "summary.json").is_file():
            continue
        with open(d / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        personal = _last3(rows, "personal_accuracy_mean")
        cells[(m[1], m[2])].append({
            "seed": int(m[3]), "global": _last3(rows, "accuracy"),
            "local": personal if personal is not None else _last3(rows, "client_accuracy_mean"),
            "personalised": personal is not None,
            "traffic_mb": sum(float(r["upload_bytes"]) + float(r["download_bytes"]) for r in rows) / 1e6,
            "upload_mb": sum(float(r["upload_bytes"]) for r in rows) / 1e6})
    return cells


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(cells) -> tuple[str, dict[str, tuple[str, list[dict]]]]:
    """The markdown (every learning rate, then each method at its best) and the best cell per method."""
    lines = ["| method | lr | seeds | global accuracy | clients' own rows | traffic (MB, up + down) | upload (MB) |",
             "|---|---|---|---|---|---|---|"]
    best: dict[str, tuple[str, list[dict]]] = {}
    for method in sorted({m for m, _ in cells}, key=lambda m: ORDER.index(m) if m in ORDER else 99):
        for lr in sorted({lr for m, lr in cells if m == method}, key=float):
            recs = sorted(cells[(method, lr)], key=lambda r: r["seed"])
            g = [r["global"] for r in recs]
            loc = [r["local"] for r in recs if r["local"] is not None]
            lines.append(f"| {NAMES.get(method, method)} | {lr} | {len(recs)} | {_ms(g)} | "
                         f"{_ms(loc) if loc else '—'}{' (own B)' if recs[0]['personalised'] else ''} | "
                         f"{recs[0]['traffic_mb']:.1f} | {recs[0]['upload_mb']:.2f} |")
            first = [r for r in recs if r["seed"] == 1]
            if not first:
                continue
            key = first[0]["local"] if first[0]["personalised"] else first[0]["global"]
            if method not in best or key > best[method][2]:
                best[method] = (lr, recs, key)
    chosen = {m: (lr, recs) for m, (lr, recs, _) in best.items()}
    lines += ["", "Each method at the learning rate chosen on seed 1 (mean ± standard deviation over the seeds run):", "",
              "| method | lr | seeds | global accuracy | clients' own rows | upload (MB) | seeds 2–3 only | "
              "global − FedIT, paired by seed |",
              "|---|---|---|---|---|---|---|---|"]
    ref = {r["seed"]: r["global"] for r in chosen.get("fedit", (None, []))[1]}
    for method, (lr, recs) in chosen.items():
        g = [r["global"] for r in recs]
        loc = [r["local"] for r in recs if r["local"] is not None]
        head = [r["local"] if r["personalised"] else r["global"] for r in recs if r["seed"] != 1]
        # the same seed gives every method the same clients, data order and initial adapter: the paired
        # difference removes that shared part of the seed-to-seed spread
        paired = [r["global"] - ref[r["seed"]] for r in recs if r["seed"] in ref]
        diff = "—" if method == "fedit" or recs[0]["personalised"] or not paired else \
            (f"{statistics.fmean(paired):+.3f}" + (f" ± {statistics.stdev(paired):.3f}" if len(paired) > 1 else ""))
        lines.append(f"| {NAMES.get(method, method)} | {lr} | {len(recs)} | {_ms(g)} | "
                     f"{_ms(loc) if loc else '—'}{' (own B)' if recs[0]['personalised'] else ''} | "
                     f"{recs[0]['upload_mb']:.2f} | {_ms(head) if head else '—'} | {diff} |")
    return "\n".join(lines), chosen


def plot(best, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    same: dict[float, list[str]] = defaultdict(list)  # methods with equal traffic are drawn side by side
    for method, (_, recs) in best.items():
        same[round(recs[0]["traffic_mb"], 1)].append(method)
    for method, (lr, recs) in best.items():
        group = same[round(recs[0]["traffic_mb"], 1)]
        k = group.index(method) - (len(group) - 1) / 2
        x = recs[0]["traffic_mb"] * 1.12 ** k
        personal = recs[0]["personalised"]
        ys = [r["local"] if personal else r["global"] for r in recs]
        mean = statistics.fmean(ys)
        err = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar([x], [mean], yerr=[err], fmt="o" if not personal else "s", capsize=3,
                    label=f"{NAMES.get(method, method)} (lr {lr}{', own rows' if personal else ''})")
        ax.annotate(NAMES.get(method, method), (x, mean), textcoords="offset points", fontsize=7,
                    xytext=(-6, -10) if k < 0 else (6, 4), ha="right" if k < 0 else "left")
    ax.set_xscale("log")
    ax.set_xlabel("total traffic over 10 rounds, 3 clients (MB, upload + download, log scale; "
                  "equal traffic drawn side by side)", fontsize=9)
    ax.set_ylabel("SST-2 accuracy (mean of last 3 evaluations)")
    ax.set_title("SST-2, 3 label-skewed clients, MiniLM r = 8: each method at its best lr", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="?", default="docs/data/exact_sst2/cells")
    ap.add_argument("--write", help="replace the table between the markers in this Markdown file")
    ap.add_argument("--plot", help="write the accuracy-vs-traffic plot here")
    ap.add_argument("--best-lr", metavar="METHOD", help="print only METHOD's learning rate chosen on seed 1")
    args = ap.parse_args()
    table, best = tables(read_cells(Path(args.cells)))
    if args.best_lr:
        if args.best_lr not in best:
            raise SystemExit(f"no finished seed-1 cell for {args.best_lr!r} in {args.cells}")
        print(best[args.best_lr][0])
        return
    print(table)
    if args.write:
        doc = Path(args.write)
        text = doc.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    if args.plot:
        plot(best, Path(args.plot))


if __name__ == "__main__":
    main()

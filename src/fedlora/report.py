"""Run artefacts: metrics files (JSONL + CSV, rewritten every round so nothing is lost) and plots (PNG)."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from fedlora.errors import DataError

# Columns every metrics.csv starts with (the interface contract); per-client columns follow.
BASE_COLUMNS = ["round", "loss", "accuracy", "eval_loss", "upload_bytes", "download_bytes", "epsilon",
                "clients", "wall_s"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and rewrites ``metrics.csv`` from all rows."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_csv()

    def replace(self, rows: list[dict]) -> None:
        """Rewrite both files from ``rows`` (used on resume: the checkpoint's rows are the truth)."""
        self.rows = list(rows)
        _atomic_write(self.run_dir / "metrics.jsonl",
                      "".join(json.dumps(r, default=_jsonable) + "\n" for r in self.rows))
        self.write_csv()

    def write_csv(self) -> None:
        flat = [_flatten(r) for r in self.rows]
        extra = sorted({k for r in flat for k in r if k not in BASE_COLUMNS}, key=_natural)
        cols = BASE_COLUMNS + extra
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in flat:
            w.writerow({k: _csv_cell(r.get(k)) for k in cols})
        _atomic_write(self.run_dir / "metrics.csv", buf.getvalue())


# Per-client dicts (accuracy, epsilon, ...) become columns like ``epsilon_per_client.3`` up to this many clients;
# beyond it they stay in metrics.jsonl only, so the CSV remains readable with thousands of clients.
MAX_CSV_CLIENT_COLUMNS = 64


def _flatten(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            if len(v) <= MAX_CSV_CLIENT_COLUMNS:
                out.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, (dict, list))})
        elif not isinstance(v, list):
            out[k] = v
    return out


def _natural(key: str):
    head, _, tail = key.rpartition(".")
    return (head, int(tail)) if head and tail.isdigit() else (key, -1)


def _jsonable(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def _csv_cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def json_object_lines(path: Path, damaged: str = "") -> list[dict]:
    """Every non-blank line of a JSON Lines file as an object; a :class:`DataError` names the line that is not one
    (``damaged`` is appended to the message)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}){damaged}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path} line {i} is not JSON ({exc}){damaged}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {i} is not a JSON object{damaged}")
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` ([] when there is none); a damaged file is a :class:`DataError` naming
    the line, not a traceback."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = json_object_lines(path, "; the file is damaged")
    bad = next((i for i, row in enumerate(rows, 1) if "round" not in row), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad} is not a metrics row (no 'round'); the file is damaged")
    return rows


def plot_run(rows: list[dict], path: Path, title: str = "") -> None:
    """Accuracy, losses and traffic per round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    acc = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
    if acc:
        axes[0].plot(*zip(*acc), marker="o", label="global (validation)")
    client_acc = [(r["round"], r["client_accuracy_mean"]) for r in rows if r.get("client_accuracy_mean") is not None]
    if client_acc:
        axes[0].plot(*zip(*client_acc), marker=".", linestyle="--", label="mean over clients (local val)")
    axes[0].set(title="accuracy", xlabel="round")
    for key, marker, label in (("rougeL_teacher_forced", "o", "Rouge-L, teacher-forced (global eval set)"),
                               ("rougeL", "*", "Rouge-L, generated (global eval set)"),
                               ("client_rougeL_teacher_forced_mean", ".", "mean over clients, teacher-forced")):
        series = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if series:
            axes[0].plot(*zip(*series), marker=marker, label=label, markersize=10 if marker == "*" else 6)
            axes[0].set(title="Rouge-L")
            acc = acc or series
    if acc or client_acc:
        axes[0].legend(fontsize=8)
    axes[1].plot(rounds, [r.get("loss") for r in rows], marker="o", label="train (clients)")
    ev = [(r["round"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if ev:
        axes[1].plot(*zip(*ev), marker="s", label="validation")
    axes[1].set(title="loss", xlabel="round")
    axes[1].legend(fontsize=8)
    for key, marker in (("upload_bytes", "o"), ("download_bytes", "s")):
        total, series = 0.0, []
        for r in rows:
            total += r.get(key, 0) / 1e6
            series.append(total)
        axes[2].plot(rounds, series, marker=marker, label=key.split("_")[0])
    axes[2].set(title="cumulative traffic (MB, measured)", xlabel="round")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

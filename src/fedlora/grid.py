"""Side-by-side comparisons: a grid of methods × seeds × config values, each cell a normal run directory.

    fedlora compare --config examples/tiny.toml --methods fedit,ffa --seeds 3 --grid "dp.epsilon=1,3,inf"

Every cell is validated before the first one starts.  Cells run one after another into ``OUT/cells/<cell>/``; a cell
with ``summary.json`` is finished and never re-run, a cell with a checkpoint is resumed, so an interrupted compare
continues where it stopped.  For one seed, every method sees identical client partitions (the partition depends on
the data and the seed only).  ``dp.epsilon=inf`` in a grid means a non-private cell.  The comparison report
(``summary.csv``, ``summary.md``, plots) is rebuilt from the cells' saved metrics by :func:`report_compare`.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.config import ExperimentConfig, from_toml, load_config, to_toml
from fedlora.config_ignored import non_private_dp, result_settings
from fedlora.errors import ConfigError
from fedlora.report import read_metrics


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    grid: tuple[tuple[str, str], ...]  # (key, value) in grid order

    @property
    def name(self) -> str:
        parts = [f"method={self.method}"] + [f"{k}={v}" for k, v in self.grid] + [f"seed={self.seed}"]
        return "__".join(p.replace("/", "_") for p in parts)

    def overrides(self) -> list[str]:
        out = [f"method={self.method}", f"seed={self.seed}"]
        for k, v in self.grid:
            if k == "dp.epsilon":
                private = not (v.lower() in ("inf", "+inf") or math.isinf(float(v)))
                out.append(f"dp.enabled={'true' if private else 'false'}")
                if private:
                    out.append(f"dp.epsilon={v}")
                continue
            out.append(f"{k}={v}")
        return out


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["dp.epsilon=1,3,inf", "lora.rank=4,8"]`` → ``[("dp.epsilon", ["1","3","inf"]), ("lora.rank", ["4","8"])]``."""
    out = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        key, values = spec.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not vals:
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        if key.strip() in ("method", "seed"):
            raise ConfigError(f"--grid {key}: use --methods / --seeds for that")
        if key.strip() == "dp.epsilon":
            for v in vals:
                try:
                    eps = float(v)
                except ValueError:
                    eps = -1.0
                if not eps > 0:
                    raise ConfigError(f"--grid dp.epsilon: each value must be a positive number or inf (no DP), "
                                      f"got {v!r}")
        out.append((key.strip(), vals))
    return out


def parse_method_overrides(specs: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``["fedit:train.lr=1e-3"]`` → ``{"fedit": ["train.lr=1e-3"]}`` (a learning rate tuned per method, say)."""
    out: dict[str, list[str]] = {m: [] for m in methods}
    for spec in specs:
        method, sep, override = spec.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--set-for expects METHOD:KEY=VALUE, got {spec!r}")
        if method not in out:
            raise ConfigError(f"--set-for {spec!r}: {method!r} is not one of --methods ({', '.join(methods)})")
        out[method].append(override)
    return out


def plan_cells(config: str | None, overrides: list[str], methods: list[str], seeds: int,
               grid: list[tuple[str, list[str]]],
               method_overrides: dict[str, list[str]] | None = None) -> list[tuple[Cell, ExperimentConfig]]:
    """Every cell with its validated config; the first invalid cell stops everything before any run starts.

    Order of overrides: ``--set`` for all cells, then ``--set-for`` of the cell's method, then the cell's own
    method, seed and grid values."""
    if not methods:
        raise ConfigError("--methods needs at least one method, e.g. --methods fedit,ffa")
    if seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds}")
    # the base seed, read with the first cell's grid values applied: a grid may supply a value the bare config
    # needs (say --set dp.epsilon=0 --grid dp.noise_multiplier=...), so the bare config alone need not validate
    first = Cell(methods[0], 0, tuple((k, vals[0]) for k, vals in grid))
    try:
        base = load_config(config, overrides + (method_overrides or {}).get(methods[0], [])
                           + [o for o in first.overrides() if not o.startswith("seed=")])
    except ConfigError as exc:
        raise ConfigError(f"cell {first.name.replace('seed=0', 'seed=…')}: {exc}") from None
    cells = []
    keys = [k for k, _ in grid]
    for method in methods:
        for combo in itertools.product(*[vals for _, vals in grid]):
            for i in range(seeds):
                cell = Cell(method, base.seed + i, tuple(zip(keys, combo)))
                try:
                    cfg = load_config(config, overrides + (method_overrides or {}).get(method, [])
                                      + cell.overrides())
                except ConfigError as exc:
                    raise ConfigError(f"cell {cell.name}: {exc}") from None
                cells.append((cell, non_private_dp(cfg)))  # a non-private cell reads nothing of [dp]
    return cells


def run_compare(cells: list[tuple[Cell, ExperimentConfig]], out: Path, progress: bool = True, log=print,
                jobs: int = 1) -> Path:
    """Run every unfinished cell (resuming checkpointed ones), then write the report.

    ``jobs > 1`` runs that many cells at once, each in its own process with ``cpu_count // jobs`` torch threads
    (small models use two cores better as two one-thread runs than as one two-thread run: docs/benchmarks.md).
    A cell's results do not depend on ``jobs`` beyond the float rounding of a different thread count.  When a cell
    fails, the cells already running finish, no new one starts, and the first error is raised."""
    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer, got {jobs}")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    plan = [{"cell": c.name, "method": c.method, "seed": c.seed, "grid": dict(c.grid)} for c, _ in cells]
    (out / "compare.json").write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    todo = []
    for i, (cell, cfg) in enumerate(cells, 1):
        d = out / "cells" / cell.name
        if (d / "summary.json").is_file():
            # compared as settings, not text: a key added by a later fedlora version reads as its default
            kept = from_toml((d / "config.toml").read_text(encoding="utf-8"), where=f"{d / 'config.toml'}")
            if to_toml(result_settings(kept)) != to_toml(result_settings(cfg)):
                raise ConfigError(f"cell {cell.name} in {out} finished with a different configuration than this "
                                  f"command gives it; use another --out (or the original options) so results of "
                                  f"different settings are not mixed")
            log(f"[{i}/{len(cells)}] {cell.name}: finished earlier, kept")
            continue
        todo.append((i, cell, cfg, d))
    if jobs == 1 or len(todo) <= 1:
        for i, cell, cfg, d in todo:
            log(f"[{i}/{len(cells)}] {cell.name}: {_start_cell(d)}")
            _run_cell(cfg, d, progress, 0)
    else:
        _run_parallel(todo, len(cells), jobs, log)
    report_compare(out)
    return out


def _start_cell(d: Path) -> str:
    """Resume a checkpointed cell; clear one that started but completed no round (nothing to keep)."""
    if (d / "checkpoint" / "checkpoint.json").is_file():
        return "resuming"
    if d.exists():
        shutil.rmtree(d)
    return "running"


def _run_cell(cfg: ExperimentConfig, d: Path, progress: bool, threads: int) -> None:
    import torch

    from fedlora.engine.simulation import run_experiment

    if threads:  # a spawned worker: the same quiet console as the parent's
        from fedlora.console import quiet_console

        quiet_console()
        torch.set_num_threads(threads)
    run_experiment(cfg, out_dir=d, progress=progress, log=lambda *_: None,
                   resume=(d / "checkpoint" / "checkpoint.json").is_file())


def _run_parallel(todo: list, total: int, jobs: int, log) -> None:
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = list(todo)
    running: dict = {}
    first_error: BaseException | None = None
    # spawn, not fork: a forked child would inherit torch's thread pools and the parent's open files
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            while pending and len(running) < jobs and first_error is None:
                i, cell, cfg, d = pending.pop(0)
                log(f"[{i}/{total}] {cell.name}: {_start_cell(d)} (in parallel, {threads} thread(s))")
                running[pool.submit(_run_cell, cfg, d, False, threads)] = (i, cell)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i, cell = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    log(f"[{i}/{total}] {cell.name}: failed: {exc}")
                    first_error = first_error or exc
                else:
                    log(f"[{i}/{total}] {cell.name}: done")
    if first_error is not None:
        raise first_error


# ---------------------------------------------------------------------------------------------------------------
# Report (also `fedlora report DIR`)
# ---------------------------------------------------------------------------------------------------------------

def _cell_results(out: Path) -> list[dict]:
    plan = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    results = []
    for entry in plan:
        d = out / "cells" / entry["cell"]
        summary = d / "summary.json"
        if not summary.is_file():
            continue
        results.append({**entry, "summary": json.loads(summary.read_text()), "metrics": read_metrics(d)})
    return results


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def report_compare(out: Path) -> list[dict]:
    """summary.csv / summary.md (mean ± std per method × grid cell) and plots, from saved metrics only."""
    out = Path(out)
    results = _cell_results(out)
    if not results:
        raise ConfigError(f"{out} has no finished cells to report")
    grid_keys = list(results[0]["grid"])
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], *[r["grid"][k] for k in grid_keys]), []).append(r)
    rows = []
    for key, rs in groups.items():
        acc_m, acc_s = _mean_std([r["summary"]["final_accuracy"] for r in rs])
        score_m, score_s = _mean_std([_score(r["summary"]) for r in rs])
        eps = [r["summary"].get("max_epsilon") for r in rs]
        rows.append({"method": key[0], **dict(zip(grid_keys, key[1:])), "seeds": len(rs),
                     "final_accuracy_mean": acc_m, "final_accuracy_std": acc_s,
                     "metric": rs[0]["summary"].get("headline_metric", "accuracy"),
                     "final_score_mean": score_m, "final_score_std": score_s,
                     "total_upload_bytes": _mean_std([r["summary"]["total_upload_bytes"] for r in rs])[0],
                     "total_download_bytes": _mean_std([r["summary"]["total_download_bytes"] for r in rs])[0],
                     "max_epsilon": _mean_std(eps)[0] if any(e is not None for e in eps) else None,
                     "wall_s": _mean_std([r["summary"]["wall_s"] for r in rs])[0]})
    cols = list(rows[0])
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    (out / "summary.md").write_text(_markdown(rows, grid_keys), encoding="utf-8")
    _plot_compare(results, grid_keys, rows, out)
    return rows


def _score(summary: dict) -> float | None:
    """A run's headline number: ``final_score`` (accuracy, or unseen-task Rouge-L for instruction tasks)."""
    return summary.get("final_score", summary.get("final_accuracy"))


def _per_round_key(metrics: list[dict]) -> str:
    return "accuracy" if any(m.get("accuracy") is not None for m in metrics) else "rougeL_teacher_forced"


def _markdown(rows: list[dict], grid_keys: list[str]) -> str:
    metric = rows[0]["metric"] if rows else "accuracy"
    head = ["method", *grid_keys, "seeds", f"final {metric}", "upload (MB)", "max ε"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        eps = "–" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        lines.append("| " + " | ".join([r["method"], *[str(r[k]) for k in grid_keys], str(r["seeds"]),
                                        f"{r['final_score_mean']:.4f} ± {r['final_score_std']:.4f}",
                                        f"{r['total_upload_bytes'] / 1e6:.2f}", eps]) + " |")
    lines += ["", f"Who won where (highest mean final {metric}; margin to the runner-up):", ""]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in grid_keys), []).append(r)
    for key, rs in cells.items():
        rs = sorted(rs, key=lambda r: -r["final_score_mean"])
        where = ", ".join(f"{k}={v}" for k, v in zip(grid_keys, key)) or "all runs"
        if len(rs) == 1:
            lines.append(f"- {where}: {rs[0]['method']} (only method)")
            continue
        margin = rs[0]["final_score_mean"] - rs[1]["final_score_mean"]
        noise = max(rs[0]["final_score_std"], rs[1]["final_score_std"])
        verdict = "" if margin > noise else " — within one standard deviation, not a clear win"
        lines.append(f"- {where}: **{rs[0]['method']}** by {margin:+.4f} over {rs[1]['method']}{verdict}")
    return "\n".join(lines) + "\n"


def _plot_compare(results: list[dict], grid_keys: list[str], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels: dict[tuple, dict[str, list[list[float]]]] = {}
    for r in results:
        key = tuple(r["grid"][k] for k in grid_keys)
        per_round = _per_round_key(r["metrics"])
        acc = [m.get(per_round) for m in r["metrics"]]
        panels.setdefault(key, {}).setdefault(r["method"], []).append(acc)
    # one row per value of the earlier grid keys, one column per value of the last (wrapped at 4): a 2 × 3 grid of
    # partitions × epsilons reads as a table; one y scale for all panels so they compare at a glance
    last_values = {key[-1] for key in panels} if grid_keys else set()
    ncols = len(last_values) if 1 <= len(last_values) <= 4 else min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, by_method) in zip(axes.flat, panels.items()):
        for method, curves in sorted(by_method.items()):
            n = min(len(c) for c in curves)
            a = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)
            evaluated = ~np.isnan(a).all(axis=0)  # rounds between evaluations have no accuracy in any seed
            a, x = a[:, evaluated], np.arange(1, n + 1)[evaluated]
            mean, std = np.nanmean(a, axis=0), np.nanstd(a, axis=0)
            ax.plot(x, mean, marker="o", label=f"{method} (n={len(curves)})")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set(title=", ".join(f"{k}={v}" for k, v in zip(grid_keys, key)) or per_round, xlabel="round",
               ylabel="validation accuracy" if per_round == "accuracy" else "unseen-task Rouge-L (teacher-forced)")
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, max(3.4, 1.2 + 0.28 * len(rows))))
    labels = [" ".join([r["method"], *[f"{k}={r[k]}" for k in grid_keys]]) for r in rows]
    ax.barh(labels, [r["total_upload_bytes"] / 1e6 for r in rows])
    ax.set(xlabel="total upload per run (MB, measured)", title="communication")
    fig.tight_layout()
    fig.savefig(out / "communication.png", dpi=110)
    plt.close(fig)
    _plot_privacy(results, grid_keys, out, plt)


def _plot_privacy(results: list[dict], grid_keys: list[str], out: Path, plt) -> None:
    """privacy.png: the ε each private cell had spent after every round (max over its clients, mean over seeds)."""
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, list[list[float]]] = {}
    for r in results:
        eps = [m.get("epsilon") for m in r["metrics"]]
        if any(e is not None for e in eps):
            label = " ".join([r["method"], *[f"{k}={r['grid'][k]}" for k in grid_keys if k != "dp.epsilon"]])
            curves.setdefault(f"{label} (ε target {r['grid'].get('dp.epsilon', '')})".replace(" (ε target )", ""),
                              []).append([np.nan if e is None else e for e in eps])
    if not curves:
        (out / "privacy.png").unlink(missing_ok=True)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, cs in sorted(curves.items()):
        n = min(len(c) for c in cs)
        ax.plot(np.arange(1, n + 1), np.nanmean(np.array([c[:n] for c in cs], dtype=float), axis=0), marker=".",
                label=label)
    ax.set(xlabel="round", ylabel="ε spent (max over clients)", title="privacy budget spent")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=110)
    plt.close(fig)


def report_run(run_dir: Path) -> None:
    """Regenerate metrics.csv and metrics.png of one run from its metrics.jsonl."""
    from fedlora.report import MetricsLog, plot_run

    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no rounds yet: nothing to report")
    log = MetricsLog(run_dir)
    log.rows = rows
    log.write_csv()
    plot_run(rows, Path(run_dir) / "metrics.png", title=Path(run_dir).name)

"""The Python API: what every CLI command calls, usable from a script or a notebook.

    import fedlora
    summary = fedlora.run("examples/tiny.toml", ["method=fedit", "rounds=2"], out="runs/tiny")
    rows = fedlora.compare("examples/tiny.toml", methods=["fedit", "ffa"], seeds=2, out="runs/cmp")
    fedlora.predict(summary["run_dir"], ["a gripping, beautifully acted film"])
    fedlora.export_merged(summary["run_dir"], "out/model")

Each function validates its input before any model loads and raises :class:`fedlora.FedloraError` subclasses
(``ConfigError``, ``DataError``, ``ModelError``, ``PrivacyBudgetError``) with one clear message; the CLI turns them
into exit status 2.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedlora.config import ExperimentConfig, load_config, with_overrides
from fedlora.config_ignored import ignored_settings, refuse_ignored
from fedlora.errors import ConfigError


def _config(config, overrides: Iterable[str]) -> ExperimentConfig:
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'KEY=VALUE' strings, not one string")
    if isinstance(config, ExperimentConfig):
        return with_overrides(config, list(overrides))
    if config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(f"config must be a TOML file path, an ExperimentConfig or None, got {type(config).__name__}")
    return load_config(config, list(overrides))


def run(config: str | Path | ExperimentConfig | None = None, overrides: Iterable[str] = (),
        out: str | Path | None = None, *, resume: str | Path | None = None, progress: bool = True,
        log=print) -> dict:
    """Run one federated experiment in this process and return its summary (``summary.json``, plus ``run_dir``).

    ``config``: a TOML file (``None`` = the defaults: FFA-LoRA on the bundled MiniLM and SST-2), ``overrides``:
    ``KEY=VALUE`` strings as ``--set`` takes them, ``out``: the run directory (default ``runs/<time>-<method>``).
    ``resume=RUN_DIR`` continues an interrupted run from its last checkpoint with the run's own ``config.toml``
    (``config`` may name the same settings; only ``rounds`` may grow)."""
    from fedlora.engine.simulation import run_experiment

    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise ConfigError("--resume RUN_DIR continues in RUN_DIR; drop --out")
        saved = Path(resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"{resume} is not a run directory (no config.toml)")
        cfg = _config(config if config is not None else saved, overrides)
        out = resume
    else:
        cfg = _config(config, overrides)
        refuse_ignored(cfg)
    result = run_experiment(cfg, out_dir=out, progress=progress, log=log, resume=resume is not None)
    summary = json.loads((result.run_dir / "summary.json").read_text(encoding="utf-8"))
    return {**summary, "run_dir": str(result.run_dir)}


def plan(config: str | Path | ExperimentConfig | None = None, overrides: Iterable[str] = (),
         out: str | Path | None = None, log=print) -> dict:
    """Validate everything a run needs — config, data, partition, model, ranks, DP budget — and return the plan
    (``fedlora run --dry-run``) without training: clients and their data, ranks, local steps, σ, and round 1's
    traffic, measured by encoding the plans the method would send.  Loads the model; writes nothing."""
    from fedlora import wire
    from fedlora.client import steps_per_round
    from fedlora.engine.preflight import preflight_model
    from fedlora.engine.prepare import prepare, sample_clients
    from fedlora.engine.rundir import check_run_dir
    from fedlora.engine.runtime import build_engine, build_method
    from fedlora.ranks import describe_config

    cfg = _config(config, overrides)
    refuse_ignored(cfg)
    if out is not None:
        check_run_dir(Path(out))
    preflight_model(cfg)
    prepared = prepare(cfg)
    eng = build_engine(prepared, log=lambda *_: None)
    method = build_method(cfg, eng.spec)
    state = method.init_state(eng.spec.initial(ranks=eng.default_ranks))
    sampled = sample_clients(cfg.seed, 1, len(prepared.clients), cfg.clients.fraction)
    plans = method.configure(1, state, sampled)
    down = up = 0
    for p in plans:
        down += len(wire.encode(p.download)) + (len(wire.encode(p.merge)) if p.merge else 0)
        adapter = eng.spec.initial(ranks=p.ranks or eng.spec.client_ranks[p.client_id])
        sent = {k: v for k, v in adapter.to_flat(p.upload).items()
                if p.modules is None or k.rsplit(".lora_", 1)[0] in p.modules}
        up += len(wire.encode(sent))
    clients = [{"client": k, "train_examples": len(c.train_rows), "validation_examples": len(c.val_rows),
                "ranks": describe_config(prepared.rank_configs[k]),
                "local_steps": steps_per_round(cfg.train, len(c.train_rows))}
               for k, c in enumerate(prepared.clients)]
    first = {c: k for k, c in reversed(list(enumerate(prepared.rank_configs)))}  # one client per configuration
    if prepared.privacy:
        for row in clients:
            priv = prepared.privacy[row["client"]]
            row.update(noise_multiplier=priv.noise_multiplier, sample_rate=priv.sample_rate)
    return {"method": cfg.method, "model": cfg.model.name, "rounds": cfg.rounds, "clients": clients,
            "clients_per_round": len(sampled), "round1_download_bytes": down, "round1_upload_bytes": up,
            "trainable_parameters": {describe_config(c): eng.spec.initial(ranks=eng.spec.client_ranks[k])
                                     .num_parameters(plans[0].train) for c, k in first.items()},
            "dp": ({"epsilon": cfg.dp.epsilon, "delta": cfg.dp.delta, "clip": cfg.dp.clip} if cfg.dp.enabled
                   else None),
            "validation_examples": len(prepared.task.val_rows)}


def compare(config: str | Path | None = None, methods: Iterable[str] = ("fedit", "ffa"),
            overrides: Iterable[str] = (), *, out: str | Path, seeds: int = 1,
            grid: Mapping[str, Iterable] | Iterable[str] | None = None,
            method_overrides: Mapping[str, Iterable[str]] | Iterable[str] | None = None, jobs: int = 1,
            progress: bool = True, log=print) -> list[dict]:
    """Run a grid of methods × seeds × config values on identical partitions (``fedlora compare``) and return one
    row per method × grid cell (mean and standard deviation over seeds, as ``summary.csv``).

    ``grid``: ``{"train.lr": [1e-3, 1e-2]}`` or ``["train.lr=1e-3,1e-2"]``; ``method_overrides``:
    ``{"fedit": ["train.lr=1e-3"]}`` or ``["fedit:train.lr=1e-3"]``.  Re-running with the same ``out`` resumes:
    finished cells are kept, interrupted ones continue from their checkpoint."""
    from fedlora.grid import parse_grid, parse_method_overrides, plan_cells, run_compare, report_compare

    if isinstance(methods, str):
        methods = methods.split(",")
    methods = [m.strip() for m in methods if m.strip()]
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'KEY=VALUE' strings, not one string")
    if isinstance(grid, Mapping):
        grid = [f"{k}={','.join(_grid_value(v) for v in values)}" for k, values in grid.items()]
    if isinstance(method_overrides, Mapping):
        method_overrides = [f"{m}:{o}" for m, items in method_overrides.items() for o in items]
    cells = plan_cells(None if config is None else str(config), list(overrides), methods, seeds,
                       parse_grid(list(grid or [])), parse_method_overrides(list(method_overrides or []), methods))
    log(f"fedlora compare: {len(cells)} runs ({len(methods)} methods x {seeds} seeds x grid) -> {out}")
    for cell, cfg in cells:  # a shared config may carry keys only some methods read: say so, once per cell
        ignored = ignored_settings(cfg)
        if ignored:
            log(f"note: cell {cell.name} ignores " + ", ".join(k for k, _ in ignored) + " ("
                + "; ".join(sorted({why for _, why in ignored})) + ")")
    path = run_compare(cells, Path(out), progress=progress, log=log, jobs=jobs)
    return report_compare(path)


def _grid_value(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    if "," in text:
        raise ConfigError(f"a grid value cannot contain a comma: {text!r}")
    return text

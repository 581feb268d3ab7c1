"""The run directory: opening it, the files written once (``config.toml``, ``clients.json``), the exported
``adapter/``, resume checks and the fault points the reliability tests kill the process at."""
from __future__ import annotations

import json
import os
import signal
from datetime import datetime
from pathlib import Path

from fedlora.adapters import Adapter
from fedlora.checkpoint import CheckpointError
from fedlora.config import ExperimentConfig, from_toml, to_dict
from fedlora.engine.prepare import Prepared
from fedlora.engine.runtime import Engine, adapter_fits
from fedlora.errors import ConfigError
from fedlora.methods.base import FederationSpec, ServerState
from fedlora.lora import save_default_adapter
from fedlora.models import ADAPTER_INFO, adapter_info, export_peft_adapter, resolve_model_path
from fedlora.ranks import describe_config


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.method}"


def check_run_dir(path: Path) -> Path:
    """Refuse a run directory that holds a run or cannot be created, without creating anything (before any work)."""
    path = Path(path)
    if (path / "metrics.jsonl").exists() or (path / "adapter").exists():
        raise ConfigError(f"run directory {path} already holds a run; continue it with --resume {path} or choose "
                          f"another --out")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cannot use {path} as the run directory: it is a file")
    existing = next((p for p in [path, *path.absolute().parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot use {path} as the run directory: {existing} is not writable")
    return path


def open_run_dir(path: Path) -> Path:
    """Create the run directory (after :func:`check_run_dir`, once the model has loaded: a refused run leaves none)."""
    path = check_run_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot use {path} as the run directory: {exc.strerror or exc}") from None
    return path


def fault_point(phase: str, round_idx: int) -> None:
    """Fault injection for reliability tests: ``FEDLORA_FAULT=PHASE@ROUND`` kills this process (SIGKILL, like a
    power cut) when the run reaches that phase of that round.  Phases: ``train`` (after the first client trained),
    ``aggregate`` (after aggregation and evaluation), ``checkpoint`` (tensor file written, commit point not yet),
    ``metrics`` (checkpoint committed, metrics files not yet appended)."""
    if os.environ.get("FEDLORA_FAULT") == f"{phase}@{round_idx}":
        os.kill(os.getpid(), signal.SIGKILL)


def check_resume_config(saved_toml: str, cfg: ExperimentConfig) -> None:
    """A resumed run must use the configuration it started with; only ``rounds`` may grow."""
    from fedlora.config_ignored import result_settings

    # compared as far as they make results: settings the run ignores, [track] (where results are reported) may differ
    saved = to_dict(result_settings(from_toml(saved_toml, "the checkpoint's config")))
    now = to_dict(result_settings(cfg))
    diffs = []
    for section, values in now.items():
        if isinstance(values, dict):
            diffs += [f"{section}.{k}: {saved[section][k]!r} -> {v!r}" for k, v in values.items()
                      if saved[section][k] != v]
        elif section != "rounds" and saved[section] != values:
            diffs.append(f"{section}: {saved[section]!r} -> {values!r}")
    if now["rounds"] < saved["rounds"]:
        diffs.append(f"rounds: {saved['rounds']} -> {now['rounds']} (rounds may only grow)")
    if diffs:
        raise CheckpointError("the configuration differs from the one the run started with: " + "; ".join(diffs)
                              + ". Resume with the run's own config.toml (only rounds may be raised).")



def write_clients_file(run_dir: Path, prepared: Prepared, spec: FederationSpec) -> None:
    """``clients.json``: every client's task, data sizes and LoRA ranks (written once, at the start)."""
    rows = [{"client": k, "task": c.name or None, "train_examples": len(c.train_rows),
             "validation_examples": len(c.val_rows), "rank_type": describe_config(prepared.rank_configs[k]),
             "ranks": sorted(set(spec.client_ranks[k].values()))} for k, c in enumerate(prepared.clients)]
    data = {"clients": rows, "heldout_tasks": prepared.heldout}
    if spec.memory is not None:
        for row in rows:
            row["memory_budget_mb"] = spec.budgets[row["client"]] / 1e6
        mm = spec.memory
        data["memory_model"] = {"calibrated": mm.calibrated, "step_mb": mm.step_bytes / 1e6,
                                "per_layer_activation_mb": [a / 1e6 for a in mm.act_bytes],
                                "per_layer_grad_and_optimiser_mb": [g / 1e6 for g in mm.grad_state_bytes],
                                "all_layers_mb": mm.predict(range(mm.num_layers)) / 1e6,
                                "calibration_measurements_mb": {k: v / 1e6 for k, v in mm.measurements.items()}}
    (run_dir / "clients.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")



def export_adapter(eng: Engine, method, state: ServerState, final: Adapter, run_dir: Path,
                   name: str = "adapter") -> None:
    """Write ``adapter/`` (or ``name``) atomically (temporary folder, then rename): PEFT's own ``save_pretrained``
    when the final adapter fits the model's LoRA layers, else a PEFT folder with per-module ranks
    (``rank_pattern``)."""
    import shutil

    tmp, target = run_dir / f"{name}.tmp", run_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_fits(final, eng.default_ranks) and method.base_delta(state) is None and not eng.spec.core:
        eng.pool.slots(eng.default_ranks).load(final)
        save_default_adapter(eng.model, tmp)
    else:
        export_peft_adapter(final, eng.prepared.cfg.lora, eng.task_type,
                            resolve_model_path(eng.prepared.cfg.model.name, eng.prepared.cfg.model), tmp)
    cfg = eng.prepared.cfg
    task = eng.prepared.task
    info = adapter_info(eng.model, cfg, getattr(task, "label_names", None), task.recorded_columns(cfg.data))
    (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


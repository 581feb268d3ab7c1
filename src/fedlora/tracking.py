"""Experiment tracking: the run's per-round metrics, its configuration and, at the end, its adapter and plots, sent to
TensorBoard, MLflow or Weights & Biases (``[track]``; each optional and imported only when asked for).

What each backend receives:

* **TensorBoard** (``track.tensorboard = true``): event files in ``<run>/tensorboard``: every numeric metric of
  every round as a scalar (step = round), the configuration and the summary as text, the metrics plot as an image.
* **MLflow** (``track.mlflow = URI``): a run in experiment ``track.experiment``: the configuration as parameters
  (``section.key``), every numeric metric per round (step = round), the summary's numbers as final metrics, and as
  artefacts ``adapter/``, ``metrics.png``, ``metrics.csv``, ``summary.json`` and ``config.toml``.
* **Weights & Biases** (``track.wandb = "offline" | "online"``): a run in project ``track.experiment`` with files
  under ``<run>/wandb``: the configuration, per-round metrics, the summary, and an artefact (type ``model``) holding
  the adapter, the plot and the summary.

The ids of the MLflow and W&B runs are kept in ``<run>/tracking.json``: ``--resume`` reattaches to the same runs
(TensorBoard drops any event at or after the round it resumes from, so a round is never shown twice).  A run inside a
``fedlora compare`` directory is grouped by that directory's name (a W&B group, an MLflow tag ``fedlora.group``);
its name is the cell's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fedlora.config import to_dict, to_toml

IDS_FILE = "tracking.json"


def _numbers(row: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics row (per-client lists and dicts are left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "round"}


def _flat_config(cfg) -> dict[str, str]:
    out = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()})
        else:
            out[section] = str(values)
    return out


def _group_and_name(run_dir: Path) -> tuple[str | None, str]:
    run_dir = Path(run_dir).absolute()
    if run_dir.parent.name == "cells":  # a fedlora compare cell
        return run_dir.parent.parent.name, run_dir.name
    return None, run_dir.name


class _TensorBoard:
    def __init__(self, cfg, run_dir: Path, start_round: int, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # resumed: drop every event after the last round the trackers were known to receive (it is sent again)
        purge = ids.get("logged_round", start_round - 1) + 1 if start_round > 1 else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if start_round == 1:
            self.writer.add_text("config", "```toml\n" + to_toml(cfg) + "```", 0)

    def log_round(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["round"])
        self.writer.flush()

    def finish(self, summary: dict, run_dir: Path) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=1) + "\n```", summary["rounds"])
        plot = run_dir / "metrics.png"
        if plot.is_file():
            import matplotlib.image

            self.writer.add_image("metrics", matplotlib.image.imread(str(plot))[..., :3], summary["rounds"],
                                  dataformats="HWC")

    def close(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, cfg, run_dir: Path, start_round: int, ids: dict):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        uri = cfg.track.mlflow
        if uri.startswith("sqlite:///"):  # a new local store: its folder may not exist yet
            Path(uri[len("sqlite:///"):]).absolute().parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        group, name = _group_and_name(run_dir)
        if ids.get("mlflow_uri") != uri:  # a resumed run pointed at another store starts a run there
            ids.pop("mlflow_run_id", None)
        ids["mlflow_uri"] = uri
        if ids.get("mlflow_run_id"):
            self.run_id = ids["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.track.experiment)
            if exp is None:
                exp_id = self.client.create_experiment(cfg.track.experiment, artifact_location=_artifact_root(cfg))
            else:
                exp_id = exp.experiment_id
            tags = {"fedlora.method": cfg.method, "fedlora.run_dir": str(Path(run_dir).absolute()),
                    "mlflow.runName": name}
            if group:
                tags["fedlora.group"] = group
            self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            params = [mlflow.entities.Param(k, v[:6000]) for k, v in _flat_config(cfg).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        ids["mlflow_run_id"] = self.run_id

    def log_round(self, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["round"]) for k, v in _numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict, run_dir: Path) -> None:
        for key, value in _numbers({k: v for k, v in summary.items() if k != "rounds"}).items():
            self.client.log_metric(self.run_id, f"final/{key}", value, step=summary["rounds"])
        self.client.log_artifacts(self.run_id, str(run_dir / "adapter"), "adapter")
        for name in ("metrics.png", "metrics.csv", "summary.json", "config.toml"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


def _artifact_root(cfg) -> str | None:
    """A new experiment on a local SQLite store keeps its artefacts beside the database (MLflow's default would be
    ``./mlruns`` in whatever directory the run was started from)."""
    uri = cfg.track.mlflow
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).absolute().parent / "mlartifacts")
    return None


class _Wandb:
    def __init__(self, cfg, run_dir: Path, start_round: int, ids: dict):
        import os

        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        group, name = _group_and_name(run_dir)
        kwargs = {"id": ids["wandb_run_id"], "resume": "allow"} if ids.get("wandb_run_id") else {}
        self.run = wandb.init(mode=cfg.track.wandb, project=cfg.track.experiment, dir=str(run_dir), name=name,
                              group=group, config=to_dict(cfg), reinit="create_new", **kwargs)
        ids["wandb_run_id"] = self.run.id

    def log_round(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["round"])

    def finish(self, summary: dict, run_dir: Path) -> None:
        import wandb

        for key, value in _numbers(summary).items():
            self.run.summary[f"final/{key}"] = value
        art = wandb.Artifact(f"adapter-{self.run.id}", type="model",
                             metadata={k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        art.add_dir(str(run_dir / "adapter"), name="adapter")
        for name in ("metrics.png", "summary.json", "config.toml"):
            if (run_dir / name).is_file():
                art.add_file(str(run_dir / name))
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Trackers:
    """The run's trackers (none when ``[track]`` asks for none: nothing is imported then)."""

    def __init__(self, backends: list, run_dir: Path | None, ids: dict | None = None):
        self.backends, self.run_dir, self.ok, self.ids = backends, run_dir, False, ids or {}

    @classmethod
    def open(cls, cfg, run_dir: Path, start_round: int = 1, rows: list[dict] = ()) -> "Trackers":
        """Start (or, on resume, reattach to) the backends; ``rows`` are the metrics rows the run already has: those
        after the last round the trackers received (a run killed between its checkpoint and the trackers) are sent
        now, so every round reaches them exactly once."""
        from fedlora.errors import ConfigError, FedloraError

        t = cfg.track
        if not (t.tensorboard or t.mlflow or t.wandb):
            return cls([], None)
        ids_file = Path(run_dir) / IDS_FILE
        ids = json.loads(ids_file.read_text(encoding="utf-8")) if ids_file.is_file() else {}
        backends: list = []
        for key, make in (("tensorboard", lambda: _TensorBoard(cfg, run_dir, start_round, ids)),
                          ("mlflow", lambda: _MLflow(cfg, run_dir, start_round, ids)),
                          ("wandb", lambda: _Wandb(cfg, run_dir, start_round, ids))):
            if not getattr(t, key):
                continue
            try:
                backends.append(make())
            except FedloraError:
                raise
            except Exception as exc:  # an unreachable server, no login, a bad URI: one clear message
                for b in backends:
                    b.close(False)
                raise ConfigError(f"track.{key} = {getattr(t, key)!r}: cannot start tracking "
                                  f"({type(exc).__name__}: {exc})") from None
        trackers = cls(backends, Path(run_dir), ids)
        for row in rows:
            if ids.get("logged_round", 0) < row["round"] < start_round:
                trackers.log_round(row)
        trackers._save()
        return trackers

    def _save(self) -> None:
        (self.run_dir / IDS_FILE).write_text(json.dumps(self.ids, indent=1) + "\n", encoding="utf-8")

    def log_round(self, row: dict) -> None:
        if not self.backends:
            return
        for b in self.backends:
            b.log_round(row)
        self.ids["logged_round"] = row["round"]
        self._save()

    def finish(self, summary: dict) -> None:
        for b in self.backends:
            b.finish(summary, self.run_dir)
        self.ok = True

    def close(self) -> None:
        for b in self.backends:
            b.close(self.ok)
        self.backends = []

"""Experiment tracking (issue 19): TensorBoard, MLflow (a local SQLite store) and W&B (offline), each read back."""
import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import fedlora

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

BASE = ["model.max_length=32", "data.max_train_examples=60", "data.max_eval_examples=20", "clients.num=2",
        "clients.partition=iid", "train.local_steps=2", "model.threads=1"]
KEYS = ["track.tensorboard=true", "track.wandb=offline", "track.experiment=fedlora-tests"]


def _mlflow_uri(root: Path) -> str:
    return f"track.mlflow=sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, toy_model_dir):
    """One run of 2 rounds, and one stopped after round 1 then resumed to round 2 (same tracking runs)."""
    root = tmp_path_factory.mktemp("tracking")
    quiet = {"progress": False, "log": lambda *_: None}
    args = [*BASE, f"model.name={toy_model_dir}", *KEYS, _mlflow_uri(root)]
    full = fedlora.run(None, [*args, "rounds=2"], out=root / "full", **quiet)
    fedlora.run(None, [*args, "rounds=1"], out=root / "resumed", **quiet)
    ids_after_round_1 = json.loads((root / "resumed" / "tracking.json").read_text())
    resumed = fedlora.run(None, [*args, "rounds=2"], resume=root / "resumed", **quiet)
    return root, full, resumed, ids_after_round_1


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("which", ["full", "resumed"])
def test_tensorboard_events_hold_every_round_once(tracked, which):
    root, *_ = tracked
    acc = _tensorboard(root / which)
    rows = _metrics(root / which)
    for key in ("accuracy", "eval_loss", "upload_bytes", "loss"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]  # a resumed run shows round 1 once
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    tags = acc.Tags()
    assert "config/text_summary" in tags["tensors"] and "summary/text_summary" in tags["tensors"]
    assert tags["images"] == ["metrics"]


@pytest.mark.parametrize("which", ["full", "resumed"])
def test_mlflow_run_has_params_metrics_and_artifacts(tracked, which):
    from mlflow.tracking import MlflowClient

    root, _, _, ids_1 = tracked
    run_id = json.loads((root / which / "tracking.json").read_text())["mlflow_run_id"]
    if which == "resumed":
        assert run_id == ids_1["mlflow_run_id"]  # --resume reattached
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == which
    assert run.data.params["method"] == "ffa" and run.data.params["lora.rank"] == "8"
    assert run.data.params["clients.num"] == "2" and run.data.params["track.experiment"] == "fedlora-tests"
    history = client.get_metric_history(run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(r["round"], pytest.approx(r["accuracy"]))
                                                          for r in _metrics(root / which)]
    summary = json.loads((root / which / "summary.json").read_text())
    assert run.data.metrics["final/final_score"] == pytest.approx(summary["final_score"])
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "metrics.png", "metrics.csv", "summary.json", "config.toml"} <= top
    assert {"adapter/adapter_model.safetensors", "adapter/README.md"} <= {a.path for a in
                                                                          client.list_artifacts(run_id, "adapter")}
    assert client.get_experiment(run.info.experiment_id).name == "fedlora-tests"


def _wandb_records(run_dir) -> list:
    """Every record of the offline runs under ``run_dir/wandb``, read with W&B's own protobuf schema from the
    LevelDB-style log it writes (7-byte file header; 32 KiB blocks of CRC, length, type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B"
        pos, buf, block = 7, b"", 32768
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if size == 0 and kind == 0:
                pos += block - pos % block
                continue
            chunk, pos = data[pos + 7:pos + 7 + size], pos + 7 + size
            if kind == 1:
                buf = chunk
            elif kind in (2, 3):
                buf = (b"" if kind == 2 else buf) + chunk
                continue
            else:
                buf += chunk
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


@pytest.mark.parametrize("which", ["full", "resumed"])
def test_wandb_offline_run_has_config_history_and_the_adapter(tracked, which):
    root, _, _, ids_1 = tracked
    run_id = json.loads((root / which / "tracking.json").read_text())["wandb_run_id"]
    if which == "resumed":
        assert run_id == ids_1["wandb_run_id"]
    records = _wandb_records(root / which)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {run_id} and runs[0].project == "fedlora-tests"
    config = {u.key: json.loads(u.value_json) for r in runs for u in r.config.update}
    assert config["method"] == "ffa" and config["lora"]["rank"] == 8
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                     for i in r.history.item}) for r in records
               if r.WhichOneof("record_type") == "history"]
    rows = _metrics(root / which)
    assert sorted({step: h["accuracy"] for step, h in history}.items()) == [
        (r["round"], pytest.approx(r["accuracy"])) for r in rows]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    # the resumed run finished once after round 1 (rounds = 1) and again after round 2: an artefact each time
    assert len(artifacts) == (1 if which == "full" else 2) and all(a.type == "model" for a in artifacts)
    paths = {m.path for m in artifacts[-1].manifest.contents}
    assert {"adapter/adapter_model.safetensors", "adapter/README.md", "metrics.png", "summary.json"} <= paths


def test_compare_cells_are_grouped_by_the_comparison(tmp_path, toy_model_dir):
    from mlflow.tracking import MlflowClient

    fedlora.compare(None, ["fedit", "ffa"], [*BASE, "rounds=1", f"model.name={toy_model_dir}", "track.wandb=offline",
                                             "track.experiment=fedlora-cmp", _mlflow_uri(tmp_path)],
                    out=tmp_path / "grid-a", progress=False, log=lambda *_: None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedlora-cmp")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["method=fedit__seed=0", "method=ffa__seed=0"]
    assert {r.data.tags["fedlora.group"] for r in runs} == {"grid-a"}
    records = _wandb_records(tmp_path / "grid-a" / "cells" / "method=ffa__seed=0")
    assert [r.run.run_group for r in records if r.WhichOneof("record_type") == "run"] == ["grid-a"]


def test_a_plain_run_imports_no_tracking_package(tmp_path, toy_model_dir):
    code = ("import sys, fedlora; fedlora.run(None, sys.argv[1:], progress=False, log=lambda *_: None); "
            "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb', 'torch.utils.tensorboard') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *BASE, "rounds=1", f"model.name={toy_model_dir}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_tracking_package_is_refused_at_the_door(monkeypatch):
    import importlib.util

    from fedlora.config import load_config
    from fedlora.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"track.mlflow needs the 'mlflow' package: pip install 'fedlora\[mlflow\]'"):
        load_config(None, ["track.mlflow=sqlite:///x.db"])


def test_a_round_lost_between_checkpoint_and_trackers_is_sent_on_resume(tmp_path, toy_model_dir):
    """Killed (SIGKILL) after round 1's checkpoint but before the trackers got round 1: the resumed run sends it,
    and every round reaches TensorBoard and MLflow exactly once."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import fedlora_run

    args = [a for kv in [*BASE, "rounds=2", f"model.name={toy_model_dir}", "track.tensorboard=true",
                         _mlflow_uri(tmp_path)] for a in ("--set", kv)]
    killed = fedlora_run(*args, "--out", str(tmp_path / "run"), fault="metrics@1")
    assert killed.returncode == -9
    ids = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert ids.get("logged_round", 0) == 0  # round 1 was checkpointed, never tracked
    fedlora.run(None, [], resume=tmp_path / "run", progress=False, log=lambda *_: None)
    rows = _metrics(tmp_path / "run")
    assert [e.step for e in _tensorboard(tmp_path / "run").Scalars("accuracy")] == [1, 2]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow_run_id"]
    assert run_id == ids["mlflow_run_id"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "accuracy")) == [
        (r["round"], pytest.approx(r["accuracy"])) for r in rows]


def test_a_run_that_fails_is_marked_killed_and_a_bad_tracker_leaves_no_run_dir(tmp_path, toy_model_dir,
                                                                               monkeypatch):
    from mlflow.tracking import MlflowClient

    from fedlora.engine import loop
    from fedlora.errors import ConfigError

    real, calls = loop.evaluate_global, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate_global", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fedlora.run(None, [*BASE, "rounds=2", f"model.name={toy_model_dir}", _mlflow_uri(tmp_path)],
                    out=tmp_path / "run", progress=False, log=lambda *_: None)
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(loop, "evaluate_global", real)
    with pytest.raises(ConfigError, match="track.mlflow = 'file:///proc/nope': cannot start tracking"):
        fedlora.run(None, [*BASE, "rounds=1", f"model.name={toy_model_dir}", "track.mlflow=file:///proc/nope"],
                    out=tmp_path / "bad", progress=False, log=lambda *_: None)
    assert not (tmp_path / "bad").exists()


def test_a_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    from fedlora.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["track.mlflow=sqlite:///runs/m.db"]).track.mlflow == f"sqlite:///{tmp_path}/runs/m.db"
    (tmp_path / "c.toml").write_text('[track]\nmlflow = "sqlite:///db/m.db"\n')
    monkeypatch.chdir("/")
    assert load_config(tmp_path / "c.toml").track.mlflow == f"sqlite:///{tmp_path}/db/m.db"

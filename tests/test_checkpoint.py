"""Checkpoints: atomic, verified, exact resume after kill -9 at any phase of a round (issue: nothing lost)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fedlora.adapters import initial_adapter
from fedlora.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from fedlora.methods.base import ServerState
from tests.conftest import fedlora_run

TINY = ["--set", "rounds=3", "--set", "data.max_train_examples=60", "--set", "data.max_eval_examples=16",
        "--set", "clients.num=3", "--set", "clients.partition=iid", "--set", "train.local_steps=2",
        "--set", "train.batch_size=8", "--set", "model.max_length=24", "--set", "dp.enabled=true",
        "--set", "dp.noise_multiplier=1.0", "--set", "eval.max_client_examples=4",
        "--set", "server.optimizer=fedadam"]  # the server's moments must survive kill -9 too


def _state():
    ad = initial_adapter({"m": (6, 5), "n": (4, 4)}, rank=2, alpha=4.0, seed=0, head={"classifier.bias": torch.ones(2)})
    return ServerState(ad, {"momentum": torch.arange(3.0), "scores": [0.5, 0.25], "step": 7})


def test_round_trip_restores_everything(tmp_path):
    st = _state()
    save_checkpoint(tmp_path, 4, st, {0: [(1.0, 0.1, 20)]}, [{"round": 4, "accuracy": 0.5}], "method = 'ffa'\n")
    ck = load_checkpoint(tmp_path)
    assert ck.round == 4 and ck.metrics == [{"round": 4, "accuracy": 0.5}] and ck.accountant == {0: [(1.0, 0.1, 20)]}
    for k, v in st.adapter.to_flat().items():
        assert torch.equal(ck.state.adapter.to_flat()[k], v)
    assert torch.equal(ck.state.extra["momentum"], torch.arange(3.0))
    assert ck.state.extra["scores"] == [0.5, 0.25] and ck.state.extra["step"] == 7


def test_only_the_latest_tensor_file_is_kept(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, _state(), {}, [], "")
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["checkpoint.json", "state-3.safetensors"]


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    save_checkpoint(tmp_path, 1, _state(), {}, [], "")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path).rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("damage, match", [
    ("flip_tensor_byte", "do not match their recorded SHA-256"),
    ("truncate_json", "corrupted"),
    ("delete_tensors", "missing"),
    ("delete_json", "no checkpoint"),
])
def test_corrupted_checkpoints_are_refused_and_left_alone(tmp_path, damage, match):
    save_checkpoint(tmp_path, 2, _state(), {}, [], "")
    d = tmp_path / "checkpoint"
    if damage == "flip_tensor_byte":
        p = d / "state-2.safetensors"
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "truncate_json":
        (d / "checkpoint.json").write_text((d / "checkpoint.json").read_text()[:40])
    elif damage == "delete_tensors":
        (d / "state-2.safetensors").unlink()
    else:
        (d / "checkpoint.json").unlink()
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def _comparable_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s")
    return rows


def _assert_same_run(a, b):
    ta = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)  # bitwise
    assert _comparable_metrics(a) == _comparable_metrics(b)
    ca = (a / "metrics.csv").read_text().splitlines()
    cb = (b / "metrics.csv").read_text().splitlines()
    assert len(ca) == len(cb) == 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    r = fedlora_run(*TINY, "--out", str(d))
    assert r.returncode == 0, r.stderr
    return d


def _kill_and_resume(tmp_path, phase):
    d = tmp_path / "run"
    r = fedlora_run(*TINY, "--out", str(d), fault=f"{phase}@2")
    assert r.returncode == -9, (r.returncode, r.stderr[-500:])  # SIGKILL, no chance to clean up
    assert not (d / "adapter").exists()
    r = fedlora_run("--resume", str(d))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    return d


def test_kill_9_mid_round_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    _assert_same_run(_kill_and_resume(tmp_path, "train"), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["aggregate", "checkpoint", "metrics"])
def test_kill_9_at_every_phase_then_resume_equals_uninterrupted(tmp_path, uninterrupted, phase):
    _assert_same_run(_kill_and_resume(tmp_path, phase), uninterrupted)


def test_resume_refuses_a_changed_config(tmp_path, uninterrupted):
    r = fedlora_run("--resume", str(uninterrupted), "--set", "lora.rank=4")
    assert r.returncode == 2 and "lora.rank: 8 -> 4" in r.stderr and "Traceback" not in r.stderr


def test_resume_of_a_corrupted_checkpoint_is_refused(tmp_path, uninterrupted):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(uninterrupted, d)
    p = next((d / "checkpoint").glob("state-*.safetensors"))
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    r = fedlora_run("--resume", str(d))
    assert r.returncode == 2 and "SHA-256" in r.stderr and "Traceback" not in r.stderr
    assert (d / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()  # nothing else lost


def test_a_new_run_refuses_an_existing_run_dir_and_points_to_resume(uninterrupted):
    r = fedlora_run(*TINY, "--out", str(uninterrupted))
    assert r.returncode == 2 and "--resume" in r.stderr

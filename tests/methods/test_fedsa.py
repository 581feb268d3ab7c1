"""FedSA-LoRA: A shared and averaged, B and the head kept by each client (on disk, versioned, resumed exactly),
personalised evaluation as the headline."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora.adapters import Adapter, LoraModule
from fedlora.methods import get_method
from fedlora.methods.base import Update
from tests.conftest import fedlora_run

def test_fedsa_averages_a_only_and_clients_keep_b_and_the_head():
    cfg = types.SimpleNamespace(lora=types.SimpleNamespace(head="aggregate"), server=None)
    method = get_method("fedsa")(cfg)
    A0, B0 = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    state = method.init_state(Adapter({"m": LoraModule(A0, B0, 4.0)}, {"head.weight": torch.zeros(2, 4)}))
    plans = method.configure(1, state, [0, 1])
    assert plans[0].upload == {"lora_A"} and plans[0].keep == {"lora_B", "head"}
    assert plans[0].train == {"lora_A", "lora_B", "head"} and set(plans[0].download) == {"m.lora_A.weight"}
    assert plans[0].config["returning"] is False
    As = [torch.full((2, 3), v, dtype=torch.float64) for v in (1.0, 4.0)]
    new = method.aggregate(1, state, [Update(k, n, {"m.lora_A.weight": A}) for k, (n, A) in enumerate(zip([1, 3], As))])
    assert torch.equal(new.adapter.modules["m"].A, torch.full((2, 3), 3.25, dtype=torch.float64))
    assert torch.equal(new.adapter.modules["m"].B, B0)  # nobody's B reaches the server
    assert method.configure(2, new, [1])[0].config["returning"] is True


def _state_files(run_dir: Path) -> dict[str, dict]:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "client_state").iterdir())}


def test_fedsa_runs_keeps_personal_state_and_resumes_exactly(tmp_path, toy_model_dir):
    args = ["--config", str(Path(__file__).resolve().parents[2] / "examples/tiny.toml"), "--set", "method=fedsa", "--set", "rounds=3", "--set",
            f"model.name={toy_model_dir}", "--set", "model.threads=1", "--set", "train.lr=0.05",
            "--set", "data.max_train_examples=90", "--set", "data.max_eval_examples=60"]
    from fedlora.cli import main

    full = tmp_path / "full"
    assert main(["run", "--quiet", *args, "--out", str(full)]) == 0  # in process; the killed run below is not
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["headline_metric"] == "personal_accuracy_mean"
    assert summary["final_score"] == rows[-1]["personal_accuracy_mean"]
    n_clients = summary["num_clients"]
    assert len(rows[-1]["personal_accuracy"]) == n_clients
    # one committed version per client, each client's own B (and head): personalised
    states = _state_files(full)
    assert sorted(states) == [f"{k}-r3.safetensors" for k in range(n_clients)]
    Bs = [next(v for k, v in s.items() if k.endswith("lora_B.weight")) for s in states.values()]
    assert all(not torch.equal(Bs[0], b) for b in Bs[1:])
    # only A travels up: every round's upload is the clients' A tensors and nothing else
    a_bytes = sum(v.numel() * v.element_size() for k, v in
                  load_file(str(full / "adapter" / "adapter_model.safetensors")).items() if "lora_A" in k)
    assert all(a_bytes * n_clients <= row["upload_bytes"] < a_bytes * n_clients + 4096 * n_clients for row in rows)
    # killed after one client trained in round 2 (it had already written its round-2 state), then resumed
    cut = tmp_path / "cut"
    r = fedlora_run(*args, "--out", str(cut), fault="train@2")
    assert r.returncode == -9, r.stderr[-500:]
    assert any(name.endswith("-r2.safetensors") for name in os.listdir(cut / "client_state"))
    r = fedlora_run("--resume", str(cut))
    assert r.returncode == 0, r.stderr[-2000:]
    for a, b in zip(rows, [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()], strict=True):
        a.pop("wall_s"), b.pop("wall_s")
        assert a == b
    resumed = _state_files(cut)
    assert resumed.keys() == states.keys()
    assert all(torch.equal(resumed[f][k], states[f][k]) for f in states for k in states[f])


def test_fedsa_refuses_runs_whose_result_would_be_the_base_model():
    """Under DP (or with eval.per_client = false) no client's own model can be scored, and the global part alone is
    the base model: refused before any work, with the reason."""
    import pytest

    from fedlora.config import load_config
    from fedlora.engine.simulation import prepare
    from fedlora.errors import ConfigError

    for extra in (["dp.enabled=true", "dp.epsilon=3"], ["eval.per_client=false"]):
        with pytest.raises(ConfigError, match="personalised"):
            prepare(load_config(None, ["method=fedsa", *extra]))

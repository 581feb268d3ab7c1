"""The Flower engine: messages round-trip, config resolution, and the simulation runtime against the in-process
engine (same config and seed → the same final adapter), with a SuperNode that fails."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import flower  # noqa: E402
from fedlora.engine.simulation import run_experiment  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402
from fedlora.methods import available_methods, get_method  # noqa: E402
from fedlora.methods.base import ClientPlan, Update  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples/tiny.toml")
BASE = ["rounds=2", "data.max_train_examples=120", "data.max_eval_examples=40", "train.local_steps=2",
        "train.batch_size=8", "model.threads=1"]
PILOT = str(ROOT / "examples/pilot_tiny.toml")
SPECIAL = {"pilot": (PILOT, ["memory.calibrate=false"]), "flora": (TINY, ["rounds=3"])}
# pilot: layer subsets chosen on the client, with the server's memory model.  Its analytical model here: a calibrated
# one is measured (peak memory of two profiled steps), so two runs may pick different layers and differ by design.


def test_plan_and_update_travel_as_text():
    from fedlora.privacy import ClientPrivacy

    plan = ClientPlan(3, {}, frozenset({"lora_B"}), frozenset({"lora_B", "head"}), {"init_seed": 7},
                      {"m.q": 4}, modules=frozenset({"m.q"}))
    back = flower.plan_from_text(flower.plan_to_text(plan), {})
    assert back == plan
    private = dataclasses.replace(plan, privacy=ClientPrivacy(0.91, 0.25, 2, 1.0, 1e-5))  # σ travels with the plan
    assert flower.plan_from_text(flower.plan_to_text(private), {}) == private
    update = Update(3, 27, {}, {"loss": 0.5, "steps": 2.0}, {"layers": [1, 2], "ig": {0: 1.5}})
    again = flower.update_from_text(flower.update_to_text(update))
    assert again.client_id == 3 and again.num_examples == 27 and again.metrics == update.metrics
    assert again.report == {"layers": [1, 2], "ig": {0: 1.5}}


def test_run_config_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = flower.resolve_config({"config": TINY, "overrides": "rounds=4; method=fedit"})
    assert cfg.rounds == 4 and cfg.method == "fedit"
    monkeypatch.syspath_prepend(str(ROOT))  # a Flower app process has the app directory on sys.path
    assert flower.resolve_config({"config": "examples/tiny.toml"}).method == "ffa"
    with pytest.raises(ConfigError, match="no such file"):
        flower.resolve_config({"config": "examples/nope.toml"})


def test_flower_refuses_grouped_client_training():
    """train.client_group groups the in-process engine's clients; a Flower run refuses it before any work."""
    with pytest.raises(ConfigError, match="client_group = 4 .* SuperNode"):
        flower.run_on_grid(None, {"config": TINY, "overrides": "train.client_group=4"}, log=lambda *_: None)


def test_flower_refuses_simulated_attacks():
    """attack.* makes clients malicious in a simulation; a Flower run refuses it before any work."""
    with pytest.raises(ConfigError, match="attack.kind = 'scale' .* SuperNodes"):
        flower.run_on_grid(None, {"config": TINY, "overrides": 'attack.kind="scale"; attack.clients=[0]'},
                           log=lambda *_: None)


def _simulate(run_config: dict, client_app=None, nodes: int = 3) -> None:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    server = ServerApp()

    @server.main()
    def _main(grid, context):
        flower.run_on_grid(grid, run_config, log=lambda *_: None)

    run_simulation(server, client_app or flower.client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "logging_level": "ERROR"}})


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.flower_sim
@pytest.mark.parametrize("method", available_methods())
def test_simulation_runtime_gives_the_in_process_adapter(tmp_path, method, toy_model_dir):
    """Table-driven over every registered method (with its ``minimal_overrides``, on the toy model except
    Fed-piLot's memory-budget example): equivalence (≤ 1e-6; bit-identical here at equal thread counts) of the final
    PEFT adapter, and the same per-round loss, accuracy and traffic."""
    config, extra = SPECIAL.get(method, (TINY, []))
    model = [] if method == "pilot" else [f"model.name={toy_model_dir}"]
    overrides = BASE + [f"method={method}", *model, *get_method(method).minimal_overrides, *extra]
    threads = torch.get_num_threads()
    run_experiment(load_config(config, overrides), out_dir=tmp_path / "inproc", progress=False, log=lambda *_: None)
    assert torch.get_num_threads() == threads  # model.threads = 1 held for the run only
    _simulate({"config": config, "overrides": ";".join(overrides), "out-dir": str(tmp_path / "flower")})
    ours = load_file(str(tmp_path / "inproc/adapter/adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    for a, b in zip(_rows(tmp_path / "inproc"), _rows(tmp_path / "flower"), strict=True):
        for key in ("loss", "accuracy", "upload_bytes", "download_bytes", "clients", "personal_accuracy_mean"):
            assert (a.get(key) is None) == (b.get(key) is None), key
            if a.get(key) is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-9), key
        if get_method(method)(load_config(config, overrides)).personal_roles():  # scored on the nodes themselves
            assert b["personal_accuracy"].keys() == a["personal_accuracy"].keys() and len(a["personal_accuracy"]) == 3
    for name in ("summary.json", "metrics.csv", "metrics.png", "config.toml", "clients.json"):
        assert (tmp_path / "flower" / name).is_file(), name


def test_a_failing_supernode_does_not_stop_the_run(tmp_path):
    """Client 1 fails in round 2: with min-replies = 2 the round aggregates the other two and records who was
    missing."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg, context):
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["plan"]["round"]) == 2:
            raise RuntimeError("simulated crash")
        return flower.client_train(msg, context)

    app.query()(flower.client_query)
    overrides = BASE + ["method=ffa"]
    _simulate({"config": TINY, "overrides": ";".join(overrides), "out-dir": str(tmp_path / "flower"),
               "min-replies": 2}, client_app=app)
    rows = _rows(tmp_path / "flower")
    assert [r["clients"] for r in rows] == [3, 2]
    assert list(rows[1]["missing"]) == ["1"] and "simulated crash" in rows[1]["missing"]["1"]
    assert (tmp_path / "flower/adapter/adapter_model.safetensors").is_file()
    final = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


# ---------------------------------------------------------------------------------------------------- deployment
def _deploy(tmp_path, tls: bool, overrides: list[str], extra: dict | None = None, on_line=None, nodes: int = 3):
    from fedlora.engine.loopback import LoopbackFederation

    fed = LoopbackFederation(nodes, tmp_path / "federation", tls=tls)
    with fed:
        run_config = {"config": TINY, "overrides": ";".join(overrides), "out-dir": str(tmp_path / "flower"),
                      **(extra or {})}
        res = fed.run(ROOT, run_config, timeout=600, on_line=(lambda line: on_line(fed, line)) if on_line else None)
        pids = [p.pid for p in fed.procs.values()]
    for pid in pids:  # every process the federation started is gone (zombies aside)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    return res, fed


@pytest.mark.deployment
@pytest.mark.parametrize("method,tls", [("ffa", False), ("ffa", True), ("fedit", False), ("flexlora", False),
                                        ("flora", False), ("fedsa", False)],
                         ids=["ffa-insecure", "ffa-tls", "fedit", "flexlora", "flora", "fedsa"])
def test_loopback_deployment_gives_the_in_process_adapter(tmp_path, method, tls):
    """A real SuperLink and three SuperNodes (flower-superlink / flower-supernode on 127.0.0.1, TLS with
    certificates made here), two rounds: the same final adapter as the in-process engine."""
    overrides = BASE + [f"method={method}", *get_method(method).minimal_overrides, *SPECIAL.get(method, ("", []))[1]]
    run_experiment(load_config(TINY, overrides), out_dir=tmp_path / "inproc", progress=False, log=lambda *_: None)
    res, fed = _deploy(tmp_path, tls, overrides)
    assert res.returncode == 0, res.stdout[-3000:]
    ours = load_file(str(tmp_path / "inproc/adapter/adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    if method == "fedsa":  # kept state in the nodes' workers, personalised evaluation run by them
        a, b = _rows(tmp_path / "inproc")[-1], _rows(tmp_path / "flower")[-1]
        assert b["personal_accuracy_mean"] == pytest.approx(a["personal_accuracy_mean"], abs=1e-9)
    log = (fed.workdir / "superlink.log").read_text()
    assert ("https://127.0.0.1" in log) == tls  # the SuperLink served TLS only when asked to
    if tls:
        assert "BEGIN CERTIFICATE" in fed.certs["ca"].read_text()


@pytest.mark.deployment
def test_a_supernode_killed_during_a_round_does_not_stop_the_run(tmp_path):
    killed = []

    def kill_after_round_one(fed, line):
        if "round   1/2" in line and not killed:
            fed.stop_node(2)  # SIGKILL while round 2 is being sent out
            killed.append(True)

    res, _ = _deploy(tmp_path, False, BASE + ["method=ffa"], {"min-replies": 2, "round-timeout": 90},
                     on_line=kill_after_round_one)
    assert killed and res.returncode == 0, res.stdout[-3000:]
    rows = _rows(tmp_path / "flower")
    assert [r["clients"] for r in rows] == [3, 2]
    assert list(rows[1]["missing"]) == ["2"]
    assert (tmp_path / "flower/adapter/adapter_model.safetensors").is_file()


@pytest.mark.deployment
def test_supernode_authentication_admits_registered_nodes_only(tmp_path):
    """TLS + SuperNode authentication: the two registered SuperNodes run the experiment; a third node whose key was
    never registered is refused by the SuperLink and exits."""
    import subprocess

    from fedlora.engine.loopback import LoopbackFederation

    overrides = BASE + ["method=ffa", "clients.num=2", 'clients.partition="iid"', "rounds=1"]
    with LoopbackFederation(2, tmp_path / "federation", tls=True, auth=True) as fed:
        intruder = fed.start_node(2)  # a key pair of its own, never registered
        res = fed.run(ROOT, {"config": TINY, "overrides": ";".join(overrides), "out-dir": str(tmp_path / "flower")},
                      timeout=600)
        assert res.returncode == 0, res.stdout[-3000:]
        listed = subprocess.run([str(fed.bin / "flwr"), "supernode", "ls", "loopback", "--format", "json"],
                                env=fed.env, cwd=fed.workdir, capture_output=True, text=True, timeout=120)
        assert intruder.wait(timeout=120) != 0  # refused: the SuperNode gives up
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert len(nodes) == 2 and all(n["status"] == "online" for n in nodes)
    assert "Failed to activate SuperNode" in (fed.workdir / "supernode2.log").read_text()
    assert [r["clients"] for r in _rows(tmp_path / "flower")] == [2]


def test_a_reply_that_fails_validation_is_dropped_with_its_reason(tmp_path):
    """Client 0 sends NaN in round 2 (a well-formed message with a poisoned upload): the server's checks drop it and
    record why; the round aggregates the others and the final adapter stays finite."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp

    from fedlora import wire

    app = ClientApp()

    @app.train()
    def _train(msg, context):
        reply = flower.client_train(msg, context)
        if int(context.node_config["partition-id"]) == 0 and int(msg.content["plan"]["round"]) == 2:
            tensors = wire.decode(reply.content["upload"]["tensors"].data)
            poisoned = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
            reply.content["upload"] = ArrayRecord({"tensors": flower.bytes_array(wire.encode(poisoned))})
        return reply

    app.query()(flower.client_query)
    _simulate({"config": TINY, "overrides": ";".join(BASE + ["method=ffa"]), "out-dir": str(tmp_path / "flower")},
              client_app=app)
    rows = _rows(tmp_path / "flower")
    assert [r["clients"] for r in rows] == [3, 2] and rows[1]["rejected"] == 1
    assert "0" in rows[1]["dropped"] and "finite" in rows[1]["dropped"]["0"].lower()
    final = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_a_node_that_lost_its_kept_state_restarts_its_part_and_says_so(toy_model_dir):
    """FedSA-LoRA on a node: the first call's node state carries the client's B and head; a returning client whose
    node has no state (restarted, state lost) trains from the initial B and head and reports it."""
    from fedlora import wire
    from fedlora.config import to_toml
    from fedlora.engine.flower_client import _engine, local_round
    from fedlora.engine.flower_messages import plan_to_text

    cfg = load_config(TINY, BASE + ["method=fedsa", f"model.name={toy_model_dir}"])
    text = to_toml(cfg)
    eng, method = _engine(text, None)
    state = method.init_state(eng.spec.initial(ranks=eng.default_ranks))
    first = method.configure(1, state, [0])[0]
    _, update1, node_state = local_round(text, None, plan_to_text(first), 1, wire.encode(first.download), 0)
    kept = wire.decode(node_state)
    assert kept and all(k.startswith("keep/") for k in kept) and "state_restarted" not in json.loads(update1)["report"]
    state.extra["trained"] = [0]
    again = method.configure(2, state, [0])[0]
    _, update2, _ = local_round(text, None, plan_to_text(again), 2, wire.encode(again.download), 0, base_state=node_state)
    assert "state_restarted" not in json.loads(update2)["report"]
    _, update3, _ = local_round(text, None, plan_to_text(again), 2, wire.encode(again.download), 0, base_state=None)
    assert json.loads(update3)["report"]["state_restarted"] == 1

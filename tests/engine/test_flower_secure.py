"""Secure aggregation (SecAgg+) on the Flower engine: refused where it cannot work, the same adapter as the plain run
within the quantisation error, dropouts survived, and nothing of one client's tensors reaching the server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.config_ignored import ignored_settings  # noqa: E402
from fedlora.engine import flower, flower_secure  # noqa: E402
from fedlora.engine.prepare import prepare  # noqa: E402
from fedlora.engine.simulation import run_experiment  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402

from .test_flower import BASE, TINY, _deploy, _rows, _simulate  # noqa: E402

PROTOCOL_KEYS = {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"}  # SecAgg+'s own messages
REPORT_KEYS = {"update", "code", "message"}  # FitRes' metrics (the client's report) and status


def _bound(run_dir: Path, bits: int = 22, c: float = 8.0) -> float:
    """The quantisation error bound of one secure sum (flower_secure's docstring): K·2c/2**bits / (Σn / max n)."""
    sizes = json.loads((run_dir / "summary.json").read_text())["client_train_examples"]
    return len(sizes) * 2 * c / 2 ** bits / (sum(sizes) / max(sizes))


def _max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(str(p / "adapter/adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.parametrize("overrides, match", [
    (["method=flexlora"], "method 'flexlora' needs each client's update"),
    (["method=hetlora"], "it works with: fedit, fedsa, ffa, rolora"),
    (["method=fedsb"], "method 'fedsb' needs each client's update"),  # it drops restarted clients' cores
    (["robust.aggregation=median"], "robust.aggregation = 'median'"),
    (["robust.norm_bound=1.0"], "robust.norm_bound = 1.0"),
])
def test_secure_aggregation_is_refused_where_it_cannot_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        prepare(load_config(TINY, ["secure.aggregation=true", *overrides]))


def test_the_in_process_engine_refuses_secure_aggregation(tmp_path):
    with pytest.raises(ConfigError, match="runs on the Flower engine"):
        run_experiment(load_config(TINY, ["secure.aggregation=true"]), out_dir=tmp_path / "r", progress=False,
                       log=lambda *_: None)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overrides, match", [
    (["secure.num_shares=2"], "secure.num_shares must be a fraction"),
    (["secure.num_shares=3.5"], "a whole count > 2"),
    (["secure.reconstruction_threshold=1.5"], "secure.reconstruction_threshold must be"),
    (["secure.num_shares=5", "secure.reconstruction_threshold=5"], "less than secure.num_shares"),
    (["secure.clipping_range=0"], "secure.clipping_range must be a positive"),
    (["secure.quantization_bits=30"], r"secure.quantization_bits must be in \[8, 28\]"),
])
def test_bad_secure_settings_are_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["secure.aggregation=true", *overrides])


def test_secure_settings_without_secure_aggregation_are_ignored_settings():
    found = dict(ignored_settings(load_config(None, ["secure.clipping_range=4"])))
    assert "secure.aggregation = true" in found["secure.clipping_range"]


def test_a_client_value_beyond_the_clipping_range_fails_instead_of_being_clipped():
    """The mod clips value · n / max_weight to ±c: such a client fails its round, with a reason that says nothing of
    its values (the text reaches the server), as does one with more examples than the server planned for."""
    from fedlora import wire
    from fedlora.config import to_toml

    config = to_toml(load_config(None, ["secure.aggregation=true", "secure.clipping_range=2"]))
    text = json.dumps({"client_id": 0, "num_examples": 5, "metrics": {}, "report": {}})
    ok = flower_secure.secure_content(wire.encode({"b": torch.ones(3), "a": torch.full((2, 2), -3.0)}), text,
                                      config, max_weight=10.0)  # weighted: 3 * 5/10 = 1.5 <= 2
    assert ok.metric_records["fitres.num_examples"]["num_examples"] == 5
    assert [a.numpy().shape for a in ok.array_records["fitres.parameters"].values()] == [(2, 2), (3,)]  # key order
    with pytest.raises(ValueError, match=r"beyond secure.clipping_range = 2.0[^0-9]*$"):
        flower_secure.secure_content(wire.encode({"a": torch.full((2, 2), 4.5)}), text, config, max_weight=10.0)
    with pytest.raises(ValueError, match="more examples than the server planned"):
        flower_secure.secure_content(wire.encode({"a": torch.ones(2)}), text, config, max_weight=4.0)


def test_a_secure_only_node_refuses_to_upload_in_the_clear():
    flower_secure.refuse_plain_training({"partition-id": 0})
    with pytest.raises(PermissionError, match="secure-only"):
        flower_secure.refuse_plain_training({"secure-only": "true"})


class _FakeGrid:
    """A SecAgg+ federation in this process: Flower's own secaggplus_mod on each node, uploads ``x[node]`` with
    ``n[node]`` examples; ``drop = {node: stage}`` makes a node stop answering from that stage on."""

    STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]

    def __init__(self, x: dict, n: dict, drop: dict):
        from flwr.app import Context, RecordDict

        self.x, self.n, self.drop, self.unmask_requests = x, n, drop, []
        self.ctx = {k: Context(run_id=0, node_id=k, node_config={}, state=RecordDict(), run_config={}) for k in x}

    def _reply(self, msg):
        import copy

        from flwr.app import Message
        from flwr.client.mod import secaggplus_mod
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        def train(m, c):
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.x[c.node_id]]), self.n[c.node_id], {})
            return Message(compat.fitres_to_recorddict(res, False), reply_to=m)

        return secaggplus_mod(copy.deepcopy(msg), self.ctx[msg.metadata.dst_node_id], train)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message
        from flwr.common import Error

        out = []
        for i, m in enumerate(messages):
            node = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = f"{node}-{len(self.unmask_requests)}-{i}-{id(m)}"
            stage = m.content.config_records["secaggplus_configs"]["stage"]
            if stage == "unmask":
                rec = m.content.config_records["secaggplus_configs"]
                self.unmask_requests.append((set(rec["active_nids"]), set(rec["dead_nids"])))
            if node in self.drop and self.STAGES.index(stage) >= self.STAGES.index(self.drop[node]):
                out.append(Message(Error(code=0, reason="gone"), reply_to=m))
                continue
            out.append(Message(self._reply(m).content, reply_to=m))
        return out


@pytest.mark.parametrize("drop", [{}, {3: "collect_masked_vectors"}, {4: "share_keys", 3: "collect_masked_vectors"},
                                  {4: "setup", 3: "collect_masked_vectors"}, {2: "setup"}],
                         ids=["none", "one-while-training", "keys-and-training", "setup-and-training", "at-setup"])
def test_the_secure_sum_is_the_survivors_weighted_average_whatever_drops_when(monkeypatch, drop):
    """Flower's real SecAgg+ mod on four in-process nodes (weights 10/30/20/40): with clients gone at different stages
    of one round the unmasked result is the weighted average of those that uploaded, within the quantisation bound,
    and no client is ever asked for the shares of both its mask seed and its pairwise key."""
    import types

    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    x = {1: np.array([1.0, -2.0, 0.5]), 2: np.array([0.25, 0.75, -1.0]), 3: np.array([3.0, 3.0, 3.0]),
         4: np.array([-3.0, 1.0, 2.0])}
    n = {1: 10, 2: 30, 3: 20, 4: 40}
    grid = _FakeGrid(x, n, drop)
    secure = types.SimpleNamespace(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=8.0,
                                   quantization_bits=22)
    record = flower_secure.run_secure_round(grid, 1, {k: {"x": 1} for k in x}, secure, max_weight=40.0, timeout=None)
    alive = [k for k in x if k not in drop]
    assert sorted(record.contributors) == alive
    expected = sum(n[k] * x[k] for k in alive) / sum(n[k] for k in alive)
    bound = len(alive) * 16 / 2 ** 22 / (sum(n[k] for k in alive) / 40)
    assert np.abs(record.average[0] - expected).max() <= bound
    asked_seed = set().union(*(a for a, _ in grid.unmask_requests))
    asked_key = set().union(*(d for _, d in grid.unmask_requests))
    assert not asked_seed & asked_key
    assert asked_key == {k for k, stage in drop.items() if stage == "collect_masked_vectors"}


def test_a_round_too_large_for_the_modulus_is_refused():
    flower_secure.check_round_size(1023, 22)
    with pytest.raises(ConfigError, match="fewer than 1024 clients"):
        flower_secure.check_round_size(1024, 22)


# ---------------------------------------------------------------------------------------------- simulation runtime
@pytest.mark.flower_sim
def test_secure_round_gives_the_plain_average_and_the_server_sees_only_masks(tmp_path, toy_model_dir, monkeypatch):
    """One FFA-LoRA round on three SuperNodes with SecAgg+: the global adapter equals the in-process one within the
    stated quantisation bound; what reached the server of each client is a masked vector uncorrelated with that
    client's upload, and no tensor record."""
    overrides = BASE + ["method=ffa", "rounds=1", f"model.name={toy_model_dir}"]
    import fedlora.engine.simulation as simulation

    uploads = {}  # each client's upload in the plain run (the same seed trains the same clients)

    plain_receive = simulation.receive_upload

    def spy(eng, plan, blob, update, *a, **kw):
        from fedlora import wire

        uploads[plan.client_id] = wire.decode(blob)
        return plain_receive(eng, plan, blob, update, *a, **kw)

    monkeypatch.setattr(simulation, "receive_upload", spy)
    run_experiment(load_config(TINY, overrides), out_dir=tmp_path / "inproc", progress=False, log=lambda *_: None)
    monkeypatch.undo()

    masked: list[list[np.ndarray]] = []
    real_send = flower_secure._RecordingGrid.send_and_receive

    def keep_masks(self, messages, *, timeout=None):
        from flwr.common import bytes_to_ndarray

        replies = real_send(self, messages, timeout=timeout)
        for r in replies:
            rec = r.content.config_records.get("secaggplus_configs") if not r.has_error() else None
            if rec is not None and "masked_params" in rec:
                masked.append([bytes_to_ndarray(b) for b in rec["masked_params"]])
        return replies

    monkeypatch.setattr(flower_secure._RecordingGrid, "send_and_receive", keep_masks)
    _simulate({"config": TINY, "overrides": ";".join(overrides + ["secure.aggregation=true"]),
               "out-dir": str(tmp_path / "secure")})
    diff, bound = _max_diff(tmp_path / "inproc", tmp_path / "secure"), _bound(tmp_path / "inproc")
    assert 0 < diff <= bound, (diff, bound)
    row = _rows(tmp_path / "secure")[0]
    sec = row["secure_aggregation"]
    assert sec["contributors"] == 3 and row["clients"] == 3 and sec["tensor_bytes_in"] == 0
    assert set(sec["reply_keys"]) <= PROTOCOL_KEYS | REPORT_KEYS
    assert len(masked) == 3 and len(uploads) == 3
    for vec in masked:  # each looks uniform on [0, 2**32) and matches no client's quantised upload
        flat = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64)  # vec[0] is the masked weight
        n = flat.size  # ~1,100 values: the tolerances below are about 5 standard errors of a uniform sample
        assert abs(flat.mean() / 2 ** 32 - 0.5) < 5 * 0.289 / n ** 0.5 and abs(flat.std() / 2 ** 32 - 0.289) < 0.04
        for up in uploads.values():
            honest = np.concatenate([up[k].double().numpy().ravel() for k in sorted(up)])
            assert abs(np.corrcoef(flat, honest)[0, 1]) < 5 / n ** 0.5


def _failing_app(partition: int, failing_round: int):
    """The ClientApp, except that one client crashes while training in one round (after the keys were shared)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train(mods=[flower_secure.secure_mod])
    def _train(msg, context):
        t = (flower_secure.secure_args(msg)[2] if flower_secure.is_secure_train(msg)
             else int(msg.content["plan"]["round"]) if "plan" in msg.content else None)
        if int(context.node_config["partition-id"]) == partition and t == failing_round:
            raise RuntimeError("simulated crash while training")
        return flower.client_train(msg, context)

    app.query()(flower.client_query)
    return app


@pytest.mark.flower_sim
def test_a_client_that_drops_while_training_is_unmasked_from_its_neighbours_shares(tmp_path, toy_model_dir):
    """Client 1 crashes while training in round 2, after it shared its keys: SecAgg+ removes its masks from the
    others' shares, and the round aggregates the other two, as the plain engine does with min-replies = 2.

    The adapters differ by round 1's quantisation error carried through round 2's training plus round 2's own, so
    at most about twice one sum's bound.  Plain SGD carries the first linearly; AdamW would not (its first step is
    about lr·sign(g), so a 1e-6 change in the start moves a coordinate with a near-zero gradient by up to lr: CI
    measured 1.6e-4 with it).  A failed unmasking would leave a uniform 32-bit mask in the sum: off by the clipping
    range, not by 1e-5."""
    overrides = BASE + ["method=ffa", "train.optimizer=sgd", f"model.name={toy_model_dir}"]
    for name, secure in (("plain", []), ("secure", ["secure.aggregation=true"])):
        _simulate({"config": TINY, "overrides": ";".join(overrides + secure), "out-dir": str(tmp_path / name),
                   "min-replies": 2}, client_app=_failing_app(1, 2))
    rows = _rows(tmp_path / "secure")
    assert [r["clients"] for r in rows] == [3, 2] and list(rows[1]["missing"]) == ["1"]
    assert rows[1]["secure_aggregation"]["contributors"] == 2
    assert [r["clients"] for r in _rows(tmp_path / "plain")] == [3, 2]
    assert _max_diff(tmp_path / "plain", tmp_path / "secure") <= 2 * _bound(tmp_path / "plain")


# ---------------------------------------------------------------------------------------------- deployment
@pytest.mark.deployment
def test_private_secure_deployment_gives_the_in_process_adapter_and_epsilon(tmp_path):
    """The documented private default for deployments: FFA-LoRA + DP-SGD + SecAgg+ on a real SuperLink and three
    SuperNodes. The adapter equals the in-process DP run's within 1e-4 (quantisation only: DP noise is seeded the
    same), every client's ε is the same, and no tensor reached the server in the clear."""
    overrides = BASE + ["method=ffa", "dp.enabled=true", "dp.epsilon=8"]
    run_experiment(load_config(TINY, overrides), out_dir=tmp_path / "inproc", progress=False, log=lambda *_: None)
    res, _ = _deploy(tmp_path, False, overrides + ["secure.aggregation=true"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert _max_diff(tmp_path / "inproc", tmp_path / "flower") <= 1e-4
    for a, b in zip(_rows(tmp_path / "inproc"), _rows(tmp_path / "flower"), strict=True):
        assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9) and b["epsilon"] <= 8
        assert b["secure_aggregation"]["tensor_bytes_in"] == 0 and b["secure_aggregation"]["contributors"] == 3


@pytest.mark.deployment
def test_a_supernode_killed_in_a_secure_round_does_not_stop_the_run(tmp_path):
    killed = []

    def kill_in_round_two(fed, line):
        if "round   1/2" in line and not killed:
            fed.stop_node(2)  # SIGKILL as round 2's protocol starts
            killed.append(True)

    res, _ = _deploy(tmp_path, False, BASE + ["method=ffa", "secure.aggregation=true"],
                     {"min-replies": 2, "round-timeout": 60}, on_line=kill_in_round_two)
    assert killed and res.returncode == 0, res.stdout[-3000:]
    rows = _rows(tmp_path / "flower")
    assert [r["clients"] for r in rows] == [3, 2] and list(rows[1]["missing"]) == ["2"]
    assert rows[1]["secure_aggregation"]["contributors"] == 2
    final = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())

"""Fed-piLot, FedRA and top-k end to end on the real MiniLM with 3 memory budgets (2 rounds each)."""
import json
from pathlib import Path

import pytest

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment
from fedlora.errors import ConfigError


REPO = Path(__file__).resolve().parents[2]


def _cfg(method, *extra):
    return load_config(REPO / "examples" / "pilot_tiny.toml", [f"method={method}", "data.max_train_examples=240",
                                                    "data.max_eval_examples=64", "train.local_steps=2",
                                                    "memory.calibrate=false", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {m: run_experiment(_cfg(m, *(["memory.calibrate=true"] if m == "pilot" else [])),
                              out_dir=tmp_path_factory.mktemp(m) / "run", progress=False, log=lambda *_: None)
            for m in ("pilot", "fedra", "topk")}


@pytest.mark.parametrize("method", ["pilot", "fedra", "topk"])
def test_every_client_trains_only_layers_whose_predicted_memory_fits_its_budget(runs, method):
    from fedlora.report import read_metrics

    rows = read_metrics(runs[method].run_dir)
    info = json.loads((runs[method].run_dir / "clients.json").read_text())
    budget = {str(c["client"]): c["memory_budget_mb"] for c in info["clients"]}
    full = info["memory_model"]["all_layers_mb"]
    assert [budget[k] / full for k in "012"] == pytest.approx([0.5, 0.75, 1.0])
    for r in rows:
        layers, predicted = r["layers_trained"], r["memory_predicted_mb_per_client"]
        assert set(layers) == {"0", "1", "2"}
        for cid, ls in layers.items():
            assert ls == sorted(set(ls)) and all(0 <= j < 6 for j in ls)
            assert predicted[cid] <= budget[cid] * (1 + 1e-9)
        assert len(layers["0"]) <= len(layers["1"]) <= len(layers["2"]) or method == "fedra"
        assert all(v > 0 for v in r["memory_measured_mb_per_client"].values())
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0


def test_topk_trains_the_last_layers_and_the_largest_budget_trains_all(runs):
    layers = runs["topk"].metrics[0]["layers_trained"]
    assert layers[2] == [0, 1, 2, 3, 4, 5]
    for ls in layers.values():
        assert ls == list(range(6 - len(ls), 6))  # a top run of blocks


def test_fedra_draws_new_random_layers_every_round(runs):
    a, b = (r["layers_trained"] for r in runs["fedra"].metrics)
    assert a != b or a[0] != a[1]


def test_pilot_reports_ig_scores_and_keeps_a_global_score(runs, tmp_path):
    from fedlora.checkpoint import load_checkpoint

    ckpt = load_checkpoint(runs["pilot"].run_dir)
    g = ckpt.state.extra["global_scores"]
    assert len(g) == 6 and sum(g) == pytest.approx(1.0) and all(x >= 0 for x in g)
    assert any(k.startswith("momentum/") for k in ckpt.state.extra)
    summary = json.loads((runs["pilot"].run_dir / "summary.json").read_text())
    assert summary["method"] == "pilot"


def test_smallest_for_all_gives_everyone_the_weakest_clients_layers(tmp_path):
    res = run_experiment(_cfg("topk", "memory.smallest_for_all=true", "rounds=1"), out_dir=tmp_path / "r",
                         progress=False, log=lambda *_: None)
    layers = res.metrics[0]["layers_trained"]
    assert layers[0] == layers[1] == layers[2]


def test_layer_methods_need_budgets():
    from fedlora.engine.simulation import prepare

    with pytest.raises(ConfigError, match="memory.budgets"):
        prepare(load_config(None, ["method=pilot", "data.max_train_examples=60", "clients.num=3",
                                   "clients.partition=iid"]))


# ------------------------------------------------------------------------------- FedRA (sub-model) versus random-k
@pytest.fixture(scope="module")
def randk_run(tmp_path_factory):
    return run_experiment(_cfg("randk"), out_dir=tmp_path_factory.mktemp("randk") / "run", progress=False,
                          log=lambda *_: None)


def _memory_model(run_dir):
    from fedlora.memory import MemoryModel

    mm = json.loads((run_dir / "clients.json").read_text())["memory_model"]
    return MemoryModel(mm["step_mb"], mm["per_layer_grad_and_optimiser_mb"], mm["per_layer_activation_mb"])


def test_randk_trains_random_layers_that_fit_inside_the_full_depth_model(randk_run):
    from fedlora.report import read_metrics

    mm = _memory_model(randk_run.run_dir)
    for r in read_metrics(randk_run.run_dir):
        for cid, ls in r["layers_trained"].items():
            assert r["memory_predicted_mb_per_client"][cid] == pytest.approx(mm.predict(ls))
    assert json.loads((randk_run.run_dir / "summary.json").read_text())["method"] == "randk"


def test_fedra_trains_sub_models_that_fit_and_reach_below_the_blocks_randk_can_afford(runs, randk_run):
    """Same seed, same budgets: FedRA's predicted memory is the sub-model's, it gets at least as many blocks as
    random-k, and its small client draws blocks random-k cannot afford at full depth (the activations of every block
    above them)."""
    from fedlora.report import read_metrics

    mm = _memory_model(runs["fedra"].run_dir)
    fedra_rows, randk_rows = read_metrics(runs["fedra"].run_dir), read_metrics(randk_run.run_dir)
    lowest_fedra, lowest_randk = 6, 6
    for f, k in zip(fedra_rows, randk_rows, strict=True):
        for cid, ls in f["layers_trained"].items():
            assert f["memory_predicted_mb_per_client"][cid] == pytest.approx(mm.predict_submodel(ls))
            assert len(ls) >= len(k["layers_trained"][cid])
        lowest_fedra = min(lowest_fedra, *f["layers_trained"]["0"])
        lowest_randk = min(lowest_randk, *k["layers_trained"]["0"])
    assert lowest_fedra < lowest_randk

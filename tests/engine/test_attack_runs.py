"""Malicious clients inside a real run (attack.*, simulation engine) on the toy BERT: the server receives exactly
the malicious upload, honest clients are untouched, and a label flipper trains on flipped labels."""
import json
import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment


def _base(toy_model_dir, *extra):
    return ["method=fedit", "rounds=1", "model.max_length=32", "data.max_train_examples=60",
            "data.max_eval_examples=16", "clients.num=3", "clients.partition=iid", "train.local_steps=2",
            "train.batch_size=6", "model.threads=1", f"model.name={toy_model_dir}",
            "robust.norm_bound=1e9", *extra]  # a bound nothing reaches: the server logs every client's ‖Δ‖


def _run(tmp_path, name, overrides):
    res = run_experiment(load_config(None, overrides), out_dir=tmp_path / name, progress=False, log=lambda *_: None)
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    sizes = json.loads((res.run_dir / "summary.json").read_text())["client_train_examples"]
    return res.adapter.to_flat(), {int(k): v for k, v in row["update_norm"].items()}, sizes


@pytest.mark.parametrize("kind, factor, moved", [("scale", 10.0, 9.0), ("sign_flip", 1.0, 2.0),
                                                   ("gaussian", 1.0, None)])
def test_the_server_receives_the_malicious_update(tmp_path, toy_model_dir, kind, factor, moved):
    """Client 1's received ‖Δ‖ is its honest one times the attack's factor, the others' are unchanged; with the mean,
    the global adapter moves by p₁·‖Δ_bad − Δ‖ (9·p₁‖Δ₁‖ for ×10, 2·p₁‖Δ₁‖ for a sign flip)."""
    clean, clean_norms, sizes = _run(tmp_path, "clean", _base(toy_model_dir))
    bad, bad_norms, _ = _run(tmp_path, kind, _base(toy_model_dir, f'attack.kind="{kind}"', "attack.clients=[1]"))
    assert bad_norms[0] == pytest.approx(clean_norms[0], rel=1e-9)  # the honest clients are untouched
    assert bad_norms[2] == pytest.approx(clean_norms[2], rel=1e-9)
    assert bad_norms[1] == pytest.approx(factor * clean_norms[1], rel=1e-4)
    shift = math.sqrt(sum(float(((bad[k].double() - clean[k].double()) ** 2).sum()) for k in clean))
    p1 = sizes[1] / sum(sizes)
    if moved is not None:
        assert shift == pytest.approx(moved * p1 * clean_norms[1], rel=1e-3)
    else:  # a random direction of the same norm: between 0 and 2·p₁‖Δ₁‖, far from either end
        assert 0.5 * p1 * clean_norms[1] < shift < 2 * p1 * clean_norms[1]


def test_the_median_resists_the_boosted_client(tmp_path, toy_model_dir):
    """×10 on one of three clients: the coordinate-wise median lands between honest values, the mean does not."""
    clean, _, _ = _run(tmp_path, "clean", _base(toy_model_dir, "robust.aggregation=median"))
    bad_mean, _, _ = _run(tmp_path, "mean", _base(toy_model_dir, 'attack.kind="scale"', "attack.clients=[1]"))
    bad_med, _, _ = _run(tmp_path, "median", _base(toy_model_dir, 'attack.kind="scale"', "attack.clients=[1]",
                                                   "robust.aggregation=median"))

    def dist(a):
        return math.sqrt(sum(float(((a[k].double() - clean[k].double()) ** 2).sum()) for k in clean))

    assert dist(bad_med) < 0.5 * dist(bad_mean)


def test_a_label_flipper_trains_on_flipped_labels(tmp_path, toy_model_dir, monkeypatch):
    import fedlora.engine.client_round as client_round

    seen = {}
    real = client_round.train_client

    def spy(**kw):
        seen.setdefault(tag, {})[kw["plan"].client_id] = kw["examples"].labels.clone()
        return real(**kw)

    monkeypatch.setattr(client_round, "train_client", spy)
    tag = "clean"
    clean, clean_norms, _ = _run(tmp_path, "clean", _base(toy_model_dir))
    tag = "flip"
    bad, bad_norms, _ = _run(tmp_path, "flip", _base(toy_model_dir, 'attack.kind="label_flip"', "attack.clients=[2]"))
    assert torch.equal(seen["flip"][2], 1 - seen["clean"][2])
    assert all(torch.equal(seen["flip"][k], seen["clean"][k]) for k in (0, 1))
    assert bad_norms[0] == pytest.approx(clean_norms[0], rel=1e-9)
    assert bad_norms[2] != pytest.approx(clean_norms[2], rel=1e-3)  # it trained honestly, on wrong labels

"""In-process engine end to end on the real bundled MiniLM and a handful of SST-2 rows (2 rounds per method)."""
import csv
import json

import pytest
import torch

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment, sample_clients
from fedlora.errors import ConfigError, PrivacyBudgetError

CONTRACT_COLUMNS = ["round", "loss", "accuracy", "upload_bytes", "download_bytes", "epsilon"]


def _csv(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_two_rounds_end_to_end_and_artifacts(tmp_path, tiny_config, method):
    cfg = tiny_config(f"method={method}")
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    d = res.run_dir
    for f in ("config.toml", "metrics.csv", "metrics.jsonl", "metrics.png", "summary.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (d / f).is_file(), f
    rows = _csv(d)
    assert [r["round"] for r in rows] == ["1", "2"]
    assert all(c in rows[0] for c in CONTRACT_COLUMNS)
    assert all(r["epsilon"] == "" for r in rows)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    up = int(rows[0]["upload_bytes"])
    # measured bytes: 3 clients × 12 modules × 384×8 fp32 (B, and A too for FedIT) + head, plus headers
    raw_b, head = 12 * 384 * 8 * 4, (2 * 384 + 2) * 4
    expected_raw = 3 * (raw_b * (2 if method == "fedit" else 1) + head)
    assert expected_raw < up < expected_raw * 1.02  # + safetensors JSON headers (~1.1% here)
    assert not (d / "adapter.tmp").exists() and not (d / "summary.json.tmp").exists()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final_accuracy"] == pytest.approx(res.final_accuracy)


def test_ffa_keeps_A_at_the_seeded_init_and_halves_upload(tmp_path, tiny_config):
    ffa = run_experiment(tiny_config("method=ffa"), out_dir=tmp_path / "ffa", progress=False, log=lambda *_: None)
    fedit = run_experiment(tiny_config("method=fedit"), out_dir=tmp_path / "fedit", progress=False,
                           log=lambda *_: None)
    from fedlora.adapters import seeded_lora_A

    for name, m in ffa.adapter.modules.items():
        assert torch.equal(m.A, seeded_lora_A(name, 8, 384, seed=0))
        assert m.B.abs().sum() > 0
    assert any(not torch.equal(m.A, seeded_lora_A(n, 8, 384, 0)) for n, m in fedit.adapter.modules.items())
    ratio = int(_csv(ffa.run_dir)[0]["upload_bytes"]) / int(_csv(fedit.run_dir)[0]["upload_bytes"])
    assert 0.5 < ratio < 0.52  # B only (+ head) vs A and B


def test_saved_adapter_reloads_in_peft_and_reproduces_accuracy(tmp_path, tiny_config):
    """fedlora.load_adapter (PEFT on the base model + the recorded pooling) gives the run's exact predictions; a
    stock PeftModel on AutoModelForSequenceClassification reads BERT's pooler instead and does not."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora import load_adapter
    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots, inject_lora, load_classifier, resolve_model_path

    cfg = tiny_config("method=ffa", "rounds=1")
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    info = json.loads((res.run_dir / "adapter" / "fedlora.json").read_text())
    assert info["pooling"] == "mean" and info["labels"] == ["0", "1"] and info["method"] == "ffa"
    task = ClassificationTask(cfg.data, seed=cfg.seed)
    tok, model = load_adapter(res.run_dir)
    assert not model.training
    val = task.tokenise(tok, task.val_rows, task.val_labels, cfg.model.max_length)
    ev = task.evaluate(model, val, 16)
    assert ev["accuracy"] == pytest.approx(res.final_accuracy, abs=1e-12)
    assert ev["loss"] == pytest.approx(res.metrics[-1]["eval_loss"], rel=1e-5)
    # same logits as our own model holding the final global adapter
    _, ours_base = load_classifier(cfg.model, task.num_labels, seed=7)
    ours = inject_lora(ours_base, cfg.lora)
    LoraSlots.of(ours).load(res.adapter)
    batch = {k: v for k, v in val.batch(range(8)).items() if k != "labels"}
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)
        stock = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2),
            str(res.run_dir / "adapter")).eval()
        assert not torch.allclose(stock(**batch).logits, ours(**batch).logits, atol=1e-3)
    # the head is the trained one, not the fresh zero head
    assert res.adapter.head and any(v.abs().sum() > 0 for v in res.adapter.head.values())


def test_pooler_runs_keep_the_models_own_head(tmp_path, tiny_config):
    from fedlora import load_adapter
    from fedlora.data.tasks import ClassificationTask

    cfg = tiny_config("method=ffa", "rounds=1", "model.pooling=pooler")
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert json.loads((res.run_dir / "adapter" / "fedlora.json").read_text())["pooling"] == "pooler"
    task = ClassificationTask(cfg.data, seed=cfg.seed)
    tok, model = load_adapter(res.run_dir / "adapter", base_model="minilm")
    val = task.tokenise(tok, task.val_rows, task.val_labels, cfg.model.max_length)
    assert task.evaluate(model, val, 16)["accuracy"] == pytest.approx(res.final_accuracy, abs=1e-12)


def test_dp_run_reports_growing_epsilon_within_target(tmp_path, tiny_config):
    cfg = tiny_config("method=ffa", "dp.enabled=true", "dp.epsilon=8", "clients.partition=label_skew",
                      "data.max_train_examples=150")
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    rows = _csv(res.run_dir)
    eps = [float(r["epsilon"]) for r in rows]
    assert 0 < eps[0] < eps[1] <= 8.0
    last = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    per_client = last["epsilon_per_client"]
    assert len(per_client) == 3 and max(per_client.values()) == pytest.approx(eps[1])
    # nothing computed from a client's data leaves it but the privatised tensors: no training loss, no per-client
    # accuracy on its local validation rows (eval.per_client is on by default and ignored under DP)
    assert cfg.eval.per_client
    assert all(r["loss"] == "" for r in rows)
    assert "client_accuracy" not in last and last["loss"] is None
    assert last["accuracy"] is not None  # the server's own validation set is still scored


def test_same_seed_same_adapter(tmp_path, tiny_config):
    a = run_experiment(tiny_config("rounds=1"), out_dir=tmp_path / "a", progress=False, log=lambda *_: None)
    b = run_experiment(tiny_config("rounds=1"), out_dir=tmp_path / "b", progress=False, log=lambda *_: None)
    assert all(torch.equal(a.adapter.to_flat()[k], v) for k, v in b.adapter.to_flat().items())


def test_impossible_dp_budget_is_refused_before_the_model_loads(tmp_path, tiny_config, monkeypatch):
    import fedlora.models as models

    monkeypatch.setattr(models, "load_classifier", lambda *a, **k: pytest.fail("model loaded before DP check"))
    cfg = tiny_config("dp.enabled=true", "dp.epsilon=6", "train.batch_size=32")  # 21 rows per client < 32
    with pytest.raises(PrivacyBudgetError, match="Poisson sampling needs batch_size < n"):
        run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_config, monkeypatch):
    """Refused before the data is read or the model loads (issue 19)."""
    from fedlora.engine import loop

    def no_work(*_):
        raise AssertionError("the run directory must be checked before any work")

    monkeypatch.setattr(loop, "prepare", no_work)
    monkeypatch.setattr(loop, "build_engine", no_work)
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(tiny_config(), out_dir=d, progress=False, log=lambda *_: None)


def test_client_sampling_is_seeded_and_sized():
    s = sample_clients(0, 3, 20, 0.25)
    assert len(s) == 5 == len(set(s)) and s == sample_clients(0, 3, 20, 0.25)
    assert s != sample_clients(0, 4, 20, 0.25)
    assert sample_clients(0, 1, 20, 0.01) and len(sample_clients(0, 1, 20, 0.01)) == 1
    assert sample_clients(0, 1, 5, 1.0) == [0, 1, 2, 3, 4]


def test_unwritable_run_dir_is_a_clear_error(tmp_path, tiny_config):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot use .* as the run directory"):
        run_experiment(tiny_config(), out_dir=target / "run", progress=False, log=lambda *_: None)


def test_malformed_updates_are_dropped_counted_and_the_run_goes_on(tmp_path, tiny_config, monkeypatch):
    import fedlora.engine.client_round as client_round

    real = client_round.train_client

    def sabotage(**kw):
        up = real(**kw)
        if kw["plan"].client_id == 1:  # one client sends NaNs every round
            up.tensors = {k: torch.full_like(v, float("nan")) for k, v in up.tensors.items()}
        return up

    monkeypatch.setattr(client_round, "train_client", sabotage)
    res = run_experiment(tiny_config("method=ffa"), out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == 1 and r["clients"] == 2 and "NaN" in r["dropped"]["1"] for r in rows)
    assert all(torch.isfinite(v).all() for v in res.adapter.to_flat().values())
    assert _csv(res.run_dir)[0]["rejected"] == "1"


def test_norm_bounding_limits_every_client_update(tmp_path, tiny_config):
    res = run_experiment(tiny_config("method=ffa", "robust.norm_bound=0.01", "rounds=1"), out_dir=tmp_path / "r",
                         progress=False, log=lambda *_: None)
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(row["update_norm"]) == 3 and all(n > 0.01 for n in row["update_norm"].values())
    # the aggregate moved by at most the bound (a mean of vectors of norm ≤ 0.01)
    moved = sum(float((v ** 2).sum()) for k, v in res.adapter.to_flat(("lora_B",)).items()) ** 0.5
    assert moved <= 0.01 + 1e-6


def test_the_robust_rule_wraps_the_method_in_a_run(tmp_path, tiny_config):
    """Two clients of unequal size: the median of two is their unweighted mean, as is a trimmed mean that trims
    nothing; the default, data-weighted mean differs.  So the engine's method really merges by the robust rule."""
    def run(name, *robust):
        cfg = tiny_config("method=ffa", "rounds=1", "clients.num=2", "clients.partition=dirichlet",
                          "clients.dirichlet_alpha=0.3", *robust)
        res = run_experiment(cfg, out_dir=tmp_path / name, progress=False, log=lambda *_: None)
        sizes = json.loads((res.run_dir / "summary.json").read_text())["client_train_examples"]
        return res.adapter.to_flat(("lora_B",)), sizes

    mean, sizes = run("mean")
    assert sizes[0] != sizes[1]
    median, _ = run("median", "robust.aggregation=median")
    trimmed, _ = run("trimmed", "robust.aggregation=trimmed_mean", "robust.trim_fraction=0")
    for k in mean:
        torch.testing.assert_close(median[k], trimmed[k], rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(mean[k], median[k], rtol=1e-4, atol=1e-7) for k in mean)


def test_a_flexlora_round_without_uploads_reads_its_state_back(tmp_path, toy_model_dir):
    """FlexLoRA does not hold the previous global ΔW during a round (``state_during_round``); when no upload is
    accepted the engine reads that state back from the last checkpoint, and the run goes on as before."""
    cfg = load_config(None, ["method=flexlora", "rounds=2", "model.max_length=32", "data.max_train_examples=60",
                             "data.max_eval_examples=16", "clients.num=3", "clients.partition=iid",
                             "train.local_steps=1", "model.threads=1", f"model.name={toy_model_dir}",
                             'lora.rank_distribution="explicit"', "lora.client_ranks=[1, 2, 4]",
                             "robust.max_update_mb=1e-5"])  # 10 bytes: every upload is rejected
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert [r["rejected"] for r in res.metrics] == [3, 3]
    assert len(res.adapter.modules) == 4  # query and value of the toy model's 2 blocks: the full state is back
    assert all(float(m.B.abs().sum()) == 0 for m in res.adapter.modules.values())  # still the zero global update
    assert res.metrics[1]["eval_loss"] == pytest.approx(res.metrics[0]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("method,extra,grouping", [
    ("fedit", [], {"grouped": 4}),
    ("ffa", [], {"grouped": 4}),
    ("fedit", ['attack.kind="sign_flip"', "attack.clients=[1]"], {"grouped": 4}),  # grouped clients are poisoned too
    ("flexlora", ['lora.rank_distribution="explicit"', "lora.client_ranks=[1, 2, 4, 3]"], {"grouped": 4}),
    ("ffa", ["dp.enabled=true", "dp.epsilon=8", "train.batch_size=8"], {"dp": 4}),
    ("fedra", ["memory.budgets=[0.5, 0.75, 1.0, 1.0]", "memory.unit=\"fraction\""], {"scope": 4}),
])
def test_grouped_client_training_gives_the_sequential_run(tmp_path, toy_model_dir, method, extra, grouping):
    """train.client_group = 4 trains the round's 4 clients through one forward pass: the global adapter equals the
    one-at-a-time run's within 1e-5 (fp32), traffic is identical, and each round reports how its clients trained
    (DP clients and FedRA's sub-models train one at a time, and then the runs are identical)."""
    base = [f"method={method}", "rounds=2", "model.max_length=32", "data.max_train_examples=80",
            "data.max_eval_examples=16", "clients.num=4", "clients.partition=iid", "train.local_steps=3",
            "train.batch_size=6", "model.threads=1", f"model.name={toy_model_dir}", *extra]
    runs = {g: run_experiment(load_config(None, [*base, f"train.client_group={g}"]), out_dir=tmp_path / f"g{g}",
                              progress=False, log=lambda *_: None) for g in (1, 4)}
    one, four = (runs[g].adapter.to_flat() for g in (1, 4))
    assert one.keys() == four.keys()
    for k in one:
        err = float((one[k] - four[k]).norm() / one[k].norm().clamp(min=1e-12))
        assert err <= (0.0 if "grouped" not in grouping else 1e-5), (k, err)
    for a, b in zip(runs[1].metrics, runs[4].metrics):
        assert (a["upload_bytes"], a["download_bytes"]) == (b["upload_bytes"], b["download_bytes"])
        assert "client_group" not in a and b["client_group"] == grouping
    assert any(float(v.abs().sum()) > 0 for k, v in four.items() if ".lora_B." in k)  # the runs trained

"""Using a finished run (issue 19): ``predict``, ``export --merged`` and their CLI, on runs of the tiny toy BERT.

The instruction side (``generate``) runs on SmolLM2 in tests/engine/test_instruction_runs.py."""
import json

import pytest
import torch

import fedlora
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError, DataError

BASE = ["rounds=2", "model.max_length=32", "data.max_train_examples=90", "data.max_eval_examples=40",
        "clients.num=3", "clients.partition=iid", "train.batch_size=8", "train.local_steps=3", "train.lr=5e-2",
        "model.threads=1"]


def _run(root, name, toy, *extra):
    return fedlora.run(None, [*BASE, f"model.name={toy}", *extra], out=root / name, progress=False,
                       log=lambda *_: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_model_dir):
    root = tmp_path_factory.mktemp("inference")
    return {"mean": _run(root, "mean", toy_model_dir, "method=fedit", "model.pooling=mean"),
            "pooler": _run(root, "pooler", toy_model_dir, "method=ffa", "model.pooling=pooler"),
            "pair": _run(root, "pair", toy_model_dir, "method=ffa", 'data.train="bundled:qnli/train"',
                         'data.validation="bundled:qnli/validation"', 'data.text_column="question"',
                         'data.text_pair_column="sentence"'),
            "fedsa": _run(root, "fedsa", toy_model_dir, "method=fedsa", "model.pooling=mean")}


def _val_rows(summary):
    from fedlora.data.tasks import ClassificationTask

    cfg = load_config(f"{summary['run_dir']}/config.toml")
    task = ClassificationTask(cfg.data, seed=cfg.seed)
    return task.val_rows, [task.label_names[i] for i in task.val_labels]


@pytest.mark.parametrize("which", ["mean", "pooler", "pair"])
def test_predict_reproduces_the_runs_validation_accuracy(runs, which):
    """predict() on the run's own validation rows (dicts with the run's column names) scores exactly what the run
    reported: it is the run's model, through PEFT, with the run's pooling and truncation."""
    summary = runs[which]
    rows, truth = _val_rows(summary)
    out = fedlora.predict(summary["run_dir"], rows)
    assert len(out) == len(rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in out)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in out)
    accuracy = sum(r["label"] == t for r, t in zip(out, truth)) / len(rows)
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-12)
    # the probabilities themselves: their cross-entropy is the run's final validation loss
    import math

    loss = -sum(math.log(r["probabilities"][t]) for r, t in zip(out, truth)) / len(rows)
    metrics = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl", encoding="utf-8")]
    assert loss == pytest.approx(metrics[-1]["eval_loss"], rel=1e-5)


def test_predict_takes_texts_and_pairs_as_the_run_was_trained(runs):
    one = fedlora.predict(runs["mean"]["run_dir"], ["a gripping, beautifully acted film"])
    assert set(one[0]["probabilities"]) == {"0", "1"}
    pair = fedlora.predict(runs["pair"]["run_dir"], [("Who wrote it?", "It was written by Ann.")])
    assert len(pair) == 1
    with pytest.raises(DataError, match="sentence pairs .* give two texts"):
        fedlora.predict(runs["pair"]["run_dir"], ["a single text"])
    with pytest.raises(DataError, match="single texts"):
        fedlora.predict(runs["mean"]["run_dir"], [("a", "b")])
    with pytest.raises(DataError, match="no column 'sentence'"):
        fedlora.predict(runs["mean"]["run_dir"], [{"text": "wrong column"}])
    with pytest.raises(DataError, match="empty"):
        fedlora.predict(runs["mean"]["run_dir"], ["  "])


def test_a_clients_personal_adapter_is_used_with_client(runs):
    from fedlora.models import load_adapter

    run = runs["fedsa"]["run_dir"]
    text = ["an astonishing, moving film", "tedious and far too long"]
    personal = fedlora.predict(run, text, client=1)
    tok, model = load_adapter(f"{run}/personal/client-1")
    with torch.no_grad():
        probs = torch.softmax(model(**tok(text, padding=True, return_tensors="pt")).logits, -1)
    assert [r["probabilities"]["1"] for r in personal] == pytest.approx(probs[:, 1].tolist(), abs=1e-6)
    assert personal != fedlora.predict(run, text)  # not the global adapter
    with pytest.raises(ConfigError, match="no personal adapter for client 7; clients with one: 0, 1, 2"):
        fedlora.predict(run, text, client=7)
    with pytest.raises(ConfigError, match="keeps no personal part"):
        fedlora.predict(runs["mean"]["run_dir"], text, client=0)


@pytest.mark.parametrize("which", ["mean", "pooler"])
def test_merged_export_gives_the_adapters_logits(runs, which, tmp_path):
    """export --merged writes merge_and_unload()'s model and tokenizer; loaded by transformers alone it gives the
    adapter's logits.  A mean-pooled classifier needs the folder's own class (trust_remote_code); a stock load of it
    would read a random pooler, which the test shows is different."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs[which]["run_dir"]
    out = fedlora.export_merged(run, tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt")
    _, adapter_model = fedlora.load_adapter(run)
    with torch.no_grad():
        expected = adapter_model(**batch).logits
        merged = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
        assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
        if which == "mean":
            assert (out / "fedlora_pooling.py").is_file()
            stock = AutoModelForSequenceClassification.from_pretrained(out).eval()
            assert not torch.allclose(stock(**batch).logits, expected, atol=1e-3)
        else:
            assert not (out / "fedlora_pooling.py").exists()
    with pytest.raises(ConfigError, match="not an empty folder"):
        fedlora.export_merged(run, out)


def test_cli_export_writes_a_loadable_model(runs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    assert main(["export", runs["pooler"]["run_dir"], "--merged", "--out", str(tmp_path / "m")]) == 0
    assert "wrote the merged model and its tokenizer" in capsys.readouterr().out
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").config.num_labels == 2
    (tmp_path / "file").write_text("x")
    assert main(["export", runs["pooler"]["run_dir"], "--merged", "--out", str(tmp_path / "file")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_predict_prints_a_label_and_writes_jsonl(runs, tmp_path, capsys):
    run = runs["mean"]["run_dir"]
    assert main(["predict", run, "a gripping, beautifully acted film"]) == 0
    label, probs = capsys.readouterr().out.strip().split("\t")
    assert label in ("0", "1") and "p(0)=" in probs and "p(1)=" in probs
    src = tmp_path / "in.jsonl"
    src.write_text('{"sentence": "wonderful", "id": 7}\n\n{"sentence": "awful", "id": 8}\n', encoding="utf-8")
    assert main(["predict", run, "--file", str(src), "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and all(r["prediction"] in ("0", "1") for r in rows)
    assert rows[0]["prediction"] == fedlora.predict(run, ["wonderful"])[0]["label"]


@pytest.mark.parametrize("args, needle", [
    (["predict", "{run}"], "needs an input"),
    (["predict", "{run}", "x", "--file", "{tmp}/in.jsonl"], "not both"),
    (["predict", "{run}", "x", "--output", "{tmp}/o.jsonl"], "--output goes with --file"),
    (["predict", "{run}", "--file", "{tmp}/missing.jsonl"], "input file not found"),
    (["predict", "{run}", "--file", "{tmp}/bad.jsonl"], "line 2 is not JSON"),
    (["predict", "{tmp}/nowhere", "x"], "no such run directory"),
    (["predict", "{tmp}", "x"], "neither a fedlora run directory nor an adapter folder"),
    (["predict", "{run}", "x", "--client", "0"], "no personal adapter for client 0"),
    (["generate", "{run}", "Say hi"], "`generate` needs an instruction adapter"),
    (["export", "{run}", "--merged", "--out", "{tmp}"], "not an empty folder"),
])
def test_cli_bad_inputs_exit_2_with_one_message(runs, tmp_path, capsys, args, needle):
    (tmp_path / "in.jsonl").write_text('{"sentence": "ok"}\n')
    (tmp_path / "bad.jsonl").write_text('{"sentence": "ok"}\n{oops\n')
    argv = [a.format(run=runs["mean"]["run_dir"], tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_version_and_run_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedlora {fedlora.__version__}"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "fedlora info --config-keys" in text and "examples:" in text


def test_every_run_writes_its_model_card(runs):
    from pathlib import Path

    card = (Path(runs["pooler"]["run_dir"]) / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and f"| {runs['pooler']['final_score']:.4f} |" in card
    assert "mean-pooled" not in card  # its own pooler: nothing to warn about
    personal = Path(runs["fedsa"]["run_dir"]) / "personal"
    assert all("personal adapter" in (personal / f"client-{k}" / "README.md").read_text() for k in range(3))

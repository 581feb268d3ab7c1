"""Command line contract: exit 0 on success, non-zero with a short message (no traceback) on bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fedlora(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fedlora", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env, timeout=600)


@pytest.mark.parametrize("args, needle", [
    (["--set", "lora.rank=0"], "lora.rank must be a positive integer, got 0"),
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--config", "missing.toml"], "config file not found"),
    (["--set", "data.train=/tmp/definitely-missing.jsonl"], "data.train must be an existing data file"),
    (["--set", "model.name=/no/such/model"], "no such directory"),
    (["--set", "dp.epsilon=3"], "would be ignored by this run: dp.epsilon (dp.enabled = false"),
    (["--set", 'lora.target_modules=["nope"]'], "lora.target_modules ['nope'] match no linear module"),
    (["--set", "lora.rank=1000"], "lora.rank = 1000 exceeds the size of target module"),
    (["--set", "memory.budgets=[0.5, 0.5]"], "memory.budgets ([memory] is read only by layer-assignment methods"),
    (["--set", 'data.client_column="owner"'], "data.client_column (it is read only with clients.partition = 'by_task'"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, args, needle):
    r = _fedlora("run", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    assert len(r.stdout.strip().splitlines()) <= 1  # no configuration dump before the refusal
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind


def test_out_pointing_at_an_existing_run_exits_2(tmp_path, capsys):
    from fedlora.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["run", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run; continue it with --resume" in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, toy_model_dir, capsys):
    from fedlora.cli import main

    assert main(["run", "--dry-run", "--config", str(REPO / "examples/ffa_dp_sst2.toml"), "--set",
                 f"model.name={toy_model_dir}", "--set", "data.max_train_examples=300", "--set", "train.batch_size=16",
                 "--out",
                 str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "plan: ffa on" in out and "3 clients" in out and "sigma" in out and "epsilon <= 3" in out
    assert "round 1 traffic" in out and "dry run: nothing was trained or written" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, needle", [
    (b'{"round": 1}\n{oops\n', "line 2 is not JSON"),
    (b'\xff\xfe\x00garbage', "is not UTF-8 text"),
    (b"", "has no rounds yet"),
    (b"[1, 2]\n", "line 1 is not a JSON object"),
    (b"{\"loss\": 1}\n", "row 1 is not a metrics row"),
])
def test_report_on_a_damaged_metrics_file_exits_2(tmp_path, capsys, content, needle):
    from fedlora.cli import main

    (tmp_path / "metrics.jsonl").write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_compare_refuses_a_bad_epsilon_in_a_grid(tmp_path, capsys, value):
    from fedlora.cli import main

    assert main(["compare", "--methods", "ffa", "--grid", f"dp.epsilon=3,{value}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "each value must be a positive number or inf" in err and len(err.strip().splitlines()) == 1


def test_bad_data_file_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "", "label": 0}\n')
    r = _fedlora("run", "--set", f"data.train={bad}", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "row 2: column 'sentence' is empty" in r.stderr and "Traceback" not in r.stderr


def test_info_lists_methods_models_and_data():
    r = _fedlora("info", "--config-keys")
    assert r.returncode == 0
    for needle in ("fedit", "ffa", "minilm", "bundled:sst2/train", "lora.rank", "dirichlet", "fedadam", "fedyogi",
                   "server.momentum", "fedex", "rolora", "fedsvd", "fedsa", "lorafair", "train.prox_mu", "FedProx",
                   "by_task", "example configs", "tiny.toml", "ffa_dp_sst2.toml"):
        assert needle in r.stdout


def test_tiny_example_runs_with_a_method_override(tmp_path):
    out = tmp_path / "run"
    r = _fedlora("run", "--config", "examples/tiny.toml", "--set", "method=fedit", "--set", "rounds=1",
                 "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "final validation accuracy" in r.stdout
    assert "# resolved configuration" not in r.stdout  # --quiet: the configuration is in the run directory only
    assert 'method = "fedit"' in (out / "config.toml").read_text()
    with open(out / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1


@pytest.mark.parametrize("method", ["fedex", "rolora", "fedsvd", "fedsa", "lorafair"])
def test_tiny_example_runs_each_baseline(tmp_path, method, toy_model_dir):
    """The contract ``--set method=fedsa|fedex|fedsvd|rolora|lorafair`` on examples/tiny.toml (on the toy model, two
    rounds, so that RoLoRA trains both factors and FedSA-LoRA's clients come back to their state)."""
    from fedlora.cli import main

    assert main(["run", "--config", str(REPO / "examples/tiny.toml"), "--set", f"method={method}", "--set", "rounds=2",
                 "--set", f"model.name={toy_model_dir}", "--set", "data.max_train_examples=90",
                 "--set", "data.max_eval_examples=30", "--set", "train.prox_mu=0.01", "--set", "model.threads=1",
                 "--out", str(tmp_path / method), "--quiet"]) == 0
    assert json.loads((tmp_path / method / "summary.json").read_text())["method"] == method


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.toml")))
def test_every_example_config_loads_from_a_copy_outside_our_tree(example, tmp_path, monkeypatch):
    """Every example works from a clone anywhere: its data ships with the package (no ../shared), and a relative path
    in a config file is read relative to that file (saved absolute in the run's config.toml)."""
    import shutil

    from fedlora.config import load_config, to_toml

    text = (REPO / "examples" / example).read_text(encoding="utf-8")
    assert "../shared" not in text
    copy = tmp_path / "clone" / "examples" / example
    copy.parent.mkdir(parents=True)
    shutil.copy(REPO / "examples" / example, copy)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(copy)
    for source in (cfg.data.train, cfg.data.validation, cfg.data.instructions):
        assert not source or source.startswith(("bundled:", "hf:")) or Path(source).is_absolute()
    assert "../" not in to_toml(cfg)


def test_relative_paths_follow_the_config_file_and_set_follows_the_working_directory(tmp_path, monkeypatch):
    from fedlora.config import load_config

    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "t.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n')
    (tmp_path / "cfg" / "run.toml").write_text('[data]\ntrain = "data/t.jsonl"\nvalidation = "data/t.jsonl"\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(tmp_path / "cfg" / "run.toml")
    assert cfg.data.train == str(tmp_path / "cfg" / "data" / "t.jsonl")
    monkeypatch.chdir(tmp_path / "cfg")
    cfg = load_config(None, ["data.train=data/t.jsonl", "data.validation=./data/t.jsonl", "model.name=minilm"])
    assert cfg.data.validation == str(tmp_path / "cfg" / "data" / "t.jsonl") and cfg.model.name == "minilm"


def test_sentence_pair_example_runs_one_round(tmp_path):
    r = _fedlora("run", "--config", "examples/rte.toml", "--set", "rounds=1", "--set", "data.max_train_examples=90",
                 "--set", "data.max_eval_examples=16", "--set", "train.local_steps=1", "--set", "model.max_length=32",
                 "--out", str(tmp_path / "rte"), "--quiet")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("method", ["flexlora", "flora"])  # hetlora, fedit: tests/engine/test_instruction_runs.py
def test_flexlora_tiny_example_runs_with_a_heterogeneous_method(tmp_path, method):
    r = _fedlora("run", "--config", "examples/flexlora_tiny.toml", "--set", f"method={method}", "--set", "rounds=1",
                 "--set", "train.local_steps=1", "--set", "train.batch_size=2", "--set", "eval.max_client_examples=1",
                 "--set", "eval.max_new_tokens=4", "--out", str(tmp_path / method), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "unseen-task rougeL" in r.stdout and "client ranks: r2 x1, r4/8 x1, r8 x1" in r.stdout
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["method"] == method and summary["headline_metric"] == "rougeL"

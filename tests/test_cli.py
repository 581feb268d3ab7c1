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
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, args, needle):
    r = _fedlora("run", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3


def test_bad_data_file_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "", "label": 0}\n')
    r = _fedlora("run", "--set", f"data.train={bad}", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "row 2: column 'sentence' is empty" in r.stderr and "Traceback" not in r.stderr


def test_info_lists_methods_models_and_data():
    r = _fedlora("info", "--config-keys")
    assert r.returncode == 0
    for needle in ("fedit", "ffa", "minilm", "bundled:sst2/train", "lora.rank", "dirichlet", "fedadam", "fedyogi",
                   "server.momentum", "fedex", "rolora", "fedsvd", "fedsa", "lorafair", "train.prox_mu", "FedProx"):
        assert needle in r.stdout


def test_tiny_example_runs_with_a_method_override(tmp_path):
    out = tmp_path / "run"
    r = _fedlora("run", "--config", "examples/tiny.toml", "--set", "method=fedit", "--set", "rounds=1",
                 "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert 'method = "fedit"' in r.stdout and "final validation accuracy" in r.stdout
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
def test_every_example_config_is_valid(example):
    from fedlora.config import load_config

    if not (REPO.parent / "shared" / "data").is_dir() and "shared" in (REPO / "examples" / example).read_text():
        pytest.skip("../shared/data is not beside this checkout")
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        load_config(REPO / "examples" / example)
    finally:
        os.chdir(cwd)


def test_sentence_pair_example_runs_one_round(tmp_path):
    if not (REPO.parent / "shared" / "data" / "glue" / "rte").is_dir():
        pytest.skip("../shared/data is not beside this checkout")
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

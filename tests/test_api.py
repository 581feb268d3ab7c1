"""The Python API (issue 19): fedlora.run / fedlora.compare return what the CLI writes, validate at the door."""
import json
from pathlib import Path

import pytest

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError

TOY = ["rounds=1", "model.max_length=32", "data.max_train_examples=60", "data.max_eval_examples=20", "clients.num=2",
       "clients.partition=iid", "train.batch_size=8", "train.local_steps=2", "model.threads=1"]


def test_run_returns_the_summary_and_takes_a_config_object(tmp_path, toy_model_dir):
    quiet = {"progress": False, "log": lambda *_: None}
    summary = fedlora.run(None, [*TOY, f"model.name={toy_model_dir}"], out=tmp_path / "a", **quiet)
    assert summary["run_dir"] == str(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "run_dir"} == saved
    cfg = load_config(None, [*TOY, f"model.name={toy_model_dir}"])
    again = fedlora.run(cfg, ["method=fedit"], out=tmp_path / "b", **quiet)
    assert again["method"] == "fedit" and cfg.method == "ffa"  # the object is not changed
    # resume: a finished run grows by one round
    more = fedlora.run(None, [*TOY, f"model.name={toy_model_dir}", "rounds=2"], resume=tmp_path / "a", **quiet)
    assert more["rounds"] == 2 and more["run_dir"] == str(tmp_path / "a")


@pytest.mark.parametrize("call, needle", [
    (lambda: fedlora.run(None, "rounds=2"), "list of 'KEY=VALUE' strings"),
    (lambda: fedlora.run(42), "config must be a TOML file path"),
    (lambda: fedlora.run(None, ["lora.rank=0"]), "lora.rank must be a positive integer"),
    (lambda: fedlora.run(None, [], out="x", resume="y"), "drop --out"),
    (lambda: fedlora.run(None, [], resume="/no/such/run"), "not a run directory"),
    (lambda: fedlora.compare(None, [], out="x"), "--methods needs at least one method"),
    (lambda: fedlora.compare(None, ["fedit"], grid={"train.lr": ["1,2"]}, out="x"), "cannot contain a comma"),
])
def test_bad_input_raises_before_any_work(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


def test_compare_takes_dicts_and_returns_one_row_per_cell(tmp_path, toy_model_dir):
    rows = fedlora.compare(None, ["fedit", "ffa"], [*TOY, f"model.name={toy_model_dir}"], out=tmp_path / "cmp",
                           grid={"lora.rank": [2, 4]}, method_overrides={"fedit": ["train.lr=1e-3"]},
                           progress=False, log=lambda *_: None)
    assert sorted((r["method"], r["lora.rank"]) for r in rows) == [("fedit", "2"), ("fedit", "4"), ("ffa", "2"),
                                                                  ("ffa", "4")]
    cell = Path(tmp_path / "cmp" / "cells" / "method=fedit__lora.rank=2__seed=0")
    assert load_config(cell / "config.toml").train.lr == 1e-3
    assert (tmp_path / "cmp" / "summary.md").is_file()

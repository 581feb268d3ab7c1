"""Settings that would do nothing are refused by `run` and noted by `compare` (issue 19)."""
import pytest

import fedlora
from fedlora.config import load_config
from fedlora.config_ignored import ignored_settings, non_private_dp, refuse_ignored
from fedlora.errors import ConfigError


@pytest.mark.parametrize("overrides, key, why", [
    (["dp.epsilon=3"], "dp.epsilon", "dp.enabled = false"),
    (["dp.clip=0.5"], "dp.clip", "not private"),
    (["memory.budgets=[0.5, 0.5]"], "memory.budgets", "layer-assignment methods (fedra, pilot, randk, topk)"),
    (["method=fedit", "hetlora.gamma=0.9"], "hetlora.gamma", "read only by method 'hetlora'"),
    (["method=ffa", "fedsb.init_examples=10"], "fedsb.init_examples", "method 'fedsb'"),
    (["server.momentum=0.5"], "server.momentum", "server.optimizer = 'fedavgm'"),
    (["server.optimizer=fedadagrad", "server.beta2=0.9"], "server.beta2", "'fedadam' or 'fedyogi'"),
    (["method=flexlora", "server.lr=2"], "server.lr", "own server rule"),
    (["train.momentum=0.9"], "train.momentum", "train.optimizer = 'sgd'"),
    (["train.local_epochs=1", "train.local_steps=5"], "train.local_steps", "train.local_epochs = 0"),
    (["clients.partition=iid", "clients.dirichlet_alpha=1.0"], "clients.dirichlet_alpha", "'dirichlet'"),
    (["robust.trim_fraction=0.2"], "robust.trim_fraction", "trimmed_mean"),
    (['attack.kind="sign_flip"', "attack.clients=[0]", "attack.scale=5"], "attack.scale", "attack.kind = 'scale'"),
    (["attack.clients=[0]"], "attack.clients", "an attack.kind other than 'none'"),
    (['data.loss_on="response"'], "data.loss_on", "data.task = 'instruction'"),
    (["eval.max_new_tokens=8"], "eval.max_new_tokens", "instruction"),
    (['data.client_column="owner"'], "data.client_column", "clients.partition = 'by_task'"),
    (["method=fedra", "memory.budgets=[0.5, 0.5, 0.5]", "clients.num=3", "pilot.dwa=false"], "pilot.dwa",
     "read only by method 'pilot'"),
])
def test_each_ignored_setting_is_named_with_its_reason(overrides, key, why):
    found = dict(ignored_settings(load_config(None, overrides)))
    assert key in found and why in found[key], found
    with pytest.raises(ConfigError, match=f"would be ignored by this run: {key}"):
        refuse_ignored(load_config(None, overrides))


@pytest.mark.parametrize("overrides", [
    [], ["dp.enabled=true", "dp.epsilon=3"], ["method=pilot", "memory.budgets=[0.5, 0.5, 0.5]", "clients.num=3"],
    ["method=hetlora", "hetlora.gamma=0.9"], ["method=pilot", "pilot.dwa=false", "memory.budgets=[0.5, 0.5]"],
    ["clients.partition=by_task", 'data.client_column="owner"'], ["server.optimizer=fedavgm", "server.momentum=0.5"],
    ["train.optimizer=sgd", "train.momentum=0.9"], ["robust.aggregation=trimmed_mean", "robust.trim_fraction=0.2"],
])
def test_settings_that_are_read_pass(overrides):
    assert ignored_settings(load_config(None, overrides)) == []


def test_every_example_config_sets_only_what_it_uses():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml")):
        assert ignored_settings(load_config(path)) == [], path.name


def test_run_refuses_before_any_work_and_a_non_private_cell_resets_dp(tmp_path):
    with pytest.raises(ConfigError, match="dp.epsilon"):
        fedlora.run(None, ["dp.epsilon=3"], out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    cfg = non_private_dp(load_config(None, ["dp.epsilon=3", "dp.clip=0.5"]))
    assert cfg.dp == type(cfg.dp)()
    from fedlora.grid import plan_cells

    cells = plan_cells(None, ["dp.clip=0.5"], ["ffa"], 1, [("dp.epsilon", ["3", "inf"])])
    assert [c.dp.enabled for _, c in cells] == [True, False]
    assert cells[0][1].dp.clip == 0.5 and cells[1][1].dp.epsilon == 0 and cells[1][1].dp.clip == 1.0


def test_compare_notes_ignored_settings_once_per_cell(tmp_path, toy_model_dir):
    lines = []
    fedlora.compare(None, ["fedit", "hetlora"], ["rounds=1", "model.max_length=32", "data.max_train_examples=40",
                                                 "data.max_eval_examples=10", "clients.num=2", "clients.partition=iid",
                                                 "train.local_steps=1", "hetlora.gamma=0.9", "model.threads=1",
                                                 f"model.name={toy_model_dir}"],
                    out=tmp_path / "cmp", progress=False, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "method=fedit" in notes[0] and "hetlora.gamma" in notes[0]

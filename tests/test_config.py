"""Typed config: TOML + --set overrides, validation messages that name key, value and what is valid."""
import math

import pytest

from fedlora.config import ExperimentConfig, describe, load_config, to_toml
from fedlora.errors import ConfigError


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert (cfg.method, cfg.model.name, cfg.lora.rank, cfg.lora.target_modules) == ("ffa", "minilm", 8,
                                                                                   ["query", "value"])
    assert (cfg.clients.num, cfg.clients.partition, cfg.clients.dirichlet_alpha) == (8, "dirichlet", 0.5)
    assert cfg.data.train == "bundled:sst2/train"


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('method = "fedit"\nrounds = 4\n[lora]\nrank = 2\n[train]\nlr = 1\n')
    cfg = load_config(f, ["lora.rank=4", "dp.enabled=true", "dp.epsilon=3", "method=ffa",
                          'lora.target_modules=["query"]', "data.labels=[0, 1]"])
    assert cfg.method == "ffa" and cfg.rounds == 4 and cfg.lora.rank == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.dp.enabled is True and cfg.dp.epsilon == 3.0
    assert cfg.lora.target_modules == ["query"] and cfg.data.labels == [0, 1]


def test_inf_epsilon_parses():
    assert math.isinf(load_config(None, ["dp.epsilon=inf"]).dp.epsilon)


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(None, ["method=fedit", "lora.alpha=32", "clients.proportions=[[0.1,0.9],[0.9,0.1],[0.5,0.5]]",
                             "clients.partition=label_skew", "clients.num=3"])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("override, needle", [
    ("lora.rank=0", "lora.rank must be a positive integer, got 0"),
    ("method=fedsgd", "method must be one of"),
    ("rounds=-1", "rounds must be a positive integer"),
    ("clients.fraction=0", "clients.fraction must be in (0, 1]"),
    ("clients.partition=zipf", "clients.partition must be one of 'iid', 'dirichlet', 'label_skew'"),
    ("train.optimizer=lion", "train.optimizer must be one of 'adamw', 'sgd'"),
    ("train.grad_accum=3", "train.grad_accum must be a divisor of train.batch_size (16)"),
    ("train.client_group=0", "train.client_group must be a positive integer"),
    ("lora.rank=two", "lora.rank must be of type int, got 'two'"),
    ("lora.nope=1", "unknown config key 'lora.nope'"),
    ("banana=1", "unknown config key 'banana'"),
    ("lora=3", "'lora' is a section"),
    ("dp.enabled=true", "dp.epsilon must be a positive finite target"),
    ("data.train=/no/such/file.jsonl", "data.train must be an existing data file"),
    ("data.train=bundled:imdb/train", "data.train must be one of bundled:sst2/train"),
    ("clients.proportions=[[1.0]]", "clients.proportions must be empty unless"),
    ("noequals", "--set expects KEY=VALUE"),
])
def test_invalid_values_fail_with_a_message_naming_key_value_and_valid(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_grouped_training_is_refused_with_gradient_checkpointing():
    """A grouped forward draws each client's dropout from the client's own state: recomputing it would redraw."""
    with pytest.raises(ConfigError, match="train.client_group must be 1 with train.gradient_checkpointing"):
        load_config(None, ["train.client_group=4", "train.gradient_checkpointing=true"])
    assert load_config(None, ["train.client_group=4"]).train.client_group == 4


def test_bad_proportion_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"clients.proportions\[1\] must be a list of non-negative"):
        load_config(None, ["clients.partition=label_skew", "clients.num=2", "clients.proportions=[[0.5,0.5],[0.7,0.7]]"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = = 'x'")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_key_has_help():
    rows = describe()
    assert len(rows) > 40 and all(help_ for _, _, help_ in rows)
    assert ("lora.rank", 8) in [(k, d) for k, d, _ in rows]
    assert isinstance(ExperimentConfig().lora.target_modules, list)


@pytest.mark.parametrize("override,key", [("hetlora.gamma=2", "hetlora.gamma"), ("pilot.dwa_max=0.5", "pilot.dwa_max"),
                                          ("fedsvd.period=-1", "fedsvd.period"), ("lorafair.steps=0", "lorafair.steps"),
                                          ("flora.alpha_per_rank=-1", "flora.alpha_per_rank")])
def test_a_method_section_checks_itself(override, key):
    """The sections methods own carry their own ``check()``; validation calls it like the engine sections' checks."""
    from fedlora.config_fields import FedSVDConfig

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="fedsvd.period"):
        FedSVDConfig(period=-2).check()

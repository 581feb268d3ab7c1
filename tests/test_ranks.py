"""Client resource distributions (FlexLoRA, docs/methods.md §9; oracle O17, docs/oracles.md) and per-module rank
assignment."""
import math

import pytest

from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.ranks import (TYPE_PROBABILITIES, client_rank_configs, draw_types, module_ranks, normal_type_probabilities,
                           smallest_config)


def test_normal_distribution_is_the_intended_bell_O17():
    assert normal_type_probabilities() == pytest.approx((0.0575, 0.4425, 0.4425, 0.0575), abs=5e-5)


@pytest.mark.parametrize("dist", sorted(TYPE_PROBABILITIES))
def test_empirical_type_frequencies_over_1613_clients_are_within_3_standard_errors(dist):
    n = 1613
    types = draw_types(dist, n, seed=0)
    for i, p in enumerate(TYPE_PROBABILITIES[dist]):
        freq = types.count(i) / n
        assert abs(freq - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1e-12, (dist, i, freq, p)
    assert types == draw_types(dist, n, seed=0) and types != draw_types(dist, n, seed=1)


def test_heavy_tails_follow_the_code_not_the_readme():
    assert TYPE_PROBABILITIES["heavy_tail_light"] == (0.80, 0.05, 0.05, 0.10)
    assert TYPE_PROBABILITIES["heavy_tail_strong"] == (0.05, 0.05, 0.10, 0.80)


def test_client_configs_from_each_kind_of_setting():
    cfg = load_config(None, ["lora.rank=4"])
    assert client_rank_configs(cfg.lora, 3, 0) == [(4, 4)] * 3
    cfg = load_config(None, ['lora.rank_distribution="explicit"', "lora.client_ranks=[2, [4, 8], 8]", "clients.num=3"])
    assert client_rank_configs(cfg.lora, 3, 0) == [(2, 2), (4, 8), (8, 8)]
    assert smallest_config([(2, 8), (4, 4)]) == (2, 4)
    cfg = load_config(None, ['lora.rank_distribution="uniform"', "lora.rank_types=[1, [2, 3], 4, 5]"])
    assert set(client_rank_configs(cfg.lora, 200, 0)) == {(1, 1), (2, 3), (4, 4), (5, 5)}


def test_attention_and_mlp_modules_get_their_own_rank():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    ranks = module_ranks((2, 8), names, ["gate_proj", "up_proj", "down_proj"])
    assert ranks == {names[0]: 2, names[1]: 8, names[2]: 8}


@pytest.mark.parametrize("overrides, key", [
    (['lora.rank_distribution="explicit"'], "lora.client_ranks"),
    (["lora.client_ranks=[2, 4]"], "lora.client_ranks"),
    (['lora.rank_distribution="explicit"', "lora.client_ranks=[2, 0]", "clients.num=2"], r"lora.client_ranks\[1\]"),
    (['lora.rank_distribution="explicit"', "lora.client_ranks=[2, 4]", "clients.num=3"], "lora.client_ranks"),
    (['lora.rank_distribution="uniform"', "lora.rank_types=[1, 2]"], "lora.rank_types"),
    (["clients.heldout_tasks=2"], "clients.heldout_tasks"),
    (["clients.num=0"], "clients.num"),
])
def test_bad_rank_settings_fail_at_the_door(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_normal_code_is_flexlora_code_read_literally():
    """The code applies the bell (5.75, 44.25, 44.25, 5.75 %) to its own type order r8, r200, r30/200, r30: in Table 1
    order that is r8 5.75 %, r30 5.75 %, r30/200 44.25 %, r200 44.25 % (our 'normal' keeps the middle types likely)."""
    from fedlora.ranks import TYPE_PROBABILITIES

    code, bell = TYPE_PROBABILITIES["normal_code"], TYPE_PROBABILITIES["normal"]
    assert code == pytest.approx((0.0575, 0.0575, 0.4425, 0.4425), abs=5e-4)
    assert bell == pytest.approx((0.0575, 0.4425, 0.4425, 0.0575), abs=5e-4)
    draws = draw_types("normal_code", 4000, seed=1)
    assert [draws.count(i) / 4000 for i in range(4)] == pytest.approx(code, abs=0.025)

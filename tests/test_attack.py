"""Malicious clients for measuring defences (attack.*): the poisoned uploads, the flipped labels, the checks."""
import math

import pytest
import torch

from fedlora.attack import (check_attack, client_examples, flip_labels, is_malicious, poison_update,
                            update_poisoner)
from fedlora.config import load_config
from fedlora.data.tasks import Examples
from fedlora.errors import ConfigError


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    sent = {"m.lora_A": torch.randn(2, 5, generator=g), "m.lora_B": torch.randn(4, 2, generator=g)}
    up = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sent.items()}
    return sent, up


def _norm(d):
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


def _delta(up, sent):
    return {k: up[k].double() - sent[k].double() for k in up}


def test_scale_multiplies_the_update_not_the_weights():
    sent, up = _pair()
    bad = poison_update("scale", up, sent, scale=10.0)
    for k in up:
        torch.testing.assert_close(_delta(bad, sent)[k], 10 * _delta(up, sent)[k], rtol=1e-5, atol=1e-6)
        assert bad[k].dtype == up[k].dtype


def test_sign_flip_reverses_the_update_at_its_own_norm():
    sent, up = _pair()
    bad = poison_update("sign_flip", up, sent)
    for k in up:
        torch.testing.assert_close(_delta(bad, sent)[k], -_delta(up, sent)[k], rtol=1e-5, atol=1e-6)


def test_gaussian_has_the_shape_and_norm_of_the_update_and_is_seeded():
    sent, up = _pair()
    bad = poison_update("gaussian", up, sent, seed=3)
    assert {k: v.shape for k, v in bad.items()} == {k: v.shape for k, v in up.items()}
    assert _norm(_delta(bad, sent)) == pytest.approx(_norm(_delta(up, sent)), rel=1e-5)
    cos = sum(float((_delta(bad, sent)[k] * _delta(up, sent)[k]).sum()) for k in up) / _norm(_delta(up, sent)) ** 2
    assert abs(cos) < 0.9  # not the honest direction
    again = poison_update("gaussian", up, sent, seed=3)
    other = poison_update("gaussian", up, sent, seed=4)
    assert all(torch.equal(bad[k], again[k]) for k in up)
    assert any(not torch.equal(bad[k], other[k]) for k in up)


def test_unknown_update_attack():
    sent, up = _pair()
    with pytest.raises(ValueError, match="not an update attack"):
        poison_update("label_flip", up, sent)


def test_only_the_named_clients_of_an_update_attack_get_a_poisoner():
    cfg = load_config(None, ['attack.kind="sign_flip"', "attack.clients=[1, 3]"]).attack
    sent, up = _pair()
    assert is_malicious(cfg, 1) and not is_malicious(cfg, 0)
    assert update_poisoner(cfg, 0, sent, 0, 0) is None
    poison = update_poisoner(cfg, 3, sent, 0, 0)
    for k in up:
        torch.testing.assert_close(_delta(poison(up), sent)[k], -_delta(up, sent)[k], rtol=1e-5, atol=1e-6)
    flip = load_config(None, ['attack.kind="label_flip"', "attack.clients=[1]"]).attack
    assert update_poisoner(flip, 1, sent, 0, 0) is None  # a label flipper uploads what it trained
    assert update_poisoner(load_config(None, []).attack, 1, sent, 0, 0) is None


def test_the_gaussian_poisoner_draws_afresh_each_round_and_client():
    cfg = load_config(None, ['attack.kind="gaussian"', "attack.clients=[0, 1]"]).attack
    sent, up = _pair()
    a, b, c = (update_poisoner(cfg, cid, sent, t, 0)(up) for cid, t in ((0, 0), (0, 1), (1, 0)))
    assert not torch.equal(a["m.lora_B"], b["m.lora_B"]) and not torch.equal(a["m.lora_B"], c["m.lora_B"])


def test_label_flip_maps_y_to_L_minus_1_minus_y_for_the_malicious_clients_only():
    ex = Examples([[1, 2], [3], [4, 5, 6]], None, torch.tensor([0, 1, 2]), 0)
    torch.testing.assert_close(flip_labels(ex, 3).labels, torch.tensor([2, 1, 0]))
    assert ex.labels.tolist() == [0, 1, 2]  # the honest copy is untouched
    binary = Examples([[1], [2]], None, torch.tensor([0, 1]), 0)
    cfg = load_config(None, ['attack.kind="label_flip"', "attack.clients=[1]"]).attack
    out = [client_examples(cfg, [binary, binary], k, 2) for k in (0, 1)]
    assert out[0] is binary and out[1].labels.tolist() == [1, 0]
    assert out[1].input_ids == binary.input_ids and binary.labels.tolist() == [0, 1]  # the engine's copy stays clean


@pytest.mark.parametrize("overrides, match", [
    (['attack.kind="scale"'], "attack.clients must be at least one client id"),
    (['attack.kind="scale"', "attack.clients=[1, 1]"], "distinct"),
    (['attack.kind="scale"', "attack.clients=[-1]"], r"attack.clients\[0\] must be a non-negative client id"),
    (['attack.kind="scale"', "attack.clients=[0]", "attack.scale=0"], "attack.scale must be a positive"),
    (['attack.kind="krum"', "attack.clients=[0]"], "attack.kind"),
])
def test_bad_attack_settings_are_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_attack_checks_against_the_federation():
    cfg = load_config(None, ['attack.kind="label_flip"', "attack.clients=[0, 4]"]).attack

    class Cls:
        task_type = "SEQ_CLS"

    class LM:
        task_type = "CAUSAL_LM"

    with pytest.raises(ConfigError, match=r"attack.clients \[4\] are not clients of this run \(ids 0..3\)"):
        check_attack(cfg, 4, Cls())
    with pytest.raises(ConfigError, match="at least one must be honest"):
        check_attack(load_config(None, ['attack.kind="scale"', "attack.clients=[0, 1]"]).attack, 2, Cls())
    with pytest.raises(ConfigError, match="needs a classification task"):
        check_attack(cfg, 8, LM())
    check_attack(cfg, 8, Cls())

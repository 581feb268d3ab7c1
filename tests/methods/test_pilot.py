"""Fed-piLot's pure parts: IG-Score masking and combination, DWA weights and STAgg (oracles O27, O28)."""
import pytest
import torch

from fedlora.layers import block_index, layer_groups, modules_of
from fedlora.methods.pilot import (STAggSettings, affordable_scores, combined_scores, dwa_weights, stagg,
                                   update_global_scores)


def _tensors(seed, keys=("l0.a", "l0.b", "l1.a", "l2.a")):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 4, generator=g, dtype=torch.float64) for k in keys}


LAYER_OF = {"l0.a": 0, "l0.b": 0, "l1.a": 1, "l2.a": 2}


def test_O27_everyone_trains_everything_and_no_momentum_is_fedavg():
    theta = _tensors(0)
    ups = [_tensors(1), _tensors(2), _tensors(3)]
    sizes = [10, 30, 60]
    new, _, coverage = stagg(theta, ups, sizes, LAYER_OF, 3, {}, STAggSettings(kappa=0.0))
    assert coverage == [1.0, 1.0, 1.0]
    for k in theta:
        fedavg = sum(n / 100 * u[k] for n, u in zip(sizes, ups))
        torch.testing.assert_close(new[k], fedavg, rtol=1e-12, atol=1e-12)


def test_O27_untrained_layer_with_zero_momentum_is_unchanged_and_momentum_decays():
    theta = _tensors(0)
    ups = [{k: v for k, v in _tensors(1).items() if LAYER_OF[k] == 0}]
    new, mom, coverage = stagg(theta, ups, [5], LAYER_OF, 3, {}, STAggSettings())
    assert coverage == [1.0, 0.0, 0.0]
    assert torch.equal(new["l1.a"], theta["l1.a"]) and torch.equal(new["l2.a"], theta["l2.a"])
    # next round nobody trains layer 0: its stale momentum decays by γ and still moves it
    new2, mom2, _ = stagg(new, [{}], [5], LAYER_OF, 3, mom, STAggSettings(gamma=0.5, kappa=0.5))
    torch.testing.assert_close(mom2["l0.a"], 0.5 * mom["l0.a"])
    torch.testing.assert_close(new2["l0.a"], new["l0.a"] + 0.5 * mom2["l0.a"])


def test_O28_a_layer_depends_only_on_the_clients_that_trained_it():
    theta = _tensors(0)
    a = {k: v for k, v in _tensors(1).items() if LAYER_OF[k] in (0, 1)}
    b = {k: v for k, v in _tensors(2).items() if LAYER_OF[k] == 1}
    settings = STAggSettings(kappa=0.0)
    with_b, _, _ = stagg(theta, [a, b], [10, 10], LAYER_OF, 3, {}, settings)
    other_b = {k: v + 1.0 for k, v in b.items()}
    with_other, _, _ = stagg(theta, [a, other_b], [10, 10], LAYER_OF, 3, {}, settings)
    torch.testing.assert_close(with_b["l0.a"], with_other["l0.a"])  # b never trained layer 0
    assert not torch.allclose(with_b["l1.a"], with_other["l1.a"])
    # a client that trained nothing leaves the model as it was (spatial only, no DWA, no momentum)
    same, _, _ = stagg(theta, [{}, {}], [3, 4], LAYER_OF, 3, {}, STAggSettings(kappa=0.0))
    assert all(torch.equal(same[k], theta[k]) for k in theta)
    idle = stagg(theta, [a, {}], [10, 10], LAYER_OF, 3, {}, settings, use_dwa=False)[0]
    alone = stagg(theta, [a], [10], LAYER_OF, 3, {}, settings, use_dwa=False)[0]
    assert all(torch.allclose(idle[k], alone[k]) for k in theta)


def test_dwa_lets_under_covered_layers_move_further():
    w = dwa_weights([1.0, 0.5, 0.25, 0.0], w_max=3.0)
    assert w[3] == 0.0 and w[0] < w[1] < w[2]
    assert sum(w[:3]) / 3 == pytest.approx(1.0)
    assert dwa_weights([0.1, 1.0], w_max=3.0)[0] / dwa_weights([0.1, 1.0], w_max=3.0)[1] == pytest.approx(3.0)


def test_ig_scores_mask_unaffordable_layers_and_combine_with_the_global_score():
    aff = affordable_scores([2.0, 1.0, 5.0], costs=[1.0, 1.0, 9.0], capacity=4.0)
    assert aff == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert affordable_scores([1.0, 1.0], [5.0, 6.0], 1.0) == [0.0, 0.0]
    assert combined_scores(None, aff, 0.5) == aff
    assert combined_scores([0.0, 0.0, 1.0], aff, 0.5) == pytest.approx([1 / 3, 1 / 6, 0.5])
    g = update_global_scores(None, [[1.0, 0.0], [0.0, 1.0]], [1, 3], beta=0.9)
    assert g == pytest.approx([0.25, 0.75])
    assert update_global_scores(g, [[1.0, 0.0]], [1], beta=0.9) == pytest.approx([0.325, 0.675])


def test_layers_are_transformer_blocks():
    names = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.attention.self.value",
             "bert.encoder.layer.0.attention.self.query", "model.layers.12.self_attn.q_proj"]
    assert block_index(names[3]) == 12
    groups = layer_groups(names[:3])
    assert groups == [["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
                      ["bert.encoder.layer.1.attention.self.query"]]
    assert modules_of([1], groups) == frozenset({names[0]})
    with pytest.raises(ValueError):
        block_index("classifier")

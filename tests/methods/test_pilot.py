"""Fed-piLot's pure parts: IG-Score masking and combination, DWA weights and STAgg (oracles O27, O28 of
docs/oracles.md)."""
import pytest
import torch

from fedlora.layers import block_index, layer_groups, modules_of
from fedlora.methods.pilot import (STAggSettings, affordable_scores, bias_correction, combined_scores, dwa_weights,
                                   stagg, update_global_scores)


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
    # next round nobody trains layer 0: its stale momentum decays by γ and still moves it (bias-corrected, t = 2)
    new2, mom2, _ = stagg(new, [{}], [5], LAYER_OF, 3, mom, STAggSettings(gamma=0.5, kappa=0.5), step=2)
    torch.testing.assert_close(mom2["l0.a"], 0.5 * mom["l0.a"])
    torch.testing.assert_close(new2["l0.a"], new["l0.a"] + 0.5 * mom2["l0.a"] / (1 - 0.5 ** 2))
    # a layer nobody trained whose momentum is exactly zero stays put, at any t and with DWA on
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in (1, 3):
        same, _, _ = stagg(theta, [ups[0]], [5], LAYER_OF, 3, zero, STAggSettings(), step=t)
        assert torch.equal(same["l1.a"], theta["l1.a"]) and torch.equal(same["l2.a"], theta["l2.a"])


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
    assert dwa_weights([0.1, 1.0], w_max=3.0)[0] / dwa_weights([0.1, 1.0], w_max=3.0)[1] == pytest.approx(3.0)


def test_dwa_is_not_renormalised_full_coverage_and_the_head_keep_weight_one():
    # coverage 1/3, 2/3, 1 and the head (index 3), as with 3 clients of budgets 0.5 / 0.75 / 1.0.  The old rule
    # (clip(1/ρ, 1, w_max) normalised to mean 1) gave [1.85, 0.92, 0.62, 0.62]: full layers and the head shrank
    assert dwa_weights([1 / 3, 2 / 3, 1.0, 1.0], w_max=3.0, full=(3,)) == pytest.approx([3.0, 1.5, 1.0, 1.0], abs=0)
    assert dwa_weights([1.0, 1.0, 0.0], w_max=3.0) == [1.0, 1.0, 0.0]
    # the head counts as fully covered even if only some clients sent it
    assert dwa_weights([0.5, 0.5], w_max=3.0, full=(1,)) == [2.0, 1.0]


def test_dwa_weight_of_an_under_covered_layer_is_min_of_inverse_coverage_and_the_cap():
    cov = [0.1, 0.25, 0.5, 0.8, 0.0]
    assert dwa_weights(cov, w_max=3.0) == pytest.approx([3.0, 3.0, 2.0, 1.25, 0.0])
    assert dwa_weights(cov, w_max=1.0) == [1.0, 1.0, 1.0, 1.0, 0.0]  # w_max = 1: no boost
    assert dwa_weights(cov, w_max=10.0) == pytest.approx([10.0, 4.0, 2.0, 1.25, 0.0])


THREE = [10, 30, 60]


def _round(theta, seeds=(1, 2, 3), partial=True):
    """Three clients: all train l0 and the head (layer 3), only client 0 trains l1, nobody l2 (if ``partial``)."""
    keys = ("l0.a", "l0.b", "l1.a", "l2.a", "head")
    ups = [_tensors(s, keys) for s in seeds]
    if partial:
        ups = [{k: v for k, v in u.items() if k in ("l0.a", "l0.b", "head") or (k == "l1.a" and i == 0)}
               for i, u in enumerate(ups)]
    return ups


HEAD_OF = {**LAYER_OF, "head": 3}


def test_O27_fully_covered_layers_and_the_head_are_exact_fedavg_with_dwa_on_and_kappa_zero():
    theta = _tensors(0, ("l0.a", "l0.b", "l1.a", "l2.a", "head"))
    ups = _round(theta)
    new, _, coverage = stagg(theta, ups, THREE, HEAD_OF, 4, {}, STAggSettings(kappa=0.0), full=(3,))
    assert coverage == pytest.approx([1.0, 1 / 3, 0.0, 1.0])
    for k in ("l0.a", "l0.b", "head"):  # FedAvg of the three, whatever the coverage of the other layers
        torch.testing.assert_close(new[k], sum(n / 100 * u[k] for n, u in zip(THREE, ups)), rtol=1e-12, atol=1e-12)
    # l1, trained by one client of three: w = min(3, w_max) times that client's update
    torch.testing.assert_close(new["l1.a"], theta["l1.a"] + 3.0 * (ups[0]["l1.a"] - theta["l1.a"]),
                               rtol=1e-12, atol=1e-12)
    capped, _, _ = stagg(theta, ups, THREE, HEAD_OF, 4, {}, STAggSettings(kappa=0.0, w_max=2.0), full=(3,))
    torch.testing.assert_close(capped["l1.a"], theta["l1.a"] + 2.0 * (ups[0]["l1.a"] - theta["l1.a"]),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(new["l2.a"], theta["l2.a"])


def test_without_dwa_every_covered_layer_has_weight_one():
    theta = _tensors(0, ("l0.a", "l0.b", "l1.a", "l2.a", "head"))
    ups = _round(theta)
    new, _, _ = stagg(theta, ups, THREE, HEAD_OF, 4, {}, STAggSettings(kappa=0.0), use_dwa=False, full=(3,))
    torch.testing.assert_close(new["l1.a"], ups[0]["l1.a"], rtol=1e-12, atol=1e-12)  # the one client's model
    for k in ("l0.a", "head"):
        torch.testing.assert_close(new[k], sum(n / 100 * u[k] for n, u in zip(THREE, ups)), rtol=1e-12, atol=1e-12)


def test_bias_corrected_momentum_steps_exactly_fedavg_on_a_fully_covered_layer():
    theta = _tensors(0, ("l0.a", "l0.b", "l1.a", "l2.a", "head"))
    ups = _round(theta)
    fedavg_step = {k: sum(n / 100 * (u[k] - theta[k]) for n, u in zip(THREE, ups)) for k in ("l0.a", "head")}
    settings = STAggSettings(kappa=0.5, gamma=0.5)
    new, mom, _ = stagg(theta, ups, THREE, HEAD_OF, 4, {}, settings, step=1, full=(3,))
    for k, d in fedavg_step.items():  # round 1: (1-κ)·Δ̄ + κ·H/(1-γ) = Δ̄
        torch.testing.assert_close(new[k] - theta[k], d, rtol=1e-12, atol=1e-12)
    # round 2 with the same client deltas: the corrected momentum is again Δ̄, so the step is again FedAvg's
    ups2 = [{k: new[k] + (u[k] - theta[k]) for k in u} for u in ups]
    new2, _, _ = stagg(new, ups2, THREE, HEAD_OF, 4, mom, settings, step=2, full=(3,))
    for k, d in fedavg_step.items():
        torch.testing.assert_close(new2[k] - new[k], d, rtol=1e-12, atol=1e-12)
    # without the correction round 1 steps (1 − κγ) = 0.75 × FedAvg
    raw, _, _ = stagg(theta, ups, THREE, HEAD_OF, 4, {}, STAggSettings(kappa=0.5, gamma=0.5, bias_correction=False),
                      full=(3,))
    torch.testing.assert_close(raw["l0.a"] - theta["l0.a"], 0.75 * fedavg_step["l0.a"], rtol=1e-12, atol=1e-12)


def test_bias_correction_factor():
    assert bias_correction(0.5, 1) == 2.0 and bias_correction(0.5, 2) == pytest.approx(4 / 3)
    assert bias_correction(0.0, 1) == 1.0 and bias_correction(1.0, 5) == 1.0  # γ = 1: H is always 0


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


def _pilot_method(*overrides):
    from fedlora.adapters import initial_adapter
    from fedlora.config import load_config
    from fedlora.methods import get_method
    from fedlora.methods.base import FederationSpec

    names = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    shapes = {n: (5, 4) for n in names}
    head = {"classifier.bias": torch.zeros(2, dtype=torch.float64)}
    spec = FederationSpec(shapes, {k: {n: 2 for n in names} for k in range(3)}, 4.0, seed=0, head=head,
                          layer_groups=layer_groups(names))
    method = get_method("pilot")(load_config(None, ["method=pilot", *overrides]), spec)
    ad = initial_adapter(shapes, 2, 4.0, seed=0, head=head)
    ad = ad.with_tensors({k: v.double() + 0.1 for k, v in ad.to_flat().items()})
    return method, method.init_state(ad)


def _pilot_updates(state, seed, layers_of=((0, 1), (1,), (1,))):
    from fedlora.adapters import ROLE_HEAD, module_of, role_of
    from fedlora.methods.base import Update

    g = torch.Generator().manual_seed(seed)
    out = []
    for cid, layers in enumerate(layers_of):
        tensors = {k: v + torch.randn(v.shape, generator=g, dtype=torch.float64)
                   for k, v in state.adapter.to_flat().items()
                   if role_of(k) == ROLE_HEAD or block_index(module_of(k)) in layers}
        out.append(Update(cid, 10 * (cid + 1), tensors))
    return out


def test_pilot_round_one_head_and_full_layer_step_fedavg_and_the_momentum_count_survives_a_checkpoint(tmp_path):
    from fedlora.checkpoint import load_checkpoint, save_checkpoint

    method, s0 = _pilot_method()
    ups = _pilot_updates(s0, 1)
    s1 = method.aggregate(1, s0, ups)
    assert s1.extra["momentum_steps"] == 1 and s1.extra["coverage"] == pytest.approx([1 / 3, 1.0])
    before, after = s0.adapter.to_flat(), s1.adapter.to_flat()
    for k in after:
        if k == "classifier.bias" or ".layer.1." in k:  # every client trained it: exactly FedAvg in round 1
            fedavg = sum(u.num_examples / 60 * u.tensors[k] for u in ups)
            torch.testing.assert_close(after[k], fedavg, rtol=1e-12, atol=1e-12)
        else:  # layer 0, client 0 alone: (1-κ)·3·Δ + κ·Δ = 2Δ
            torch.testing.assert_close(after[k] - before[k], 2.0 * (ups[0].tensors[k] - before[k]), rtol=1e-12,
                                       atol=1e-12)
    save_checkpoint(tmp_path, 1, s1, {}, [], "")
    resumed = load_checkpoint(tmp_path).state
    assert resumed.extra["momentum_steps"] == 1
    a = method.aggregate(2, s1, _pilot_updates(s1, 2))
    b = method.aggregate(2, resumed, _pilot_updates(resumed, 2))
    assert a.extra["momentum_steps"] == b.extra["momentum_steps"] == 2
    assert all(torch.equal(a.adapter.to_flat()[k], v) for k, v in b.adapter.to_flat().items())
    # a state with momentum but no counter (an older checkpoint) counts one momentum update per earlier round
    legacy = type(s1)(s1.adapter, {k: v for k, v in s1.extra.items() if k != "momentum_steps"})
    assert method.aggregate(2, legacy, _pilot_updates(s1, 2)).extra["momentum_steps"] == 2


def test_pilot_without_dwa_or_bias_correction_follows_the_switches():
    method, s0 = _pilot_method("pilot.dwa=false", "pilot.momentum_bias_correction=false")
    ups = _pilot_updates(s0, 1)
    before, after = s0.adapter.to_flat(), method.aggregate(1, s0, ups).adapter.to_flat()
    for k in after:
        contributors = [u for u in ups if k in u.tensors]
        n = sum(u.num_examples for u in contributors)
        mean = sum(u.num_examples / n * (u.tensors[k] - before[k]) for u in contributors)
        torch.testing.assert_close(after[k] - before[k], 0.75 * mean, rtol=1e-12, atol=1e-12)  # w = 1, 1 − κγ


# ------------------------------------------------------------------------------------------------ layer assignment
MB = 1_000_000


def _minilm_like(step_mb):
    """all-MiniLM-L6-v2, LoRA r = 8 on query/value, batch 16 × 48 tokens (docs/results.md): 6 blocks, 35.6 MB of
    activations and 0.15 MB of LoRA gradient + AdamW state per block; ``step_mb`` = M_step."""
    from types import SimpleNamespace

    from fedlora.memory import MemoryModel

    return SimpleNamespace(memory=MemoryModel(step_bytes=step_mb * MB, grad_state_bytes=[0.15 * MB] * 6,
                                              act_bytes=[35.6 * MB] * 6))


def _share_differing_from_topk(spec, fraction, position_aware, draws=400):
    import random

    from fedlora.methods.pilot import fit_layers

    mm = spec.memory
    budget = fraction * mm.predict(range(6))
    top = fit_layers(spec, budget, order=[5, 4, 3, 2, 1, 0], position_aware=position_aware)
    rng = random.Random(0)
    differ = 0
    for _ in range(draws):
        values = [rng.random() for _ in range(6)]
        layers = fit_layers(spec, budget, values=values, position_aware=position_aware)
        assert mm.predict(layers) <= budget
        differ += layers != top
    return differ / draws, top


def test_default_costs_are_the_papers_additive_ones():
    from fedlora.config import load_config

    assert load_config(None, ["method=pilot"]).memory.position_aware is False


@pytest.mark.parametrize("step_mb, fraction, least", [
    (35.6, 0.5, 0.3), (35.6, 0.75, 0.3),  # the analytical model (memory.calibrate = false: M_step = one block)
    (103.5, 0.75, 0.1),                   # the calibrated one (318 MB for all layers): 159 / 239 MB budgets
])
def test_additive_knapsack_choice_depends_on_the_ig_score_unlike_top_k(step_mb, fraction, least):
    share, _ = _share_differing_from_topk(_minilm_like(step_mb), fraction, position_aware=False)
    assert share >= least
    # Position-aware costs: G_j (0.15 MB) is tiny next to the activations Act(e) fixed by the earliest block e, so
    # once e is affordable every later block costs almost nothing; with every IG-Score positive the optimum is the
    # longest affordable suffix, the top-k choice, whatever the scores (Fed-piLot then differs from top-k only by
    # its aggregation).  That is why the additive form is the default.
    share, top = _share_differing_from_topk(_minilm_like(step_mb), fraction, position_aware=True)
    assert share == 0.0 and top == list(range(6 - len(top), 6))


def test_additive_knapsack_on_the_calibrated_model_at_half_the_memory_can_only_afford_the_last_block():
    # M_step = 103.5 MB leaves 55.5 MB at budget 0.5: c_5 = 35.75 MB fits, c_4 = 71.35 MB does not, so every
    # draw trains block 5 alone, as top-k does (the IG-Score matters from budget 0.75 up)
    share, top = _share_differing_from_topk(_minilm_like(103.5), 0.5, position_aware=False)
    assert share == 0.0 and top == [5]


@pytest.mark.parametrize("position_aware", [False, True])
def test_fit_layers_answers_fit_the_true_memory_and_a_budget_for_everything_trains_everything(position_aware):
    import random
    from types import SimpleNamespace

    from fedlora.memory import MemoryModel
    from fedlora.methods.pilot import fit_layers

    rng = random.Random(1)
    for _ in range(150):
        n = rng.randint(1, 7)
        mm = MemoryModel(step_bytes=rng.uniform(0, 100) * MB,
                         grad_state_bytes=[rng.uniform(0, 20) * MB for _ in range(n)],
                         act_bytes=[rng.uniform(0, 40) * MB for _ in range(n)])
        spec = SimpleNamespace(memory=mm)
        everything = mm.predict(range(n))
        budget = rng.uniform(0, 1.1) * everything
        values = [rng.choice([0.0, rng.random()]) for _ in range(n)]
        order = rng.sample(range(n), n)
        for layers in (fit_layers(spec, budget, values=values, position_aware=position_aware),
                       fit_layers(spec, budget, order=order, position_aware=position_aware)):
            assert layers == sorted(set(layers)) and mm.predict(layers) <= budget  # the true (position-aware) memory
            if not position_aware and everything > budget and layers:  # the additive cost fits too
                assert mm.step_bytes + sum(mm.additive_costs()[j] for j in layers) <= budget
        for b in (everything, everything * 1.01):  # "all fit" shortcut, also under the over-estimating costs
            assert fit_layers(spec, b, values=values, position_aware=position_aware) == [j for j in range(n)
                                                                                          if values[j] > 0]
            assert fit_layers(spec, b, order=order, position_aware=position_aware) == list(range(n))


def test_a_client_that_can_afford_no_layer_does_not_dilute_the_global_score():
    method, s0 = _pilot_method()
    ups = _pilot_updates(s0, 1)
    reports = ([0.0, 0.0], [0.25, 0.75], [0.5, 0.5])  # client 0's budget fits no layer alone
    ups = [type(u)(u.client_id, u.num_examples, u.tensors, report={"affordable_scores": r}) for u, r in zip(ups, reports)]
    g = method.aggregate(1, s0, ups).extra["global_scores"]
    assert g == pytest.approx([(20 * 0.25 + 30 * 0.5) / 50, (20 * 0.75 + 30 * 0.5) / 50])
    assert sum(g) == pytest.approx(1.0)
    nobody = [type(u)(u.client_id, u.num_examples, u.tensors, report={"affordable_scores": [0.0, 0.0]}) for u in ups]
    assert method.aggregate(1, s0, nobody).extra.get("global_scores") is None

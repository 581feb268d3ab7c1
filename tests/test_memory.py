"""The layer memory model: position-aware prediction, knapsack inputs, calibration algebra, and (once, on the real
MiniLM in child processes) that a calibrated model predicts an unseen layer subset within 15 %."""
import pytest

from fedlora.knapsack import brute_force, solve_position_aware
from fedlora.memory import MemoryModel, build_memory_model, profile_step, relative_error


def test_prediction_is_step_plus_trained_state_plus_activations_from_the_earliest_layer():
    mm = MemoryModel(step_bytes=100.0, grad_state_bytes=[1.0, 2.0, 3.0, 4.0], act_bytes=[10.0, 20.0, 30.0, 40.0])
    assert mm.prefix_costs() == [100.0, 90.0, 70.0, 40.0]
    assert mm.predict([]) == 0.0
    assert mm.predict([3]) == 100 + 4 + 40
    assert mm.predict([1, 3]) == 100 + 2 + 4 + 90  # training layer 1 forces backprop through blocks 1..3
    assert mm.additive_costs() == [101.0, 92.0, 73.0, 44.0]
    # the additive form never under-estimates the position-aware truth
    for layers in ([0], [1, 2], [0, 3], [2, 3]):
        assert 100 + sum(mm.additive_costs()[j] for j in layers) >= mm.predict(layers)


def test_position_aware_knapsack_on_the_memory_model_respects_the_budget():
    mm = MemoryModel(step_bytes=50.0, grad_state_bytes=[5.0] * 6, act_bytes=[30.0] * 6)
    costs, prefix, step = mm.knapsack_inputs()
    values = [0.9, 0.1, 0.3, 0.2, 0.4, 0.8]
    for budget in (60, 100, 140, 200, 300):
        got = solve_position_aware(values, costs, prefix, budget - step, unit=1.0)
        assert mm.predict(got.layers) <= budget
        assert got.value == pytest.approx(brute_force(values, costs, budget - step, prefix).value)


def test_calibration_recovers_a_known_linear_memory_law():
    truth = MemoryModel(step_bytes=1000.0, grad_state_bytes=[12.0] * 5, act_bytes=[300.0] * 5)
    mm = build_memory_model([1] * 5, act_prior=1.0, calibrate_with=truth.predict)
    assert mm.calibrated and mm.act_bytes == pytest.approx(truth.act_bytes)
    assert mm.step_bytes == pytest.approx(truth.step_bytes)
    assert all(mm.predict(s) == pytest.approx(truth.predict(s)) for s in ([2], [0, 4], [1, 2, 3]))


def test_calibrated_model_predicts_real_minilm_steps_within_15_percent():
    spec = dict(model="minilm", task_type="SEQ_CLS", rank=8, alpha=16.0, targets=["query", "value"], batch=8,
                seq=96, threads=1)
    measure = {}

    def run(layers):
        key = tuple(layers)
        if key not in measure:
            measure[key] = profile_step({**spec, "layers": list(layers)})["measured"]
        return measure[key]

    mm = build_memory_model([2 * 8 * (384 + 384)] * 6, act_prior=1e6, calibrate_with=run)
    assert mm.act_bytes[0] > 0 and measure[(0,)] > measure[(5,)]  # an early layer costs more than a late one
    assert relative_error(mm.predict([2]), run([2])) < 0.15


def test_additive_costs_never_under_estimate_any_subset_so_additive_choices_fit_the_true_memory():
    import random
    from itertools import combinations

    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 6)
        mm = MemoryModel(step_bytes=rng.uniform(0, 50), grad_state_bytes=[rng.uniform(0, 5) for _ in range(n)],
                         act_bytes=[rng.uniform(0, 30) for _ in range(n)])
        add = mm.additive_costs()
        for k in range(1, n + 1):
            for layers in combinations(range(n), k):
                assert mm.step_bytes + sum(add[j] for j in layers) >= mm.predict(layers) * (1 - 1e-12)
        # equality for a single layer: the paper's c_j is exact when one layer trains
        assert all(mm.step_bytes + add[j] == pytest.approx(mm.predict([j])) for j in range(n))

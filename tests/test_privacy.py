"""DP accounting (oracle O10, docs/oracles.md) and the budget checks that refuse impossible configs before work
starts."""
import types

import pytest

from fedlora.errors import PrivacyBudgetError
from fedlora.privacy import ClientAccountant, plan_privacy, projected_epsilon


def _dp(**kw):
    base = dict(enabled=True, epsilon=3.0, delta=1e-5, noise_multiplier=0.0, clip=1.0, secure_rng=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_O10_epsilon_decreases_strictly_with_sigma():
    eps = [projected_epsilon(s, 0.05, 200, 1e-5) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))


def test_O10_epsilon_grows_with_steps_and_sample_rate():
    assert projected_epsilon(1.0, 0.05, 100, 1e-5) < projected_epsilon(1.0, 0.05, 400, 1e-5)
    assert projected_epsilon(1.0, 0.02, 100, 1e-5) < projected_epsilon(1.0, 0.1, 100, 1e-5)


@pytest.mark.parametrize("target", [1.0, 3.0, 6.0])
def test_O10_calibrated_sigma_meets_target_epsilon(target):
    sizes = {0: 1000, 1: 400, 2: 3000}
    plans = plan_privacy(_dp(epsilon=target), sizes, {0: 10, 1: 10, 2: 10}, rounds=5, batch_size=16)
    for cid, p in plans.items():
        assert p.sample_rate == 16 / sizes[cid]
        eps = projected_epsilon(p.noise_multiplier, p.sample_rate, 50, 1e-5)
        assert eps <= target and eps > 0.95 * target  # tight, not wildly over-noised
    # less data per client -> larger sampling rate -> more noise needed
    assert plans[1].noise_multiplier > plans[0].noise_multiplier > plans[2].noise_multiplier


def test_given_sigma_within_budget_is_accepted_and_over_budget_refused():
    ok = plan_privacy(_dp(noise_multiplier=5.0, epsilon=6.0), {0: 1000}, {0: 10}, rounds=5, batch_size=16)
    assert ok[0].noise_multiplier == 5.0
    with pytest.raises(PrivacyBudgetError, match="spends epsilon"):
        plan_privacy(_dp(noise_multiplier=0.3, epsilon=1.0), {0: 1000}, {0: 10}, rounds=50, batch_size=16)


def test_batch_not_smaller_than_client_data_is_refused():
    with pytest.raises(PrivacyBudgetError, match="client 1 has 16 training examples"):
        plan_privacy(_dp(), {0: 100, 1: 16}, {0: 1, 1: 1}, rounds=1, batch_size=16)


def test_delta_not_below_one_over_n_is_refused():
    with pytest.raises(PrivacyBudgetError, match="dp.delta"):
        plan_privacy(_dp(delta=0.01), {0: 200}, {0: 1}, rounds=1, batch_size=16)


def test_unreachable_target_is_refused():
    # ε = 0.05 is below the RDP floor (≈0.103 at δ = 1e-5) whatever the noise
    with pytest.raises(PrivacyBudgetError, match="no noise multiplier.*smallest epsilon any noise multiplier"):
        plan_privacy(_dp(epsilon=0.05), {0: 32}, {0: 5}, rounds=2, batch_size=16)


def test_accountant_history_round_trips_through_state_dict():
    acc = ClientAccountant()
    acc.step(0, 1.0, 0.1, steps=3)
    acc.step(2, 2.0, 0.05)
    e0 = acc.epsilon(0, 1e-5)
    again = ClientAccountant()
    again.load_state_dict(acc.state_dict())
    assert again.epsilon(0, 1e-5) == e0 and again.epsilon(2, 1e-5) > 0
    assert again.epsilon(7, 1e-5) == 0.0

"""Fed-piLot layer assignment (fedlora.knapsack): exact DP vs brute force, rounding, position-aware costs, tie-breaking
and the top-k baseline (docs/methods.md §14; oracles O24–O26 of docs/oracles.md)."""
import math
import random

import pytest

from fedlora import knapsack
from fedlora.knapsack import Assignment, brute_force, solve_01, solve_position_aware, top_k_that_fit


def _instance(rng, l_max=12, c_max=30, cap_max=100, int_values=True, v_max=20):
    l = rng.randint(0, l_max)
    values = [float(rng.randint(-3, v_max)) if int_values else rng.uniform(-0.2, 1.0) for _ in range(l)]
    costs = [float(rng.randint(1, c_max)) for _ in range(l)]
    return values, costs, float(rng.randint(0, cap_max))


def _round_up(costs, unit):
    return [math.ceil(c / unit) * unit for c in costs]


def _feasible(a, costs, capacity, prefix=None):
    assert list(a.layers) == sorted(set(a.layers))
    true_cost = math.fsum([*([prefix[a.layers[0]]] if prefix and a.layers else []), *(costs[j] for j in a.layers)])
    assert a.cost == true_cost
    assert a.cost <= capacity


# ------------------------------------------------------------------ O24: DP optimality
def test_o24_dp_equals_brute_force_integer_costs():
    rng = random.Random(24)
    for i in range(300):
        values, costs, cap = _instance(rng, v_max=20 if i % 2 else 4, c_max=30 if i % 3 else 6)  # + many ties
        dp, bf = solve_01(values, costs, cap, 1.0), brute_force(values, costs, cap)
        assert dp == bf  # integer values: exact ties, so the whole assignment (incl. tie-break) matches
        _feasible(dp, costs, cap)
        assert dp.value == math.fsum(values[j] for j in dp.layers)
        assert all(values[j] > 0 for j in dp.layers)


def test_o24_tie_heavy_instances_match_brute_force_exactly():
    rng = random.Random(2424)  # few distinct values and costs: most instances have several optima
    for _ in range(200):
        values, costs, cap = _instance(rng, l_max=10, c_max=4, cap_max=15, v_max=3)
        assert solve_01(values, costs, cap, 1.0) == brute_force(values, costs, cap)
        prefix = [float(rng.randint(0, 4)) for _ in values]
        assert solve_position_aware(values, costs, prefix, cap, 1.0) == brute_force(values, costs, cap, prefix)


def test_o24_dp_equals_brute_force_real_values():
    rng = random.Random(124)
    for _ in range(150):
        values, costs, cap = _instance(rng, int_values=False)
        dp, bf = solve_01(values, costs, cap, 1.0), brute_force(values, costs, cap)
        assert dp.value == pytest.approx(bf.value, rel=1e-12, abs=1e-12)
        _feasible(dp, costs, cap)


@pytest.mark.parametrize("int_values", [True, False])
def test_o24_fractional_costs_unit_half_equals_brute_force_on_rounded_costs(int_values):
    rng = random.Random(240 + int_values)
    unit = 0.5
    for _ in range(150):
        values, _, _ = _instance(rng, int_values=int_values)
        costs = [rng.uniform(0.01, 15.0) for _ in values]
        cap = rng.uniform(0.0, 50.0)
        dp = solve_01(values, costs, cap, unit)
        bf = brute_force(values, _round_up(costs, unit), math.floor(cap / unit) * unit)
        if int_values:
            assert dp.layers == bf.layers and dp.value == bf.value
        else:
            assert dp.value == pytest.approx(bf.value, rel=1e-12, abs=1e-12)
        _feasible(dp, costs, cap)
        assert dp.cost <= math.fsum(_round_up([costs[j] for j in dp.layers], unit))


# ------------------------------------------------------------------ O25: properties
def test_o25_zero_capacity_selects_nothing():
    rng = random.Random(25)
    for _ in range(30):
        values, costs, _ = _instance(rng)
        for fn in (lambda c: solve_01(values, costs, c, 1.0), lambda c: brute_force(values, costs, c),
                   lambda c: solve_position_aware(values, costs, [0.0] * len(costs), c, 1.0)):
            assert fn(0.0) == Assignment((), 0.0, 0.0)
            assert fn(-5.0) == Assignment((), 0.0, 0.0)
            assert fn(0.99) == Assignment((), 0.0, 0.0)


def test_o25_ample_capacity_selects_exactly_the_positive_layers():
    rng = random.Random(250)
    for _ in range(40):
        values, costs, _ = _instance(rng)
        positive = tuple(j for j, v in enumerate(values) if v > 0)
        for cap, unit in ((sum(costs), 1.0), (sum(costs) + 7.0, 1.0), (sum(costs), 0.25), (math.inf, 1.0)):
            a = solve_01(values, costs, cap, unit)
            assert a.layers == positive
            assert a.value == math.fsum(values[j] for j in positive)
            assert a.cost == math.fsum(costs[j] for j in positive)
    assert solve_01([0.0, -1.0, 0.0], [0.0, 0.0, 1.0], 10.0, 1.0) == Assignment((), 0.0, 0.0)  # free but worthless


def test_o25_value_non_decreasing_in_capacity():
    rng = random.Random(251)
    for _ in range(10):
        values, costs, _ = _instance(rng, int_values=False)
        prefix = [rng.uniform(0, 20) for _ in costs]
        last = last_pa = -1.0
        top = int(sum(costs) + max(prefix, default=0.0)) + 1
        for cap in [*range(0, top, 3), top]:
            v = solve_01(values, costs, float(cap), 1.0).value
            v_pa = solve_position_aware(values, costs, prefix, float(cap), 1.0).value
            assert v >= last and v_pa >= last_pa
            last, last_pa = v, v_pa
        assert last == pytest.approx(math.fsum(v for v in values if v > 0))


def test_o25_scaling_values_keeps_the_selection():
    rng = random.Random(252)
    for _ in range(60):
        values, costs, cap = _instance(rng)  # integer values: many exact ties, exact under these scalings
        base = solve_01(values, costs, cap, 1.0)
        for s in (0.5, 2.0, 3.0, 1024.0, 2.0 ** -10):
            assert solve_01([s * v for v in values], costs, cap, 1.0).layers == base.layers
        values, costs, cap = _instance(rng, int_values=False)  # generic values: any positive scale
        base = solve_01(values, costs, cap, 1.0)
        for s in (0.1, 7.3, 1e6):
            a = solve_01([s * v for v in values], costs, cap, 1.0)
            assert a.layers == base.layers and a.value == pytest.approx(s * base.value)


def test_o25_rounding_up_never_infeasible_at_true_costs():
    rng = random.Random(253)
    for _ in range(200):
        l = rng.randint(1, 12)
        values = [rng.uniform(0.01, 1.0) for _ in range(l)]
        costs = [rng.uniform(0.0, 10.0) for _ in range(l)]
        cap = rng.uniform(0.0, 40.0)
        unit = rng.choice([0.1, 0.3, 0.7, 1.0, 2.5, 1 / 3])
        _feasible(solve_01(values, costs, cap, unit), costs, cap)
        prefix = [rng.uniform(0.0, 10.0) for _ in range(l)]
        _feasible(solve_position_aware(values, costs, prefix, cap, unit), costs, cap, prefix)


def test_o25_rounding_is_conservative_at_exact_fit():
    # the floats 0.1 + 0.2 exceed the float 0.3; exact rational rounding sees 0.3/0.1 < 3 and keeps one layer
    assert solve_01([1.0, 1.0], [0.1, 0.2], 0.3, 0.1).layers != (0, 1)
    a = solve_01([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0, 1.0)
    assert a.layers == (0, 1, 2) and a.cost == 3.0  # an exact fit is kept
    a = solve_01([5.0, 1.0], [1.01, 0.5], 2.0, 1.0)  # 1.01 rounds up to 2 units: taking it leaves no room
    assert a.layers == (0,) and a.cost == 1.01


# ------------------------------------------------------------------ O26: position-aware cost
def _prefix(rng, l, monotone):
    m = [float(rng.randint(0, 40)) for _ in range(l)]
    return sorted(m, reverse=True) if monotone else m


@pytest.mark.parametrize("monotone", [True, False])
def test_o26_position_aware_equals_brute_force(monotone):
    rng = random.Random(26 + monotone)
    for _ in range(120):
        values, costs, cap = _instance(rng, cap_max=120)
        prefix = _prefix(rng, len(values), monotone)
        dp, bf = solve_position_aware(values, costs, prefix, cap, 1.0), brute_force(values, costs, cap, prefix)
        assert dp == bf
        _feasible(dp, costs, cap, prefix)


def test_o26_position_aware_real_values_and_half_unit():
    rng = random.Random(260)
    for _ in range(100):
        values, costs, cap = _instance(rng, int_values=False, cap_max=120)
        prefix = [rng.randint(0, 80) / 2 for _ in values]
        costs = [c / 2 for c in costs]  # multiples of the unit: no rounding
        dp, bf = solve_position_aware(values, costs, prefix, cap, 0.5), brute_force(values, costs, cap, prefix)
        assert dp.value == pytest.approx(bf.value, rel=1e-12, abs=1e-12)
        _feasible(dp, costs, cap, prefix)


def test_o26_prefix_cost_changes_the_choice():
    values, costs = [10.0, 1.0, 1.0], [1.0, 1.0, 1.0]
    prefix = [8.0, 0.0, 0.0]  # training from layer 0 needs 8 extra units
    assert solve_01(values, costs, 3.0, 1.0).layers == (0, 1, 2)
    assert solve_position_aware(values, costs, prefix, 3.0, 1.0) == Assignment((1, 2), 2.0, 2.0)
    assert solve_position_aware(values, costs, prefix, 9.0, 1.0) == Assignment((0,), 10.0, 9.0)
    assert solve_position_aware(values, costs, prefix, 11.0, 1.0) == Assignment((0, 1, 2), 12.0, 11.0)
    assert solve_position_aware(values, costs, [0.0] * 3, 2.0, 1.0) == solve_01(values, costs, 2.0, 1.0)


# ------------------------------------------------------------------ tie-breaking
def test_tie_breaking():
    # value 3 three ways: {0} cost 3, {1, 2} cost 2, {3} cost 3 -> the cheapest, {1, 2}, though (0,) < (1, 2)
    values, costs = [3.0, 2.0, 1.0, 3.0], [3.0, 1.0, 1.0, 3.0]
    for cap in (2.0, 3.0):
        assert solve_01(values, costs, cap, 1.0) == Assignment((1, 2), 3.0, 2.0) == brute_force(values, costs, cap)
    # equal value and equal cost -> the lexicographically smallest tuple
    values, costs = [1.0, 2.0, 2.0, 1.0, 3.0], [1.0, 2.0, 2.0, 1.0, 3.0]
    for cap in (2.0, 3.0):
        a = solve_01(values, costs, cap, 1.0)
        assert a == brute_force(values, costs, cap)
    assert solve_01(values, costs, 2.0, 1.0).layers == (0, 3)  # {0,3}, {1}, {2}: value 2 cost 2 -> (0, 3)
    assert solve_01(values, costs, 3.0, 1.0).layers == (0, 1)  # {0,1},{0,2},{1,3},{2,3},{4} -> (0, 1)
    assert solve_01([1.0] * 4, [1.0] * 4, 2.0, 1.0).layers == (0, 1)
    assert solve_01([1.0, 1.0, 2.0], [1.0, 1.0, 2.0], 2.0, 1.0).layers == (0, 1)  # (0, 1) < (2,)
    # position-aware: equal value, the cheaper total M(e) + Σc wins; at equal totals the smaller indices
    assert solve_position_aware([1.0, 1.0], [1.0, 1.0], [3.0, 0.0], 10.0, 1.0).layers == (0, 1)
    assert solve_position_aware([2.0, 2.0], [1.0, 1.0], [3.0, 0.0], 1.0, 1.0).layers == (1,)
    assert solve_position_aware([2.0, 2.0], [1.0, 1.0], [0.0, 0.0], 1.0, 1.0).layers == (0,)
    assert solve_position_aware([2.0, 2.0], [1.0, 1.0], [1.0, 0.0], 5.0, 1.0) == Assignment((0, 1), 4.0, 3.0)
    assert solve_position_aware([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], 2.0, 1.0).layers == (2,)


def test_tie_breaking_uses_rounded_costs():
    # costs 1.2 and 1.9 both round to 2 units: equal rounded cost, so the smaller index wins in the DP
    assert solve_01([1.0, 1.0], [1.9, 1.2], 2.0, 1.0).layers == (0,)
    assert solve_01([1.0, 1.0], [1.9, 1.2], 2.0, 0.1).layers == (1,)  # a finer unit separates them


def test_deterministic_and_scaled_unit():
    rng = random.Random(27)
    values, costs, cap = _instance(rng)
    assert solve_01(values, costs, cap, 1.0) == solve_01(list(values), list(costs), cap, 1.0)
    # byte costs with a MiB unit give the same answer as MiB costs with unit 1
    mib = 2.0 ** 20
    a = solve_01(values, [c * mib for c in costs], cap * mib, mib)
    b = solve_01(values, costs, cap, 1.0)
    assert a.layers == b.layers and a.cost == b.cost * mib


# ------------------------------------------------------------------ top-k baseline
def test_top_k_that_fit_additive():
    costs = [4.0, 3.0, 2.0, 1.0]
    last_first = [3, 2, 1, 0]
    assert top_k_that_fit(last_first, costs, 0.0) == Assignment((), 0.0, 0.0)
    assert top_k_that_fit(last_first, costs, 1.0) == Assignment((3,), 1.0, 1.0)
    assert top_k_that_fit(last_first, costs, 5.0) == Assignment((2, 3), 2.0, 3.0)
    assert top_k_that_fit(last_first, costs, 6.0) == Assignment((1, 2, 3), 3.0, 6.0)
    assert top_k_that_fit(last_first, costs, 100.0) == Assignment((0, 1, 2, 3), 4.0, 10.0)
    # it stops at the first layer that does not fit (a prefix of the order), even if a later one would fit
    assert top_k_that_fit([0, 3], costs, 2.0) == Assignment((), 0.0, 0.0)
    assert top_k_that_fit([2, 0, 3], costs, 3.5) == Assignment((2,), 1.0, 2.0)
    assert top_k_that_fit([], costs, 3.0) == Assignment((), 0.0, 0.0)


def test_top_k_that_fit_position_aware():
    costs, prefix = [1.0, 1.0, 1.0, 1.0], [9.0, 6.0, 3.0, 0.0]
    last_first = [3, 2, 1, 0]
    assert top_k_that_fit(last_first, costs, 1.0, prefix) == Assignment((3,), 1.0, 1.0)
    assert top_k_that_fit(last_first, costs, 4.9, prefix) == Assignment((3,), 1.0, 1.0)  # layer 2 needs 3+2
    assert top_k_that_fit(last_first, costs, 5.0, prefix) == Assignment((2, 3), 2.0, 5.0)
    assert top_k_that_fit(last_first, costs, 13.0, prefix) == Assignment((0, 1, 2, 3), 4.0, 13.0)
    assert top_k_that_fit(last_first, costs, 12.9, prefix) == Assignment((1, 2, 3), 3.0, 9.0)
    # the first layer in the order sets M(e) when it is the earliest taken so far
    assert top_k_that_fit([0, 3], costs, 10.0, prefix) == Assignment((0,), 1.0, 10.0)


def test_top_k_is_never_better_than_the_knapsack():
    rng = random.Random(28)
    for _ in range(50):
        values, costs, cap = _instance(rng)
        order = list(range(len(values)))[::-1]
        top = top_k_that_fit(order, costs, cap)
        assert top.cost <= cap and top.value == len(top.layers)
        assert math.fsum(values[j] for j in top.layers if values[j] > 0) <= solve_01(values, costs, cap, 1.0).value
        prefix = _prefix(rng, len(values), True)
        top = top_k_that_fit(order, costs, cap, prefix)
        _feasible(top, costs, cap, prefix)
        ones = [1.0] * len(values)  # maximising the count: the knapsack does at least as well as top-k
        assert solve_position_aware(ones, costs, prefix, cap, 1.0).value >= top.value


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call", [
    lambda: solve_01([1.0], [-1.0], 5.0, 1.0),
    lambda: solve_01([1.0], [1.0], 5.0, 0.0),
    lambda: solve_01([1.0], [1.0], 5.0, -1.0),
    lambda: solve_01([1.0], [1.0], 5.0, math.nan),
    lambda: solve_01([1.0, 2.0], [1.0], 5.0, 1.0),
    lambda: solve_01([math.nan], [1.0], 5.0, 1.0),
    lambda: solve_01([1.0], [math.nan], 5.0, 1.0),
    lambda: solve_01([1.0], [1.0], math.nan, 1.0),
    lambda: solve_01([1.0] * 3, [1e6] * 3, 2e6 + 1, 1.0),  # capacity/unit above the cell limit
    lambda: solve_position_aware([1.0], [1.0], [1.0, 1.0], 5.0, 1.0),
    lambda: solve_position_aware([1.0], [1.0], [-1.0], 5.0, 1.0),
    lambda: solve_position_aware([1.0], [1.0], [1.0], 5.0, 0.0),
    lambda: brute_force([1.0] * 21, [1.0] * 21, 5.0),
    lambda: brute_force([1.0], [-1.0], 5.0),
    lambda: brute_force([1.0, 2.0], [1.0], 5.0),
    lambda: brute_force([math.nan], [1.0], 5.0),
    lambda: top_k_that_fit([0, 0], [1.0], 5.0),
    lambda: top_k_that_fit([1], [1.0], 5.0),
    lambda: top_k_that_fit([0], [-1.0], 5.0),
    lambda: top_k_that_fit([0], [1.0], 5.0, [1.0, 2.0]),
])
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_cell_limit_counts_only_usable_cells():
    assert knapsack.MAX_CELLS == 2_000_000
    with pytest.raises(ValueError, match="coarser unit"):
        solve_01([1.0] * 3, [1e6] * 3, 1e7, 1.0)
    # the same budget in a coarser unit is fine, and a huge budget is harmless when the costs are small
    assert solve_01([1.0] * 3, [1e6] * 3, 1e7, 1024.0).layers == (0, 1, 2)
    assert solve_01([1.0, 2.0], [1.0, 2.0], 1e12, 1.0).layers == (0, 1)


def test_empty_problem():
    assert solve_01([], [], 10.0, 1.0) == Assignment((), 0.0, 0.0)
    assert solve_position_aware([], [], [], 10.0, 1.0) == Assignment((), 0.0, 0.0)
    assert brute_force([], [], 10.0) == Assignment((), 0.0, 0.0)

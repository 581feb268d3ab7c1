"""Fed-piLot layer assignment as a 0/1 knapsack (docs/methods.md §14; oracles O24–O26 of docs/oracles.md). Pure Python.

Each client trains the subset of LoRA layers that maximises ``Σ_j m_j v_j`` (``v_j`` the combined IG-Score) subject
to its memory budget.  The solver, the rounding and the tie-breaking are a PROPOSAL (the paper does not give its
solver): exact dynamic programming over a capacity discretised to a unit ``u``, with every cost rounded *up* and
the capacity rounded *down* so that every answer is feasible at the true costs (O25).  Rounding uses exact rational
arithmetic on the floats given, and reported costs are correctly rounded sums (``math.fsum``), so
``Assignment.cost <= capacity`` holds exactly.

Objective and tie-breaking, shared by every solver here: maximise the summed value; among equal values prefer the
lower total cost (the rounded cost for the DP solvers, the true cost for :func:`brute_force`), then the
lexicographically smallest tuple of layer indices.  Layers with value ``<= 0`` are never chosen.  Ties are exact
floating-point ties; they are recognised reliably for values on a common dyadic grid (integers, halves, ...).

Two cost models: *additive* ``Σ_j c_j`` (:func:`solve_01`, the paper's knapsack form and the default
of the layer-assignment methods, ``memory.position_aware = false``) and *position-aware* ``M(e) + Σ_j c_j`` with ``e``
the earliest chosen layer (:func:`solve_position_aware`, our exact extension), because backpropagation must reach
layer ``e`` and keep the activations from ``e`` upward.  With LoRA the per-layer ``c_j`` are tiny next to ``M(e)``,
so with every value positive the position-aware optimum is in practice the longest suffix of layers that fits: the
values then never change the choice, which is why it is an option and not the default.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations

import numpy as np

MAX_CELLS = 2_000_000
MAX_BRUTE_FORCE_LAYERS = 20


@dataclass(frozen=True)
class Assignment:
    """Chosen layers (ascending), the sum of their values and their true (un-rounded) cost."""

    layers: tuple[int, ...]
    value: float
    cost: float


EMPTY = Assignment((), 0.0, 0.0)


# ------------------------------------------------------------------ validation
def _floats(xs: Sequence[float], name: str, *, nonnegative: bool) -> list[float]:
    out = [float(x) for x in xs]
    for j, x in enumerate(out):
        if math.isnan(x) or math.isinf(x):
            raise ValueError(f"{name}[{j}] = {x} is not finite")
        if nonnegative and x < 0:
            raise ValueError(f"{name}[{j}] = {x} is negative")
    return out


def _check(values: Sequence[float], costs: Sequence[float], capacity: float,
           prefix_costs: Sequence[float] | None = None) -> tuple[list[float], list[float], float, list[float] | None]:
    if len(values) != len(costs):
        raise ValueError(f"{len(values)} values but {len(costs)} costs")
    if prefix_costs is not None and len(prefix_costs) != len(costs):
        raise ValueError(f"{len(prefix_costs)} prefix costs but {len(costs)} costs")
    capacity = float(capacity)
    if math.isnan(capacity):
        raise ValueError("capacity is NaN")
    prefix = None if prefix_costs is None else _floats(prefix_costs, "prefix_costs", nonnegative=True)
    return _floats(values, "values", nonnegative=False), _floats(costs, "costs", nonnegative=True), capacity, prefix


def _check_unit(unit: float) -> Fraction:
    unit = float(unit)
    if not (math.isfinite(unit) and unit > 0):
        raise ValueError(f"unit must be a finite number > 0, got {unit}")
    return Fraction(unit)


def _units_up(cost: float, unit: Fraction) -> int:
    """``ceil(cost / unit)``, exactly."""
    return math.ceil(Fraction(cost) / unit)


def _units_down(room: Fraction | float, unit: Fraction, cap: int) -> int:
    """``min(floor(room / unit), cap)``, exactly; ``room`` may be ``inf``.  Raises if the table would be too large."""
    cells = cap if room == math.inf else min(math.floor(Fraction(room) / unit), cap)
    if cells > MAX_CELLS:
        raise ValueError(f"capacity/unit gives {cells} DP cells (limit {MAX_CELLS}); use a coarser unit")
    return cells


# ------------------------------------------------------------------ the DP
def _dp(values: list[float], weights: list[int], cells: int) -> tuple[tuple[int, ...], int]:
    """Exact 0/1 knapsack over integer weights and capacity ``cells`` (all values > 0, all weights <= cells).

    ``f_i[w]`` is the best value of items ``i..n-1`` with total weight exactly ``w`` (suffix DP).  The answer takes
    the least ``w`` among the maximisers of ``f_0``; the walk from item 0 takes an item whenever taking it attains
    the optimum, which yields the lexicographically smallest index tuple among the optima of that weight.
    Returns (chosen positions ascending, total weight)."""
    f = np.full(cells + 1, -np.inf)
    f[0] = 0.0
    takes: list[np.ndarray] = [np.empty(0, np.uint8)] * len(values)
    for i in range(len(values) - 1, -1, -1):
        w, v = weights[i], values[i]
        cand = np.full(cells + 1, -np.inf)
        cand[w:] = f[: cells + 1 - w] + v
        take = cand >= f  # a tie takes the item: a tuple starting at i precedes every tuple starting later
        f = np.where(take, cand, f)
        takes[i] = np.packbits(take)
    r = total = int(np.argmax(f))  # first maximiser = least rounded cost
    chosen = []
    for i, packed in enumerate(takes):
        if (packed[r >> 3] >> (7 - (r & 7))) & 1:
            chosen.append(i)
            r -= weights[i]
    assert r == 0
    return tuple(chosen), total


def _sub_knapsack(values: list[float], weights: list[int], items: list[int], room: Fraction | float,
                  unit: Fraction) -> tuple[tuple[int, ...], int]:
    """Knapsack over the positive-value ``items`` within ``room``; returns (chosen layer indices, rounded units)."""
    items = [j for j in items if values[j] > 0]
    cells = _units_down(room, unit, sum(weights[j] for j in items))
    items = [j for j in items if weights[j] <= cells]
    pos, total = _dp([values[j] for j in items], [weights[j] for j in items], cells)
    return tuple(items[p] for p in pos), total


def solve_01(values: Sequence[float], costs: Sequence[float], capacity: float, unit: float) -> Assignment:
    """Exact 0/1 knapsack by DP over ``floor(capacity/unit)`` cells with costs rounded up to ``unit``.

    Time ``O(l · capacity/unit)``; the cell count is capped by ``Σ`` rounded costs, and above ``MAX_CELLS`` cells a
    ``ValueError`` asks for a coarser unit.  ``capacity < 0`` gives the empty assignment."""
    vals, cs, capacity, _ = _check(values, costs, capacity)
    u = _check_unit(unit)
    if capacity < 0:
        return EMPTY
    weights = [_units_up(c, u) for c in cs]
    layers, _ = _sub_knapsack(vals, weights, list(range(len(vals))), capacity, u)
    return Assignment(layers, math.fsum(vals[j] for j in layers), math.fsum(cs[j] for j in layers))


def solve_position_aware(values: Sequence[float], costs: Sequence[float], prefix_costs: Sequence[float],
                         capacity: float, unit: float) -> Assignment:
    """Exact knapsack for the cost ``M(e) + Σ_j c_j`` (the exact variant), ``e`` the earliest chosen layer
    and ``M(e) = prefix_costs[e]``: for each ``e`` force ``e`` in and solve :func:`solve_01`'s DP over the layers
    ``> e`` with ``capacity − M(e) − c_e``.  ``M`` need not be monotone.  The empty choice costs 0."""
    vals, cs, capacity, prefix = _check(values, costs, capacity, prefix_costs)
    assert prefix is not None
    u = _check_unit(unit)
    if capacity < 0:
        return EMPTY
    weights = [_units_up(c, u) for c in cs]
    best, best_key = EMPTY, (-0.0, Fraction(0), ())
    for e, v_e in enumerate(vals):
        if v_e <= 0:
            continue
        room = math.inf if capacity == math.inf else Fraction(capacity) - Fraction(prefix[e]) - Fraction(cs[e])
        if room < 0:
            continue
        rest, units = _sub_knapsack(vals, weights, list(range(e + 1, len(vals))), room, u)
        layers = (e, *rest)
        value = math.fsum(vals[j] for j in layers)
        key = (-value, Fraction(prefix[e]) + Fraction(cs[e]) + units * u, layers)
        if key < best_key:
            best_key = key
            best = Assignment(layers, value, math.fsum([prefix[e], *(cs[j] for j in layers)]))
    return best


def brute_force(values: Sequence[float], costs: Sequence[float], capacity: float,
                prefix_costs: Sequence[float] | None = None) -> Assignment:
    """Exhaustive oracle over all subsets (``l <= 20``) at the true costs, additive or ``M(e) + Σ c_j`` when
    ``prefix_costs`` is given; same objective and tie-breaking as the DP solvers (O24, O26)."""
    if len(values) > MAX_BRUTE_FORCE_LAYERS:
        raise ValueError(f"brute force is limited to {MAX_BRUTE_FORCE_LAYERS} layers, got {len(values)}")
    vals, cs, capacity, prefix = _check(values, costs, capacity, prefix_costs)
    eligible = [j for j, v in enumerate(vals) if v > 0]  # a subset with a value <= 0 layer is never chosen
    best, best_key = EMPTY, (-0.0, 0.0, ())
    if capacity < 0:
        return best
    for k in range(1, len(eligible) + 1):
        for layers in combinations(eligible, k):
            cost = math.fsum([*([prefix[layers[0]]] if prefix is not None else []), *(cs[j] for j in layers)])
            if cost > capacity:
                continue
            value = math.fsum(vals[j] for j in layers)
            key = (-value, cost, layers)
            if key < best_key:
                best, best_key = Assignment(layers, value, cost), key
    return best


def top_k_that_fit(order: Sequence[int], costs: Sequence[float], capacity: float,
                   prefix_costs: Sequence[float] | None = None) -> Assignment:
    """The "top-k layers that fit" baseline: walk ``order`` (e.g. the last layer first) and take layers while the
    running cost (additive, or ``M(e) + Σ c_j`` with ``prefix_costs``) fits; stop at the first that does not.
    ``value`` is the number of layers taken."""
    cs = _floats(costs, "costs", nonnegative=True)
    prefix = None if prefix_costs is None else _floats(prefix_costs, "prefix_costs", nonnegative=True)
    if prefix is not None and len(prefix) != len(cs):
        raise ValueError(f"{len(prefix)} prefix costs but {len(cs)} costs")
    capacity = float(capacity)
    if math.isnan(capacity):
        raise ValueError("capacity is NaN")
    order = [int(j) for j in order]
    if any(not 0 <= j < len(cs) for j in order) or len(set(order)) != len(order):
        raise ValueError(f"order must list distinct layer indices in [0, {len(cs)}), got {order}")
    taken: list[int] = []
    cost = 0.0
    for j in order:
        trial = sorted([*taken, j])
        trial_cost = math.fsum([*([prefix[trial[0]]] if prefix is not None else []), *(cs[i] for i in trial)])
        if trial_cost > capacity:
            break
        taken, cost = trial, trial_cost
    return Assignment(tuple(taken), float(len(taken)), cost)

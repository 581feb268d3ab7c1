"""Fed-piLot (Zhang, Xu, Liu, Hu; arXiv 2410.10200v1; algorithms.md §3): memory-aware LoRA layer assignment.

Fed-piLot has no public code and its paper leaves the IG-Score combination, STAgg and DWA unspecified (§3.2); what
follows is algorithms.md §3.3's proposal, each choice labelled.

* **IG-Score** (§3.3 step 2): a client's local score of layer j is the gradient norm of its LoRA tensors on a small IG
  sample, ``Γ_j = ‖∇_{θ_j} L(D^IG)‖₂``; the *affordable* score zeroes layers whose cost exceeds the client's capacity and
  normalises to 1; the server keeps a global score ``Γ̂`` (exponential moving average, decay β, of the data-weighted
  mean of reported normalised scores); the combined score is ``Γ'' = λ·Γ̂ + (1−λ)·Γ'`` (λ = 0.5, β = 0.9: PROPOSAL).
* **STAgg with DWA** (step 5, PROPOSAL): per LoRA tensor of layer j, the spatial average ``Δ̄_j`` of the updates of the
  clients that trained j (data-size weights), a temporal momentum ``H_j = γ H_j + (1−γ) Δ̄_j`` (Δ̄ = 0 for an untrained
  layer, so stale momentum decays), a coverage weight ``w_j = clip(1/ρ_j, 1, w_max)`` normalised to mean 1 over the
  covered layers (ρ_j = share of the round's clients that trained j), and the update
  ``θ_j ← θ_j + η_g·[(1−κ)·w_j·Δ̄_j + κ·H_j]`` (η_g = 1, κ = 0.5, γ = 0.5, w_max = 3).  With every client training
  every layer and κ = 0 it is FedAvg (oracle O27); a layer nobody trained, with zero momentum, is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def affordable_scores(local: list[float], costs: list[float], capacity: float) -> list[float]:
    """``Γ'_j = Γ_j`` if layer j alone fits (``c_j ≤ capacity``) else 0, normalised to sum 1 (all 0 if none fits)."""
    kept = [g if c <= capacity and math.isfinite(g) and g > 0 else 0.0 for g, c in zip(local, costs, strict=True)]
    total = sum(kept)
    return [k / total for k in kept] if total > 0 else [0.0] * len(kept)


def combined_scores(global_scores: list[float] | None, affordable: list[float], lam: float) -> list[float]:
    """``Γ''_j = λ·Γ̂_j + (1−λ)·Γ'_j``; before any global score exists, the affordable score alone."""
    if global_scores is None:
        return list(affordable)
    return [lam * g + (1 - lam) * a for g, a in zip(global_scores, affordable, strict=True)]


def update_global_scores(previous: list[float] | None, reported: list[list[float]], weights: list[float],
                         beta: float) -> list[float]:
    """``Γ̂ ← β·Γ̂ + (1−β)·Σ_k p_k Γ'_k`` (the first round takes the weighted mean itself)."""
    total = sum(weights)
    mean = [sum(w * r[j] for w, r in zip(weights, reported)) / total for j in range(len(reported[0]))]
    if previous is None:
        return mean
    return [beta * p + (1 - beta) * m for p, m in zip(previous, mean, strict=True)]


def dwa_weights(coverage: list[float], w_max: float) -> list[float]:
    """``w_j = clip(1/ρ_j, 1, w_max)``, normalised to mean 1 over covered layers (ρ_j > 0); 0 for uncovered ones."""
    raw = [min(max(1.0 / rho, 1.0), w_max) if rho > 0 else 0.0 for rho in coverage]
    covered = [w for w, rho in zip(raw, coverage) if rho > 0]
    if not covered:
        return raw
    mean = sum(covered) / len(covered)
    return [w / mean for w in raw]


@dataclass(frozen=True)
class STAggSettings:
    server_lr: float = 1.0   # η_g
    kappa: float = 0.5       # κ: share of the momentum in the step
    gamma: float = 0.5       # γ: momentum decay
    w_max: float = 3.0       # DWA cap


def stagg(global_tensors: dict[str, Tensor], uploads: list[dict[str, Tensor]], sizes: list[int],
          layer_of: dict[str, int], num_layers: int, momentum: dict[str, Tensor], settings: STAggSettings,
          use_dwa: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor], list[float]]:
    """One STAgg step over every tensor of ``global_tensors``.

    ``uploads[k]`` holds the tensors client k trained (a subset of the keys), ``layer_of`` maps each key to its layer.
    Returns the new global tensors, the new momentum and the per-layer coverage ρ_j."""
    trained_by = [set() for _ in range(num_layers)]
    for k, up in enumerate(uploads):
        for key in up:
            trained_by[layer_of[key]].add(k)
    coverage = [len(s) / len(uploads) if uploads else 0.0 for s in trained_by]
    weights = dwa_weights(coverage, settings.w_max) if use_dwa else [1.0 if c > 0 else 0.0 for c in coverage]
    new_global, new_momentum = {}, {}
    for key, theta in global_tensors.items():
        j = layer_of[key]
        contributors = [k for k in range(len(uploads)) if key in uploads[k]]
        acc = torch.zeros_like(theta, dtype=torch.float64)
        if contributors:
            n = sum(sizes[k] for k in contributors)
            for k in contributors:
                acc.add_((uploads[k][key].to(torch.float64) - theta.to(torch.float64)), alpha=sizes[k] / n)
        prev = momentum.get(key)
        h = (1 - settings.gamma) * acc if prev is None else settings.gamma * prev.to(torch.float64) + (1 - settings.gamma) * acc
        step = settings.server_lr * ((1 - settings.kappa) * weights[j] * acc + settings.kappa * h)
        new_global[key] = (theta.to(torch.float64) + step).to(theta.dtype)
        new_momentum[key] = h.to(theta.dtype)
    return new_global, new_momentum, coverage


# ------------------------------------------------------------------------------------------------ the methods
from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD, Adapter, module_of, role_of  # noqa: E402
from fedlora.knapsack import solve_01, solve_position_aware, top_k_that_fit  # noqa: E402
from fedlora.layers import block_index, modules_of  # noqa: E402
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register  # noqa: E402

MB = 1_000_000


def fit_layers(spec, budget: float, values: list[float] | None = None, order: list[int] | None = None,
               position_aware: bool = True, unit_mb: float = 0.25) -> list[int]:
    """The layers a client with ``budget`` bytes trains: the knapsack over ``values`` (Fed-piLot), or the longest
    run of ``order`` that fits (FedRA's random order, the top-k baseline's last-to-first order).  Every answer's
    predicted memory is within the budget."""
    mm = spec.memory
    costs, prefix, step = mm.knapsack_inputs()
    room = budget - step
    if room < 0:
        return []
    everything = list(range(mm.num_layers))
    if mm.predict(everything) <= budget and order is None:  # all fit: no rounding in the knapsack can lose one
        return [j for j in everything if values[j] > 0] if values is not None else everything
    if order is not None:
        got = (top_k_that_fit(order, costs, room, prefix) if position_aware
               else top_k_that_fit(order, mm.additive_costs(), room))
    elif position_aware:
        got = solve_position_aware(values, costs, prefix, room, unit=unit_mb * MB)
    else:
        got = solve_01(values, mm.additive_costs(), room, unit=unit_mb * MB)
    layers = sorted(got.layers)
    if mm.predict(layers) > budget * (1 + 1e-9):
        raise RuntimeError(f"layer assignment {layers} exceeds its budget ({mm.predict(layers)} > {budget} bytes)")
    return layers


class LayerAssignment(Method):
    """Shared machinery: each client trains A and B of a subset of layers (transformer blocks), chosen within its
    memory budget; the server aggregates each LoRA tensor over the clients that trained it (STAgg; FedRA and top-k
    use its spatial part only, oracle O28)."""

    averages_tensors = False
    needs_memory_model = True
    use_momentum = False
    use_dwa = False

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"global_scores": None})

    def _budget(self, cid: int) -> float:
        budgets = self.spec.budgets
        return min(budgets.values()) if self.cfg.memory.smallest_for_all else budgets[cid]

    def choose(self, round_idx: int, state: ServerState, cid: int) -> tuple[list[int] | None, dict]:
        """(layers, plan config): layers None = the client chooses (Fed-piLot)."""
        raise NotImplementedError

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(roles)
        plans = []
        for cid in client_ids:
            layers, config = self.choose(round_idx, state, cid)
            config = {**config, "budget": self._budget(cid)}
            modules = None if layers is None else modules_of(layers, self.spec.layer_groups)
            plans.append(ClientPlan(cid, download, train=roles, upload=roles, config=config, modules=modules))
        return plans

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return state
        flat = state.adapter.to_flat()
        num_layers = len(self.spec.layer_groups)
        layer_of = {k: (num_layers if role_of(k) == ROLE_HEAD else block_index(module_of(k))) for k in flat}
        momentum = {k[len("momentum/"):]: v for k, v in state.extra.items() if k.startswith("momentum/")}
        p = self.cfg.pilot
        settings = STAggSettings(server_lr=p.server_lr if self.use_momentum else 1.0,
                                 kappa=p.momentum_share if self.use_momentum else 0.0,
                                 gamma=p.momentum_decay, w_max=p.dwa_max)
        new, new_momentum, coverage = stagg(flat, [u.tensors for u in updates], [u.num_examples for u in updates],
                                            layer_of, num_layers + 1, momentum if self.use_momentum else {},
                                            settings, use_dwa=self.use_dwa and p.dwa)
        extra = {k: v for k, v in state.extra.items() if not k.startswith("momentum/")}
        if self.use_momentum:
            extra.update({f"momentum/{k}": v for k, v in new_momentum.items()})
        extra["coverage"] = coverage[:num_layers]
        reported = [u.report["affordable_scores"] for u in updates if "affordable_scores" in u.report]
        if reported:
            weights = [u.num_examples for u in updates if "affordable_scores" in u.report]
            extra["global_scores"] = update_global_scores(state.extra.get("global_scores"), reported, weights,
                                                          p.score_decay)
        return ServerState(state.adapter.with_tensors(new), extra)


@register
class FedPilot(LayerAssignment):
    name = "pilot"
    summary = ("Fed-piLot: each client trains the LoRA layers a knapsack picks (value = local-global IG-Score, "
               "weight = memory, capacity = its budget); STAgg with dynamic weights.")
    citation = "Zhang et al., Fed-piLot: Optimizing LoRA Assignment for Efficient Federated FM Fine-Tuning, 2024"
    use_momentum = True
    use_dwa = True

    def choose(self, round_idx, state, cid):
        p = self.cfg.pilot
        return None, {"select": "pilot", "global_scores": state.extra.get("global_scores"),
                      "score_mix": p.score_mix, "ig_examples": p.ig_examples}

    def select(self, plan: ClientPlan, local_scores: list[float]) -> tuple[list[int], dict]:
        """Client side, given its IG gradient norms: affordable -> combined scores -> knapsack (§3.3 steps 2-3)."""
        mm = self.spec.memory
        budget = plan.config["budget"]
        alone = [mm.predict([j]) for j in range(mm.num_layers)]
        affordable = affordable_scores(local_scores, alone, budget)
        combined = combined_scores(plan.config.get("global_scores"), affordable, plan.config["score_mix"])
        layers = fit_layers(self.spec, budget, values=combined, position_aware=self.cfg.memory.position_aware,
                            unit_mb=self.cfg.memory.knapsack_unit_mb)
        return layers, {"affordable_scores": affordable, "combined_scores": combined}

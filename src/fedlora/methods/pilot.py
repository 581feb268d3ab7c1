"""Fed-piLot (Zhang, Xu, Liu, Hu, "Fed-piLot: Optimizing LoRA Assignment for Efficient Federated Foundation Model
Fine-Tuning", arXiv 2410.10200v1, 2024; docs/methods.md §14): memory-aware LoRA layer assignment.

**From the paper**: each client trains a subset of LoRA layers (here: transformer blocks)
chosen by a 0/1 knapsack, value = a combined local-global IG-Score built from per-layer gradient norms on a small IG
sample, weight = the layer's memory cost, capacity = the client's memory; the server aggregates with STAgg (spatial +
temporal) and a dynamic weight adjustment (DWA) that "compensates for under-updated layers" (v2).  Fed-piLot has no
public code, and the formulas of the score combination, the cost model, the solver, STAgg and DWA were not available
to us; every formula below is **our PROPOSAL** (docs/methods.md §14), labelled as such.

* **Costs**: by default the paper's additive knapsack, ``Σ_j c_j ≤ K_i − M_step`` with ``c_j = G_j + Act(j)`` (LoRA
  gradient + AdamW state of layer j, plus the activations from block j up:
  :meth:`fedlora.memory.MemoryModel.additive_costs`), an over-estimate, so every choice also fits the true memory.
  ``memory.position_aware = true`` is our exact extension, ``M_step + Σ_j G_j + Act(e)`` with e the earliest trained
  block.  With LoRA, G_j is tiny next to the activations, so under that model (every score positive) the best set is
  the longest suffix of blocks that fits and the IG-Score never changes the choice (Fed-piLot then differs from top-k
  only in its aggregation); the additive form keeps the paper's trade-off between layers.  When the true memory of
  training every layer fits the budget, every layer with a positive score is trained (no knapsack needed; ours).
* **IG-Score** (PROPOSAL): a client's local score of layer j is the gradient norm of its LoRA tensors on the IG
  sample, ``Γ_j = ‖∇_{θ_j} L(D^IG)‖₂``; the *affordable* score zeroes layers whose cost exceeds the client's capacity
  and normalises to 1; the server keeps a global score ``Γ̂`` (exponential moving average, decay β, of the
  data-weighted mean of reported normalised scores); the combined score is ``Γ'' = λ·Γ̂ + (1−λ)·Γ'`` (λ = 0.5,
  β = 0.9).
* **STAgg with DWA** (PROPOSAL): per LoRA tensor of layer j, the spatial average ``Δ̄_j`` of the updates of the
  clients that trained j (data-size weights), a temporal momentum ``H_j ← γ H_j + (1−γ) Δ̄_j`` (Δ̄ = 0 for an
  untrained layer, so stale momentum decays), bias-corrected as in Adam, ``Ĥ_j = H_j / (1 − γ^t)`` with t the number
  of momentum updates so far (kept in the server state, so a resumed run continues exactly), a coverage weight
  ``w_j = min(1/ρ_j, w_max)`` **without renormalisation** (ρ_j = share of the round's clients that trained j; a fully
  covered layer and the task head get w = 1), and the update ``θ_j ← θ_j + η_g·[(1−κ)·w_j·Δ̄_j + κ·Ĥ_j]``
  (η_g = 1, κ = 0.5, γ = 0.5, w_max = 3).  So with η_g = 1 a fully covered layer steps exactly FedAvg's update in
  round 1 (and in every round while the update stays the same), for any κ; with κ = 0 and full coverage the rule
  *is* FedAvg (oracle O27, docs/oracles.md); a layer nobody trained, with zero momentum, is unchanged.  (An earlier
  version normalised w to mean 1 over the covered layers, head included, which shrank fully covered layers and the
  head to about 0.6× and, without bias correction, made round 1 step 0.75× FedAvg.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, replace

import numpy as np
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


def dwa_weights(coverage: list[float], w_max: float, full: tuple[int, ...] = ()) -> list[float]:
    """``w_j = min(1/ρ_j, w_max)`` for covered layers (ρ_j > 0), 0 for uncovered ones, no renormalisation: a layer
    every client trained gets exactly 1, an under-covered one up to ``w_max``.  Layers in ``full`` (the task head)
    count as fully covered: 1 whenever anyone trained them."""
    return [0.0 if rho <= 0 else 1.0 if j in full else min(1.0 / rho, w_max) for j, rho in enumerate(coverage)]


def bias_correction(gamma: float, t: int) -> float:
    """Adam's ``1 / (1 − γ^t)`` for the t-th momentum update (t ≥ 1); 1 when it is undefined (γ = 1: H stays 0)."""
    denom = 1.0 - gamma ** t
    return 1.0 / denom if t >= 1 and denom > 0 else 1.0


@dataclass(frozen=True)
class STAggSettings:
    server_lr: float = 1.0   # η_g
    kappa: float = 0.5       # κ: share of the momentum in the step
    gamma: float = 0.5       # γ: momentum decay
    w_max: float = 3.0       # DWA cap
    bias_correction: bool = True  # divide the momentum by (1 − γ^t) in the step


def stagg(global_tensors: dict[str, Tensor], uploads: list[dict[str, Tensor]], sizes: list[int],
          layer_of: dict[str, int], num_layers: int, momentum: dict[str, Tensor], settings: STAggSettings,
          use_dwa: bool = True, step: int = 1, full: tuple[int, ...] = ()) -> tuple[dict[str, Tensor],
                                                                                     dict[str, Tensor], list[float]]:
    """One STAgg step over every tensor of ``global_tensors``.

    ``uploads[k]`` holds the tensors client k trained (a subset of the keys), ``layer_of`` maps each key to its layer,
    ``step`` is t, the index of this momentum update (1 for the first: bias correction ``1/(1−γ^t)``), and ``full``
    lists the layers DWA treats as fully covered (the head).  Returns the new global tensors, the new (uncorrected)
    momentum and the per-layer coverage ρ_j."""
    trained_by = [set() for _ in range(num_layers)]
    for k, up in enumerate(uploads):
        for key in up:
            trained_by[layer_of[key]].add(k)
    coverage = [len(s) / len(uploads) if uploads else 0.0 for s in trained_by]
    weights = (dwa_weights(coverage, settings.w_max, full) if use_dwa
               else [1.0 if c > 0 else 0.0 for c in coverage])
    correction = bias_correction(settings.gamma, step) if settings.bias_correction else 1.0
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
        h = (1 - settings.gamma) * acc
        if prev is not None:
            h = settings.gamma * prev.to(torch.float64) + h
        update = (1 - settings.kappa) * weights[j] * acc
        if settings.kappa:
            update = update + settings.kappa * correction * h
        new_global[key] = (theta.to(torch.float64) + settings.server_lr * update).to(theta.dtype)
        new_momentum[key] = h.to(theta.dtype)
    return new_global, new_momentum, coverage


# ------------------------------------------------------------------------------------------------ the methods
from fedlora.adapters import (A_SUFFIX, B_SUFFIX, ROLE_A, ROLE_B, ROLE_HEAD, Adapter, module_of,  # noqa: E402
                              role_of)
from fedlora.client import LossFn, client_seed  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402
from fedlora.knapsack import solve_01, solve_position_aware, top_k_that_fit  # noqa: E402
from fedlora.layers import block_index, modules_of  # noqa: E402
from fedlora.memory import peak_rss, reset_peak_rss  # noqa: E402
from fedlora.methods.base import ClientContext, ClientPlan, Method, ServerState, Update, register  # noqa: E402

MB = 1_000_000


def ig_gradient_norms(*, model: torch.nn.Module, slots, initial: Adapter, plan: ClientPlan, examples,
                      loss_fn: LossFn, groups: list[list[str]], num_examples: int, batch_size: int, round_idx: int,
                      seed: int) -> list[float]:
    """Fed-piLot's local IG-Score (docs/methods.md §14, step 1): ``‖∇_{θ_j} L(D^IG)‖₂`` per layer j (its A and B),
    from one gradient over a seeded sample of ``num_examples`` local examples at the downloaded global adapter; no
    optimiser step.  The pass holds every layer's gradient at once (the paper allows layer-by-layer accumulation
    when memory forbids it; in simulation it is not budgeted)."""
    slots.load(initial.with_tensors(plan.download))
    params = slots.set_trainable(frozenset({"lora_A", "lora_B"}))
    rng = np.random.default_rng([client_seed(seed, round_idx, plan.client_id), 61])
    n = len(examples)
    idx = np.sort(rng.choice(n, size=min(num_examples, n), replace=False))
    model.train()
    try:
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            (loss_fn(model, examples.batch(chunk)) * (len(chunk) / len(idx))).backward()
        norms = []
        for group in groups:
            sq = 0.0
            for name in group:
                for key in (name + A_SUFFIX, name + B_SUFFIX):
                    g = slots.params[key].grad
                    sq += float((g.double() ** 2).sum()) if g is not None else 0.0
            norms.append(math.sqrt(sq))
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return norms


def fit_layers(spec, budget: float, values: list[float] | None = None, order: list[int] | None = None,
               position_aware: bool = False, unit_mb: float = 0.25) -> list[int]:
    """The layers a client with ``budget`` bytes trains: the knapsack over ``values`` (Fed-piLot), or the longest
    run of ``order`` that fits (the top-k baseline's last-to-first order).

    Costs: the paper's additive ``c_j = G_j + Act(j)`` (default) or, with ``position_aware``, the exact
    ``M_step + Σ G_j + Act(e)``.  When the true (position-aware) memory of training all the layers fits, every one
    of them with a positive value is trained, whatever the cost model: nothing has to be chosen, and the additive
    form, which counts the shared activations once per layer, would wrongly refuse it.  Every answer's true
    predicted memory (:meth:`MemoryModel.predict`) is within the budget: the additive costs over-estimate it and the
    knapsack rounds every cost up."""
    mm = spec.memory
    costs, prefix, step = mm.knapsack_inputs()
    room = budget - step
    if room < 0:
        return []
    everything = sorted(order) if order is not None else list(range(mm.num_layers))
    if mm.predict(everything) <= budget:  # all fit: no rounding in the knapsack can lose one
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
    config_sections = ("pilot", "memory")
    reads_sections = ("memory",)  # [pilot] reaches the shared aggregation, but only Fed-piLot's flags make it count
    minimal_overrides = ("memory.budgets=[0.5, 0.75, 1.0]", 'memory.unit="fraction"', "memory.calibrate=false")
    scores_layers_by_gradient = True
    use_momentum = use_dwa = False
    report_columns = {"layers": "layers_trained", "memory_predicted_mb": "memory_predicted_mb_per_client",
                      "memory_measured_mb": "memory_measured_mb_per_client"}

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.memory.budgets:
            raise ConfigError(f"method {cfg.method!r} assigns LoRA layers within each client's memory budget: set "
                              f"memory.budgets (e.g. [0.5, 0.75, 1.0] with memory.unit = 'fraction')")
        if cfg.dp.enabled:
            raise ConfigError(f"method {cfg.method!r} with dp.enabled: layer-assignment methods do not support DP-SGD "
                              f"yet")

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"global_scores": None})

    def predicted_memory(self, plan: ClientPlan, layers: list[int]) -> float:
        """Bytes the memory model predicts for a client training ``layers`` (the full-depth model)."""
        return self.spec.memory.predict(layers)

    def prepare_client(self, ctx: ClientContext, plan: ClientPlan) -> tuple[ClientPlan, dict]:
        """Report the layers the client trains and their predicted memory."""
        report: dict = {}
        if plan.modules is not None:
            report["layers"] = sorted({block_index(m) for m in plan.modules})
            report["memory_predicted_mb"] = self.predicted_memory(plan, report["layers"]) / 1e6
        return plan, report

    def plan_as_trained(self, plan: ClientPlan, report: dict) -> ClientPlan:
        """A client that chose its own layers (Fed-piLot) trained and uploaded those layers' modules."""
        chose = report.get("layers") is not None and plan.modules is None
        return replace(plan, modules=modules_of(report["layers"], self.spec.layer_groups)) if chose else plan

    @contextlib.contextmanager
    def training_scope(self, ctx: ClientContext, plan: ClientPlan, report: dict):
        """Measure the peak memory of local training above what was resident before it (Linux)."""
        before = reset_peak_rss()
        yield
        report["memory_measured_mb"] = (peak_rss() - before) / 1e6

    def _budget(self, cid: int) -> float:
        budgets = self.spec.budgets
        return min(budgets.values()) if self.section("memory").smallest_for_all else budgets[cid]

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
        p = self.section("pilot")
        settings = STAggSettings(server_lr=p.server_lr if self.use_momentum else 1.0,
                                 kappa=p.momentum_share if self.use_momentum else 0.0,
                                 gamma=p.momentum_decay, w_max=p.dwa_max,
                                 bias_correction=p.momentum_bias_correction)
        # t of the bias correction: momentum updates so far (a checkpoint from before the counter: one per round)
        t = int(state.extra.get("momentum_steps", round_idx - 1 if momentum else 0)) + 1
        new, new_momentum, coverage = stagg(flat, [u.tensors for u in updates], [u.num_examples for u in updates],
                                            layer_of, num_layers + 1, momentum if self.use_momentum else {},
                                            settings, use_dwa=self.use_dwa and p.dwa, step=t, full=(num_layers,))
        extra = {k: v for k, v in state.extra.items() if not k.startswith("momentum/")}
        if self.use_momentum:
            extra.update({f"momentum/{k}": v for k, v in new_momentum.items()})
            extra["momentum_steps"] = t
        extra["coverage"] = coverage[:num_layers]
        # A client that can afford no layer reports all zeros: it says nothing about which layers matter, so it is
        # left out of Γ̂'s weighted mean instead of shrinking Γ̂ towards 0 (which would tilt Γ'' towards Γ').
        informative = [u for u in updates if sum(u.report.get("affordable_scores") or ()) > 0]
        reported = [u.report["affordable_scores"] for u in informative]
        if reported:
            weights = [u.num_examples for u in informative]
            extra["global_scores"] = update_global_scores(state.extra.get("global_scores"), reported, weights,
                                                          p.score_decay)
        return ServerState(state.adapter.with_tensors(new), extra)


@register
class FedPilot(LayerAssignment):
    name = "pilot"
    own_server_step = "its spatial-temporal aggregation has its own server step: pilot.server_lr"
    summary = ("Fed-piLot: each client trains the LoRA layers a knapsack picks (value = local-global IG-Score, "
               "weight = memory, capacity = its budget); STAgg with dynamic weights.")
    citation = "Zhang et al., Fed-piLot: Optimizing LoRA Assignment for Efficient Federated FM Fine-Tuning, 2024"
    use_momentum = use_dwa = True
    reads_sections = ("pilot", "memory")

    def prepare_client(self, ctx: ClientContext, plan: ClientPlan) -> tuple[ClientPlan, dict]:
        """The client's side of Fed-piLot (docs/methods.md §14): IG-Scores on its own data at the downloaded adapter,
        then its own knapsack over the combined scores; the plan then trains the chosen layers' modules."""
        scores = ig_gradient_norms(model=ctx.model, slots=ctx.slots, initial=ctx.start(), plan=plan,
                                   examples=ctx.examples, loss_fn=ctx.loss_fn, groups=self.spec.layer_groups,
                                   num_examples=self.section("pilot").ig_examples, batch_size=ctx.train.batch_size,
                                   round_idx=ctx.round_idx, seed=ctx.seed)
        layers, report = self.select(plan, scores)
        report["ig_gradient_norms"] = scores
        plan = dataclasses.replace(plan, modules=modules_of(layers, self.spec.layer_groups))
        plan, more = super().prepare_client(ctx, plan)
        return plan, {**report, **more}

    def choose(self, round_idx, state, cid):
        p = self.section("pilot")
        return None, {"select": "pilot", "global_scores": state.extra.get("global_scores"),
                      "score_mix": p.score_mix, "ig_examples": p.ig_examples}

    def select(self, plan: ClientPlan, local_scores: list[float]) -> tuple[list[int], dict]:
        """Client side, given its IG gradient norms: affordable -> combined scores -> knapsack."""
        mm = self.spec.memory
        budget = plan.config["budget"]
        alone = [mm.predict([j]) for j in range(mm.num_layers)]
        affordable = affordable_scores(local_scores, alone, budget)
        combined = combined_scores(plan.config.get("global_scores"), affordable, plan.config["score_mix"])
        layers = fit_layers(self.spec, budget, values=combined, position_aware=self.section("memory").position_aware,
                            unit_mb=self.section("memory").knapsack_unit_mb)
        return layers, {"affordable_scores": affordable, "combined_scores": combined}

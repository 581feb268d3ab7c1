"""HetLoRA (Cho et al., EMNLP 2024; docs/methods.md §11): heterogeneous ranks by zero-padding, sparsity-weighted
aggregation and rank self-pruning.

The server keeps one global adapter at the largest rank ``r_max`` per module.  Client k receives its first ``r_k``
rows of A and columns of B, trains both with the regulariser ``λ·‖B[:, ⌊γr⌋:]‖_F·‖A[⌊γr⌋:, :]‖_F`` (per module,
summed), and uploads them.  The server zero-pads every upload to ``r_max`` and sums them with weights
``p_k ∝ ‖s_k B_k A_k‖_F`` (``hetlora.weighting = "sparsity"``, the paper) or data sizes (``"data"``, FlexLoRA's
baseline).

Our resolutions (docs/methods.md §11): ranks differ, so the factors are exchanged in *pre-scaled* form, ``√s_k·B_k``
and ``√s_k·A_k`` (the ``handle_alpha`` of FlexLoRA's HetLoRA baseline): the global adapter holds ``B̃, Ã`` with
scale 1 and client k trains ``B = B̃[:, :r_k]/√s_k``, ``A = Ã[:r_k]/√s_k``, so its initial product equals the
global's rank-``r_k`` truncation.
Round 1 starts every client from the fresh PEFT init.  A rank index that no client of the round covers keeps the
global's previous row of A and column of B (``hetlora.uncovered = "keep"``, the default); plain zero-padding
(``"zero"``) would zero it, and a zero row of A with a zero column of B never gets a gradient again, so after one round
without large clients the large clients would train at a smaller rank for the rest of the run.  The paper's
zero-padding sum describes a round in which the largest rank takes part; it does not say what an uncovered index
becomes.  Self-pruning (which FlexLoRA's baseline omits) is real: when a
client's tail norm ``‖B_tail‖·‖A_tail‖`` shrank during a round, it reports ``prune_to = ⌊γ r⌋`` and trains at the
smaller ranks from its next round on; its upload of that round still has its old rank, the server truncates it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.adapters import A_SUFFIX, B_SUFFIX, ROLE_A, ROLE_B, Adapter, LoraModule
from fedlora.errors import ConfigError
from fedlora.lowrank import product_frobenius_norm, zero_pad
from fedlora.methods.base import (ClientPlan, LocalHooks, Method, ServerState, Update, average_head, client_factors, data_weights,
                                  register)


def pruned_rank(rank: int, gamma: float) -> int:
    """``⌊γ r⌋``, at least 1: where the penalised tail starts and the rank after a prune."""
    return max(1, int(math.floor(gamma * rank)))


def tail_norm(B: Tensor, A: Tensor, gamma: float) -> Tensor:
    """``‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:, :]‖_F`` (differentiable), 0 when the tail is empty."""
    start = pruned_rank(A.shape[0], gamma)
    return B[:, start:].norm() * A[start:, :].norm()


def sparsity_weights_scaled(Bs: list[Tensor], As: list[Tensor], scales: list[float]) -> list[float]:
    """``p_k ∝ ‖s_k B_k A_k‖_F`` normalised to 1; equal weights when every update is zero (oracle O19,
    docs/oracles.md)."""
    norms = [s * product_frobenius_norm(B, A) for B, A, s in zip(Bs, As, scales)]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else [1.0 / len(norms)] * len(norms)


def aggregate_module(Bs: list[Tensor], As: list[Tensor], weights: list[float], scales: list[float],
                     rank: int, previous: LoraModule | None = None) -> LoraModule:
    """``Σ_k p_k pad(√s_k B_k)``, ``Σ_k p_k pad(√s_k A_k)`` at ``rank`` (scale 1; oracle O18).

    With ``previous`` (the pre-scaled global before the round), a rank index no client covers (every ``r_k ≤ i``)
    keeps the previous row of A and column of B (``hetlora.uncovered = "keep"``); without it, it is zero (plain
    zero-padding, ``"zero"``), which no later client can revive: a zero row of A and zero column of B get no
    gradient in either factor."""
    B_sum, A_sum = None, None
    for B, A, p, s in zip(Bs, As, weights, scales):
        B_pad, A_pad = zero_pad(B * math.sqrt(s), A * math.sqrt(s), rank)
        B_sum = B_pad * p if B_sum is None else B_sum + B_pad * p
        A_sum = A_pad * p if A_sum is None else A_sum + A_pad * p
    covered = max(A.shape[0] for A in As)
    if previous is not None and covered < rank:
        B_sum[:, covered:] = previous.B[:, covered:rank].to(B_sum.dtype)
        A_sum[covered:] = previous.A[covered:rank].to(A_sum.dtype)
    return LoraModule(A=A_sum, B=B_sum, alpha=float(rank))


def distribute(module: LoraModule, rank: int, alpha: float) -> tuple[Tensor, Tensor]:
    """A client's ``(B, A)`` at ``rank`` from the pre-scaled global: the first rows/columns, divided by ``√s_k``."""
    root = math.sqrt(alpha / rank)
    return (module.B[:, :rank] / root).contiguous(), (module.A[:rank] / root).contiguous()


def total_tail_norm(slots, gamma: float) -> Tensor:
    """``Σ_m ‖B_m[:, ⌊γr⌋:]‖_F·‖A_m[⌊γr⌋:, :]‖_F`` over a client's current factors (Cho et al., EMNLP 2024)."""
    return sum((tail_norm(slots.params[n + B_SUFFIX], slots.params[n + A_SUFFIX], gamma) for n in slots.shapes),
               torch.zeros(()))


class RankSelfPruning(LocalHooks):
    """HetLoRA's client side: the regulariser ``λ·Σ_m tail_norm`` in the local loss, and the pruning decision — a
    client whose tail norm fell during the round (and ``hetlora.prune``) reports ``prune = 1``, and the server
    shrinks its rank to ``⌊γr⌋`` from the next round on."""

    def __init__(self, slots, penalty: float, gamma: float, prune: bool):
        self.weight, self.gamma, self.prune = penalty, gamma, prune
        self.before = float(total_tail_norm(slots, gamma).detach())

    def penalty(self, slots) -> Tensor | None:
        return self.weight * total_tail_norm(slots, self.gamma) if self.weight > 0 else None

    def metrics(self, slots, trained: Adapter) -> dict[str, float]:
        after = float(total_tail_norm(slots, self.gamma).detach())
        return {"tail_norm": after, "prune": float(self.prune and after < self.before)}


@register
class HetLoRA(Method):
    name = "hetlora"
    summary = ("HetLoRA: heterogeneous ranks by zero-padding; sparsity-weighted aggregation; clients prune their "
               "rank with a tail-norm regulariser.")
    citation = "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, EMNLP 2024"
    heterogeneous_ranks = True
    config_sections = ("hetlora",)
    minimal_overrides = ('lora.rank_distribution="explicit"', "lora.client_ranks=[2, 4, 8]")
    averages_tensors = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.dp.enabled and cfg.hetlora.penalty > 0:
            raise ConfigError("hetlora.penalty is not part of the privatised gradient: set hetlora.penalty = 0 with "
                              "dp.enabled = true")

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"aggregated": False, "pruned_ranks": {}})

    def local_hooks(self, plan: ClientPlan, slots) -> LocalHooks:
        c = plan.config
        return RankSelfPruning(slots, float(c.get("rank_penalty", 0.0)), float(c.get("rank_gamma", 0.99)),
                               bool(c.get("rank_prune")))

    def client_ranks(self, state: ServerState, cid: int) -> dict[str, int]:
        return dict(state.extra.get("pruned_ranks", {}).get(str(cid), self.spec.client_ranks[cid]))

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        head = state.adapter.to_flat(self.head_roles())
        h = self.section("hetlora")
        plans, downloads = [], {}
        for cid in client_ids:
            ranks = self.client_ranks(state, cid)
            key = tuple(sorted(ranks.items()))
            if key not in downloads:  # one download per rank configuration, shared by the clients that have it
                download = dict(head)
                if state.extra.get("aggregated"):
                    for name, module in state.adapter.modules.items():
                        B, A = distribute(module, ranks[name], self.spec.alpha)
                        download[name + B_SUFFIX], download[name + A_SUFFIX] = B, A
                downloads[key] = download
            download = downloads[key]
            config = {"rank_penalty": h.penalty, "rank_gamma": h.gamma, "rank_prune": h.prune}
            plans.append(ClientPlan(cid, download, train=roles, upload=roles, config=config, ranks=ranks))
        return plans

    def _prescaled(self, state: ServerState, module: LoraModule) -> LoraModule:
        """The global module in pre-scaled form.  Before the first aggregation the state holds the fresh init at the
        global rank ``r`` (PEFT scale ``α/r``), so its rows are multiplied by ``√(α/r)``: a client of rank ``r``
        downloading a kept row then starts it from exactly its fresh init."""
        if state.extra.get("aggregated"):
            return module
        root = math.sqrt(self.spec.alpha / module.rank)
        return LoraModule(A=module.A * root, B=module.B * root, alpha=float(module.rank))

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return state
        pruned = {k: dict(v) for k, v in state.extra.get("pruned_ranks", {}).items()}
        for u in updates:
            if u.metrics.get("prune"):
                ranks = self.client_ranks(state, u.client_id)
                pruned[str(u.client_id)] = {n: pruned_rank(r, self.section("hetlora").gamma) for n, r in ranks.items()}
        data_w = data_weights(updates)
        modules = {}
        for name, module in state.adapter.modules.items():
            Bs, As = client_factors(updates, name)
            keep = [pruned.get(str(u.client_id), {}).get(name, A.shape[0]) for u, A in zip(updates, As)]
            scales = [self.spec.alpha / A.shape[0] for A in As]  # the scale each client trained with
            Bs = [B[:, :r] for B, r in zip(Bs, keep)]  # a client that pruned this round drops its tail now
            As = [A[:r] for A, r in zip(As, keep)]
            weights = (sparsity_weights_scaled(Bs, As, scales) if self.section("hetlora").weighting == "sparsity"
                       else data_w)
            previous = None if self.section("hetlora").uncovered == "zero" else self._prescaled(state, module)
            modules[name] = aggregate_module(Bs, As, weights, scales, module.rank, previous)
        head = {**state.adapter.head, **average_head(state, updates, data_w)}
        return ServerState(Adapter(modules, head), {**state.extra, "aggregated": True, "pruned_ranks": pruned})

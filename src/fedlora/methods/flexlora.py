"""FlexLoRA (Bai, Chen, Qian, Yao, Li; NeurIPS 2024; algorithms.md §2): heterogeneous client ranks, full-size
aggregation, SVD redistribution.

Each client k trains both factors at its own per-module rank ``r_k(m)`` with ``s_k = alpha / r_k`` (alpha fixed, so
``s = 16 / r`` as in the official code).  The server rebuilds ``ΔW_m = Σ_k p_k s_k B_k A_k`` (§2.2 step 3, data-size
``p_k``) and keeps it as its exact thin SVD: computed from the stacked factors (QR of ``[B_1|…|B_K]`` and of the
weighted ``Aᵀ`` stack, SVD of the small core; :func:`fedlora.lowrank.factored_svd`) whenever ``Σ r_k`` is below
``min(d_out, d_in)``, and from the dense matrix otherwise.  Client k then restarts from the best rank-``r_k``
approximation (Eckart–Young, step 4): ``B = U_r Σ_r / s_k``, ``A = V_rᵀ`` (``flexlora.svd_split = "B"``, the code), or
``√Σ`` on each side (``"sqrt"``, an ablation).

Our resolutions (§2.5): the evaluated and exported global model is the full ``W0 + ΔW`` (the unseen-task metric),
not a client's truncation; the server state is ``ΔW``'s SVD stored as an adapter of rank ``R = min(Σ r_k, d)`` with
``alpha = R`` (scale 1), so checkpoints and the PEFT export hold it exactly.  Round 1 starts every client from the
fresh PEFT init (seeded Kaiming A, B = 0), as the code does at t = 0.  The released code's defect (every client kept
rank 8, §2.3) is not reproduced: clients really train at their own ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fedlora.adapters import A_SUFFIX, B_SUFFIX, ROLE_A, ROLE_B, Adapter, LoraModule
from fedlora.lowrank import svd_of_weighted_sum, truncate
from fedlora.methods.base import (ClientPlan, Method, ServerState, Update, average_head, client_factors, data_weights,
                                  register)


def svd_form(module: LoraModule) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vh)`` of a module stored in SVD form (``B = U·diag(S)``, ``A = Vh``, scale 1)."""
    S = module.B.norm(dim=0)
    safe = torch.where(S > 0, S, torch.ones_like(S))
    U = torch.where(S > 0, module.B / safe, torch.zeros_like(module.B))
    return U, S, module.A


def aggregate_module(Bs: list[Tensor], As: list[Tensor], weights: list[float], scales: list[float],
                     path: str = "auto") -> LoraModule:
    """``Σ_k p_k s_k B_k A_k`` as its thin SVD in adapter form (oracles O11, O12, O16)."""
    U, S, Vh = svd_of_weighted_sum(Bs, As, [p * s for p, s in zip(weights, scales)], path)
    return LoraModule(A=Vh.contiguous(), B=(U * S).contiguous(), alpha=float(S.numel()))


def redistribute(module: LoraModule, rank: int, alpha: float, split: str = "B") -> tuple[Tensor, Tensor]:
    """A client's ``(B, A)`` at ``rank``: the best rank-r approximation of the global ΔW (O13–O15)."""
    U, S, Vh = svd_form(module)
    return truncate(U, S, Vh, rank, alpha / rank, split)


@register
class FlexLoRA(Method):
    name = "flexlora"
    summary = ("FlexLoRA: heterogeneous ranks; the server takes the SVD of sum_k p_k s_k B_k A_k and sends each "
               "client its best approximation at its own rank.")
    citation = "Bai et al., Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources, NeurIPS 2024"
    heterogeneous_ranks = True
    averages_tensors = False

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"aggregated": False})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        head = state.adapter.to_flat(self.head_roles())
        plans = []
        for cid in client_ids:
            ranks = self.spec.client_ranks[cid]
            download = dict(head)
            if state.extra.get("aggregated"):
                for name, module in state.adapter.modules.items():
                    B, A = redistribute(module, ranks[name], self.spec.alpha, self.cfg.flexlora.svd_split)
                    download[name + B_SUFFIX], download[name + A_SUFFIX] = B, A
            plans.append(ClientPlan(cid, download, train=roles, upload=roles, ranks=ranks))
        return plans

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return state
        weights = data_weights(updates)
        modules = {}
        for name in state.adapter.modules:
            Bs, As = client_factors(updates, name)
            scales = [self.spec.alpha / A.shape[0] for A in As]
            modules[name] = aggregate_module(Bs, As, weights, scales)
        head = {**state.adapter.head, **average_head(state, updates, weights)}
        return ServerState(Adapter(modules, head), {**state.extra, "aggregated": True})

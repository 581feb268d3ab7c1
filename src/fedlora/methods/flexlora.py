"""FlexLoRA (Bai, Chen, Qian, Yao, Li; NeurIPS 2024; docs/methods.md §10): heterogeneous client ranks, full-size
aggregation, SVD redistribution.

Each client k trains both factors at its own per-module rank ``r_k(m)`` with ``s_k = alpha / r_k`` (alpha fixed, so
``s = 16 / r`` as in the official code).  The server rebuilds ``ΔW_m = Σ_k p_k s_k B_k A_k`` (data-size ``p_k``)
and keeps it as its exact thin SVD: computed from the stacked factors (QR of ``[B_1|…|B_K]`` and of the
weighted ``Aᵀ`` stack, SVD of the small core; :func:`fedlora.lowrank.factored_svd`) whenever ``Σ r_k`` is below
``min(d_out, d_in)``, and from the dense matrix otherwise.  Client k then restarts from the best rank-``r_k``
approximation (Eckart–Young): ``B = U_r Σ_r / s_k``, ``A = V_rᵀ`` (``flexlora.svd_split = "B"``, the code), or
``√Σ`` on each side (``"sqrt"``, an ablation).  A client whose rank exceeds the stored rank R (R = Σ r of the previous
round's clients can be smaller than a large client's rank) gets B's extra columns at zero and A's extra rows as a
seeded orthonormal completion of ``V_rᵀ``, as the official code's full SVD gives (null-space singular vectors with
σ ≈ 0): the product is the truncated SVD and the client trains every one of its ``r_k`` components
(:func:`fedlora.lowrank.truncate`).  The completion is seeded by (run seed, round, module), so every client of a
rank configuration gets the same download; the official code's null-space vectors are whatever LAPACK returns:
ours are another orthonormal set in the same null space (equally arbitrary; the products are equal).

Our resolutions (docs/methods.md §10): the evaluated and exported global model is the full ``W0 + ΔW`` (the
unseen-task metric), not a client's truncation; the server state is ``ΔW``'s SVD stored as an adapter of rank
``R = min(Σ r_k, d)`` with ``alpha = R`` (scale 1), so checkpoints and the PEFT export hold it exactly.  Round 1
starts every client from the fresh PEFT init (seeded Kaiming A, B = 0), as the code does at t = 0.  The released
code's defect (every client kept rank 8; docs/methods.md §10) is not reproduced: clients really train at their own
ranks.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from fedlora.adapters import A_SUFFIX, B_SUFFIX, ROLE_A, ROLE_B, ROLE_HEAD, Adapter, LoraModule, role_of
from fedlora.lowrank import dense_svd, factored_svd, stack_factors, truncate
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register


def svd_form(module: LoraModule) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vh)`` of a module stored in SVD form (``B = U·diag(S)``, ``A = Vh``, scale 1)."""
    S = module.B.norm(dim=0)
    safe = torch.where(S > 0, S, torch.ones_like(S))
    U = torch.where(S > 0, module.B / safe, torch.zeros_like(module.B))
    return U, S, module.A


def redistribute(module: LoraModule, rank: int, alpha: float, split: str = "B",
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """A client's ``(B, A)`` at ``rank``: the best rank-r approximation of the global ΔW (O13–O15,
    docs/oracles.md); components beyond the stored rank are an orthonormal completion of A (seeded) with zero
    columns of B."""
    U, S, Vh = svd_form(module)
    return truncate(U, S, Vh, rank, alpha / rank, split, seed)


def completion_seed(seed: int, round_idx: int, module: str) -> int:
    """The seed of a module's orthonormal completion in round t (the same for every client of the round)."""
    return int(np.random.SeedSequence([seed, round_idx, zlib.crc32(module.encode()), 67]).generate_state(1)[0])


@register
class FlexLoRA(Method):
    name = "flexlora"
    summary = ("FlexLoRA: heterogeneous ranks; the server takes the SVD of sum_k p_k s_k B_k A_k and sends each "
               "client its best approximation at its own rank.")
    citation = "Bai et al., Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources, NeurIPS 2024"
    heterogeneous_ranks = True
    averages_tensors = False
    streams = True
    config_sections = ("flexlora",)
    minimal_overrides = ('lora.rank_distribution="explicit"', "lora.client_ranks=[2, 4, 8]")

    def init_state(self, initial: Adapter) -> ServerState:
        """Before the first aggregation the global ΔW is zero: kept as a rank-1 adapter with ``B = A = 0`` (clients
        start from their own fresh initialisation in round 1), not as a full adapter at the largest ranks."""
        zero = {n: LoraModule(m.A.new_zeros(1, m.A.shape[1]), m.B.new_zeros(m.B.shape[0], 1), 1.0)
                for n, m in initial.modules.items()}
        return ServerState(Adapter(zero, {k: v.clone() for k, v in initial.head.items()}), {"aggregated": False})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        head = state.adapter.to_flat(self.head_roles())
        plans, downloads = [], {}
        for cid in client_ids:
            ranks = self.spec.client_ranks[cid]
            key = tuple(sorted(ranks.items()))
            if key not in downloads:  # one download per rank configuration, shared by the clients that have it
                download = dict(head)
                if state.extra.get("aggregated"):
                    for name, module in state.adapter.modules.items():
                        B, A = redistribute(module, ranks[name], self.spec.alpha, self.section("flexlora").svd_split,
                                            completion_seed(self.spec.seed, round_idx, name))
                        download[name + B_SUFFIX], download[name + A_SUFFIX] = B, A
                downloads[key] = download
            plans.append(ClientPlan(cid, downloads[key], train=roles, upload=roles, ranks=ranks))
        return plans

    # ---- streaming aggregation: the engine feeds updates one by one and keeps none of their tensors.  The batch
    # ``aggregate`` runs the same three steps, so there is one implementation of the rule.
    def begin(self, round_idx: int, state: ServerState, plans: list[ClientPlan]) -> dict:
        """Per module, a dense accumulator when the round's total rank reaches ``min(d_out, d_in)`` (then the dense
        matrix is the smaller object), else the list of client factors for the exact factored SVD."""
        return self._accumulator({n: sum(p.ranks[n] for p in plans) for n in state.adapter.modules})

    def _accumulator(self, totals: dict[str, int]) -> dict:
        dense = {n: totals[n] >= min(self.spec.shapes[n]) for n in totals}
        return {"dense": dense, "sum": {}, "factors": {n: [] for n in totals}, "head": {}, "n": 0}

    def state_during_round(self, state: ServerState) -> ServerState:
        """:meth:`finish` reads the head and ``extra`` only: the previous ΔW (its SVD, as large as the dense update)
        need not stay in memory while the round's sums grow."""
        return ServerState(Adapter({}, dict(state.adapter.head)), dict(state.extra))

    def accumulate(self, acc: dict, update: Update) -> None:
        """Add ``n_k s_k B_k A_k`` (dense) or keep ``(B_k, A_k, n_k s_k)`` (factored); the head's ``n_k h_k``."""
        n = update.num_examples
        acc["n"] += n
        for name, dense in acc["dense"].items():
            B, A = update.tensors[name + B_SUFFIX], update.tensors[name + A_SUFFIX]
            c = n * self.spec.alpha / A.shape[0]
            if dense:
                if name not in acc["sum"]:
                    acc["sum"][name] = torch.zeros(B.shape[0], A.shape[1], dtype=B.dtype)
                acc["sum"][name].addmm_(B, A, alpha=c)
            else:
                acc["factors"][name].append((B, A, c))
        for key, value in update.tensors.items():
            if role_of(key) == ROLE_HEAD:
                acc["head"][key] = acc["head"].get(key, 0) + n * value.double()

    def finish(self, round_idx: int, state: ServerState, acc: dict) -> ServerState:
        """``ΔW = Σ_k p_k s_k B_k A_k`` (p_k = n_k / Σ n) as its thin SVD, stored with scale 1 (O11, O12, O16)."""
        if acc["n"] == 0:
            return state
        modules = {}
        for name, dense in acc["dense"].items():
            if dense:
                U, S, Vh = dense_svd(acc["sum"].pop(name) / acc["n"])
            else:
                Bs, As, cs = zip(*acc["factors"][name])
                U, S, Vh = factored_svd(*stack_factors(list(Bs), list(As), [c / acc["n"] for c in cs]))
            modules[name] = LoraModule(A=Vh.contiguous(), B=(U * S).contiguous(), alpha=float(S.numel()))
        head = dict(state.adapter.head)
        for key, total in acc["head"].items():
            head[key] = (total / acc["n"]).to(state.adapter.head[key].dtype)
        return ServerState(Adapter(modules, head), {**state.extra, "aggregated": True})

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return state
        totals = {n: sum(u.tensors[n + A_SUFFIX].shape[0] for u in updates) for n in state.adapter.modules}
        acc = self._accumulator(totals)
        for update in updates:
            self.accumulate(acc, update)
        return self.finish(round_idx, state, acc)

"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976; docs/methods.md §12): stacking, merge into the base, fresh LoRA.

Clients train fresh LoRA factors at their own ranks.  The server stacks them, ``B = [B_1|…|B_K]`` and
``A = [p_1 s_1 A_1; …; p_K s_K A_K]``, so that ``B A = Σ_k p_k s_k B_k A_k`` exactly whatever the ranks (oracle
O20, docs/oracles.md); every client merges that product into its frozen base (``W0 ← W0 + B A``) and starts
the next round from a fresh LoRA (Kaiming A, B = 0; O1), drawn independently per client and round (seeded by run
seed, round and client).  The downlink carries the stack, ``Σ_k r_k (d_in + d_out)`` numbers per module, growing
with the number of clients (O30).

Scaling: FLoRA's code sets each client's ``alpha_k = 2·r_k``, so every client, whatever its rank, trains with the
same scale ``s = 2``, and so does the stack.  That is our default (``flora.alpha_per_rank = 2``); the per-client
effective learning rate then does not depend on the rank, as in the paper's runs.  ``flora.alpha_per_rank = 0`` uses
``lora.alpha`` at every rank (``s_k = alpha / r_k``: with α = 16, 8× for r2 and 0.29× for r56).  Either way ``p_k`` and
``s_k`` are folded into the A stack, so aggregation is exact.

Our resolutions: a client that skipped the previous round would have missed merges: it downloads the server's whole
cumulative update (dense) instead of the last stack, and that traffic is counted (FLoRA's code needs every client in
every round).  The stack is in update order (the code's is a Python set's order; the product is the same).  The
server keeps the cumulative merged update densely; it is what is evaluated, and it is exported as exact LoRA factors
(its thin SVD at numerical rank).
"""
from __future__ import annotations

from torch import Tensor

from fedlora.adapters import ROLE_A, ROLE_B, Adapter, LoraModule
from fedlora.lowrank import dense_svd, stack_factors
from fedlora.methods.base import ClientPlan, ServerState, Update, average_head, client_factors, data_weights, register
from fedlora.methods.merged_base import MergesIntoBase


def round_init_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of client k's fresh LoRA init in round t: a different A for every client and round, as FLoRA's code
    gives (each client calls ``get_peft_model`` on its own copy, drawing from the global RNG), but reproducible."""
    return (seed * 1_000_003 + round_idx) * 1_000_033 + client_id


def exact_factors(delta: Tensor, rtol: float = 1e-6) -> LoraModule:
    """``delta`` as LoRA factors of its numerical rank (thin SVD; singular values below ``rtol·σ_max`` dropped),
    scale 1 (``alpha = rank``)."""
    U, S, Vh = dense_svd(delta)
    keep = max(1, int((S > rtol * (S[0] if S.numel() else 0)).sum()))
    return LoraModule(A=Vh[:keep].contiguous(), B=(U[:, :keep] * S[:keep]).contiguous(), alpha=float(keep))


@register
class FLoRA(MergesIntoBase):
    name = "flora"
    summary = ("FLoRA: the server stacks the clients' factors (exact for any ranks); clients merge the stack into "
               "their base and start a fresh LoRA each round.")
    citation = "Wang et al., FLoRA: Federated Fine-Tuning LLMs with Heterogeneous Low-Rank Adaptations, NeurIPS 2024"
    heterogeneous_ranks = True
    averages_tensors = False
    config_sections = ("flora",)
    minimal_overrides = ('lora.rank_distribution="explicit"', "lora.client_ranks=[2, 4, 8]")

    @classmethod
    def alpha_per_rank(cls, cfg) -> float:
        return cfg.flora.alpha_per_rank

    def client_scale(self, rank: int) -> float:
        """``s_k`` of a client of this rank: ``flora.alpha_per_rank`` (α_k = c·r_k), or ``lora.alpha / r_k``."""
        c = self.section("flora").alpha_per_rank
        return c if c > 0 else self.spec.alpha / rank

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"participants": []})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        head = state.adapter.to_flat(self.head_roles())
        return [ClientPlan(cid, dict(head), train=roles, upload=roles,
                           config={"init_seed": round_init_seed(self.spec.seed, round_idx, cid)},
                           ranks=self.spec.client_ranks[cid], merge=self.merge_for(state, cid))
                for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return self.empty_round(state)
        weights = data_weights(updates)
        extra = self.without_stacks(state.extra)
        for name in state.adapter.modules:
            Bs, As = client_factors(updates, name)
            coeffs = [p * self.client_scale(A.shape[0]) for p, A in zip(weights, As)]
            self.add_increment(extra, name, *stack_factors(Bs, As, coeffs))
        extra["participants"] = sorted(u.client_id for u in updates)
        head = {**state.adapter.head, **average_head(state, updates, weights)}
        return ServerState(Adapter({n: m for n, m in state.adapter.modules.items()}, head), extra)

    def export_adapter(self, state: ServerState) -> Adapter:
        offsets = self.base_delta(state)
        if not offsets:
            return state.adapter
        return Adapter({n: exact_factors(d) for n, d in offsets.items()}, dict(state.adapter.head))

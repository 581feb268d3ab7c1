"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025,
arXiv 2502.01755, Algorithm 1): alternate which LoRA factor the federation trains.

Round t (1-based) odd, a *B round*: every client freezes the shared A, trains B (from the global B) and uploads B;
the server sets ``B ← Σ_k p_k B_k``.  Round t even, an *A round*: clients freeze the shared B, train A and upload A;
the server sets ``A ← Σ_k p_k A_k``.  One factor moves per round, so the average is exact,
``B̄A = Σ_k p_k B_k A`` and ``BĀ = Σ_k p_k B A_k`` (oracle tested), and each round's upload is one factor.  A starts
from the shared-seed Kaiming init and B at zero, so round 1 trains B (A at init would make a first A round train
nothing: with B = 0 the gradient of A is zero).

Our choices, against the paper and the first author's research fork (no official code is published; the fork
``shuangyichen/FS-LLM``, branch ``svd``, alternates B first, as here, but by each client's own counter of training
and evaluation calls, which equals the round's parity only with full participation; we alternate by round index):

* **Weights** ``p_k = n_k / Σ n`` (data size), as our FedIT; the paper writes 1/N and the fork weighs by examples
  processed that round (equal for fixed local steps).  Identical on equal shards.
* **Head**: trained and averaged in every round with the factor (``lora.head``), like every method here; the fork
  freezes the classifier at its random init, which our zero-initialised head (docs/methods.md §4b) cannot afford.
* Server optimisers (``server.optimizer``) step along the round's average of the factor it moved; their state is
  per tensor, so B's momentum is only updated in B rounds and A's in A rounds.
* Traffic: the upload is one factor (half of FedIT's for square modules); the download carries both factors, since
  our clients keep nothing between rounds (a client that kept last round's factors would need only the one the
  previous round moved).
"""
from __future__ import annotations

from fedlora.adapters import ROLE_A, ROLE_B
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register


def factor_of_round(round_idx: int) -> str:
    """The role trained in round ``round_idx`` (1-based): B in odd rounds, A in even ones."""
    return ROLE_B if round_idx % 2 == 1 else ROLE_A


@register
class RoLoRA(Method):
    name = "rolora"
    summary = ("RoLoRA: alternate rounds train and average B (A frozen), then A (B frozen); exact, one factor "
               "uploaded per round.")
    citation = "Chen et al., Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA, NeurIPS 2025"
    accepts_server_optimizer = True
    secure_aggregation = True

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({factor_of_round(round_idx)}) | self.head_roles()
        download = state.adapter.to_flat(frozenset({ROLE_A, ROLE_B}) | self.head_roles())
        return [ClientPlan(cid, download, train=roles, upload=roles) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        return self.average(state, updates)

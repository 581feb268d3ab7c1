"""FedIT / FedAvg-LoRA (Zhang et al., 2023; docs/methods.md §2).

Every client starts from the global ``(A, B, head)``, trains all of them and uploads all of them; the server
averages each factor separately with data-size weights: ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``.  The global update
``s·B̄Ā`` is *not* the average of the client updates ``Σ p_k s·B_k A_k`` (oracle O3, docs/oracles.md) — the
inexactness FFA-LoRA and FedEx-LoRA address.
"""
from __future__ import annotations

from fedlora.adapters import ROLE_A, ROLE_B
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register


@register
class FedIT(Method):
    name = "fedit"
    summary = "FedAvg of both LoRA factors (and the head) with data-size weights; homogeneous rank."
    accepts_server_optimizer = True
    secure_aggregation = True
    citation = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, 2023"

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(roles)
        return [ClientPlan(cid, download, train=roles, upload=roles) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        return self.average(state, updates)

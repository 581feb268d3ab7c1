"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025,
arXiv 2505.12805): FFA-LoRA's B-only training, with A re-fitted by the server from the SVD of the global update.

Clients freeze A and train B (and the head) from the global (A, B); under DP-SGD those are what is privatised.  The server
averages ``B̄ = Σ_k p_k B_k`` — exact, as A is shared — and then re-factorises the product:

    U Σ Vᵀ = svd(B̄ A),    A ← V_rᵀ (orthonormal rows),    B ← U_r Σ_r,

which leaves ``B A`` (the model) unchanged, since ``rank(B̄A) ≤ r``, but gives the next round an A whose rows span the
directions the federation has learned, with orthonormal rows (the paper's argument: a better-conditioned A for the
noisy B-only steps under DP).

Our choices, against the authors' code (seanie12/fed-svd, ``server.py`` ``on_round_complete``, ``utils.reinit_lora``):

* As the code: the SVD after every round (``fedsvd.period = 1``; the paper says "periodically"), of the unscaled
  ``B A``, all singular values into B, rank r, data-size weights (the code's default; ``--balanced`` is uniform).
* **Rank-deficient B̄A** (round 1 from B = 0 on a client that sat out, or r > rank): the SVD's trailing right singular
  vectors are any orthonormal completion; we keep whatever the SVD returns, as the code does (it runs a float32 GPU SVD) — B's matching columns are zero,
  so the product is still exact.
* **Head**: the code freezes the classifier at its random init (inherited from its FFA-LoRA baseline); here the head
  is trained and averaged (``lora.head``), as for every method, since our zero-initialised head (docs/methods.md §4b)
  must train.
* Traffic: A changes every round, so unlike FFA-LoRA the download carries A and B (the upload is B only).
* Robust rules (``robust.*``) may wrap it: the median of the B's with the one shared A is still exact before the
  re-factorisation.  Server optimisers are refused: each round's SVD re-parameterises B, so a moment kept in B's
  coordinates would point the wrong way.
"""
from __future__ import annotations

import torch

from fedlora.adapters import ROLE_A, ROLE_B, Adapter, LoraModule
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register


def refactorise(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r Σ_r, V_rᵀ)`` of ``B A`` at the rank of A, computed in float64, returned in the factors' dtypes."""
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return (U[:, :r] * S[:r]).to(B.dtype).contiguous(), Vh[:r].to(A.dtype).contiguous()


@register
class FedSVD(Method):
    name = "fedsvd"
    summary = ("FedSVD: clients train B only (A frozen); the server averages B, then re-factorises B*A by SVD: "
               "A <- top-r right singular vectors, B <- U*Sigma.")
    citation = "Lee et al., FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA, NeurIPS 2025"
    config_sections = ("fedsvd",)
    own_server_step = "an SVD re-factorisation after the average"

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(frozenset({ROLE_A, ROLE_B}) | self.head_roles())
        return [ClientPlan(cid, download, train=roles, upload=roles) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        averaged = self.average(state, updates)
        period = self.section("fedsvd").period
        if not updates or period == 0 or round_idx % period:
            return averaged
        modules = {}
        for name, m in averaged.adapter.modules.items():
            B, A = refactorise(m.B, m.A)
            modules[name] = LoraModule(A, B, m.alpha)
        return ServerState(Adapter(modules, dict(averaged.adapter.head)), averaged.extra)

"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma; arXiv 2410.09432, NAACL 2025): FedIT plus the exact residual in the base.

Clients train A, B (and the head) from the global adapter, as in FedIT.  The server averages the factors,
``Ā = Σ_k p_k A_k``, ``B̄ = Σ_k p_k B_k``, and folds what the average of products and the product of averages miss
into the frozen base weight (the paper's Eq. for ``W0``):

    W0 ← W0 + s·(Σ_k p_k B_k A_k − B̄ Ā),        s = alpha / r,

so the global model ``W0 + s·B̄Ā`` is exactly ``W0_old + s·Σ_k p_k B_k A_k`` (oracle: tested against a hand
computation in float64).  The residual accumulates over rounds; the adapters keep the averages (no reset).

Our choices, against the authors' code (RaghavSinghal10/fedex-lora, ``fed_agg.py::aggregate_models_ours``):

* **No transpose.** The code adds the *transpose* of the scaled residual to ``base_layer.weight``; that is right for
  GPT-2's ``Conv1D`` (weights stored d_in × d_out) but not for ``nn.Linear`` (d_out × d_in, the layout of ``B A``): on
  RoBERTa's square q/v it silently adds ``s·Rᵀ`` (inexact), on a non-square layer it fails.  We add ``s·R``.
* **Weights** ``p_k = n_k / Σ n`` (data size) in all three averages, as our FedIT; the code averages uniformly (1/K).
  The rule is exact for any weights summing to 1, and identical on equal shards.
* **Traffic.** The code simulates one machine and never sends the residual; a real client must hold the base the
  server evaluates.  A client that took part in the previous round downloads that round's residual and adds it to its
  base; a client that missed rounds downloads the whole dense offset (:mod:`fedlora.methods.merged_base`, as FLoRA);
  both are counted as downlink bytes.  ``fedex.residual = "dense"`` (default) sends the residual as one d_out × d_in
  matrix per module: it shows only the aggregate, as FedIT's averages do.  ``"factors"`` sends it as the low-rank
  stack ``[p_1 s B_1 | … | p_K s B_K | −s B̄] · [A_1; …; A_K; Ā]`` (rank ≤ (K+1)·r) while that is smaller than the
  dense matrix, i.e. while (K+1)·r·(d_in + d_out) < d_in·d_out, but it shows each participant's own scaled factors to
  the next round's clients (under DP-SGD those are already privatised).
* Every sampled client trains and only the round's participants form the residual (the code has every client take
  part in every round); the head is averaged with the same data-size weights (the code: uniformly).
* The export is one PEFT adapter holding the whole learned update ``offset + s·B̄Ā`` as exact factors (thin SVD at
  numerical rank), as for FLoRA.
"""
from __future__ import annotations

import torch

from fedlora.adapters import ROLE_A, ROLE_B, Adapter
from fedlora.methods.base import ClientPlan, ServerState, Update, client_factors, data_weights, register
from fedlora.methods.flora import exact_factors
from fedlora.methods.merged_base import MergesIntoBase


@register
class FedExLoRA(MergesIntoBase):
    name = "fedex"
    summary = ("FedEx-LoRA: FedIT's averages of A and B, plus the residual sum_k p_k B_k A_k - mean(B) mean(A) "
               "folded into the frozen base each round (exact aggregation).")
    citation = "Singhal, Ponkshe, Vepakomma, FedEx-LoRA: Exact Aggregation for Federated Parameter-Efficient " \
               "Fine-Tuning of Foundation Models, NAACL 2025 (arXiv 2410.09432)"
    averages_tensors = False  # the residual needs the data-weighted products; a median has no exact residual
    own_server_step = "the residual is the exact remainder of the data-weighted mean"
    config_sections = ("fedex",)

    @property
    def increment_form(self) -> str:
        return "dense" if self.section("fedex").residual == "dense" else "smaller"

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"participants": []})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(roles)
        return [ClientPlan(cid, download, train=roles, upload=roles, merge=self.merge_for(state, cid))
                for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return self.empty_round(state)
        weights = data_weights(updates)
        averaged = self.average(state, updates)  # Ā, B̄ and the head, data-weighted
        extra = self.without_stacks(state.extra)
        for name, module in averaged.adapter.modules.items():
            Bs, As = client_factors(updates, name)
            s = module.scale
            B_stack = torch.cat([(p * s) * B for p, B in zip(weights, Bs)] + [-s * module.B], dim=1)
            A_stack = torch.cat(As + [module.A], dim=0)
            self.add_increment(extra, name, B_stack, A_stack)
        extra["participants"] = sorted(u.client_id for u in updates)
        return ServerState(averaged.adapter, extra)

    def export_adapter(self, state: ServerState) -> Adapter:
        offsets = self.base_delta(state) or {}
        modules = {n: exact_factors(offsets[n] + m.scale * (m.B @ m.A) if n in offsets else m.scale * (m.B @ m.A))
                   for n, m in state.adapter.modules.items()}
        return Adapter(modules, dict(state.adapter.head))

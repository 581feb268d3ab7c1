"""LoRA-FAIR (Bian, Wang, Zhang, Xu; "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv 2411.14961): FedIT's averages, with B refined so that the product of the averages
points where the average of the products does.

Clients train A, B (and the head) from the global adapter, as in FedIT.  The server forms ``Ā = Σ_k p_k A_k``,
``B̄ = Σ_k p_k B_k`` and the ideal update ``ΔW = Σ_k p_k B_k A_k``, and finds a residual ``ΔB`` (the paper's
aggregation refinement, Eq. 8):

    ΔB = argmin  (1 − mean_j cos(ΔW_{:,j}, ((B̄ + ΔB) Ā)_{:,j}))  +  λ ‖ΔB‖²_F,

by plain gradient descent on the server; the next round starts from ``(Ā, B̄ + ΔB)`` (the initialisation refinement:
every client restarts from the refined average, not from its own factors).  Only B is corrected (the paper's ablation:
correcting B beats correcting A or both); the head is averaged.

Our choices (the authors' repository ``jmbian/LoRA-FAIR`` could not be read; the rule follows the paper and the code of
a project derived from it, ``DASS-Lab-Group/SpecTraL``, ``server.py:_optimize_delta_lora_B``):

* As that code: a cosine per input column (over the output axis), averaged; ΔW without the LoRA scale (the same for
  every client at one rank); all modules as one problem (their losses summed, :func:`refine_bs`) solved by plain SGD
  (``lorafair.lr = 0.01``), at most ``lorafair.steps = 1000`` iterations, stopping when the summed loss changes by
  less than 1e-6 in 5 consecutive iterations; data-size weights, for the head too.
* **ΔB starts at zero**, not from Xavier noise as in the derived code: with the paper's ``λ = 0.01`` a random start
  barely decays in 1,000 steps (each multiplies it by 1 − 2·lr·λ), so the refined B would be mostly noise; from zero
  the refinement moves only where the cosine asks.  (The derived code defaults to λ = 1.)
* λ = 0.01 (the paper's value; ``lorafair.lambda_reg``).
* The refinement runs in float64 on the server (a few seconds a round for MiniLM's 12 modules).  At λ = 0.01 the
  descent on the scale-free cosine amplifies rounding: a relative change of 1e-15 in ΔW moves ΔB by ~0.04 (of ~0.8)
  after 1,000 steps on a 4×3 example, so LoRA-FAIR's refined B is reproducible for identical arithmetic only (our
  runs are: same code, same thread count); the cosine it reaches is what is stable.
"""
from __future__ import annotations

import torch

from fedlora.adapters import ROLE_A, ROLE_B, Adapter, LoraModule
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, client_factors, data_weights, register


def refine_b(target: torch.Tensor, B: torch.Tensor, A: torch.Tensor, lambda_reg: float, lr: float, steps: int,
             patience: int = 5, tol: float = 1e-6, start: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔB`` minimising ``1 − mean column-cosine(target, (B + ΔB) A) + λ‖ΔB‖²`` for one module (see
    :func:`refine_bs`)."""
    return refine_bs([target], [B], [A], lambda_reg, lr, steps, patience, tol,
                     None if start is None else [start])[0]


def refine_bs(targets: list[torch.Tensor], Bs: list[torch.Tensor], As: list[torch.Tensor], lambda_reg: float,
              lr: float, steps: int, patience: int = 5, tol: float = 1e-6,
              starts: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every module's ``ΔB`` as one problem, as the derived code solves it: the modules' losses summed, plain SGD from
    ``starts`` (zero), float64, stopping after ``patience`` consecutive iterations whose summed loss moved less than
    ``tol``.  The terms are separable, so each step is each module's own; only the stop is shared."""
    targets = [t.double() for t in targets]
    Bs, As = [b.double() for b in Bs], [a.double() for a in As]
    deltas = [(s.double().clone() if s is not None else torch.zeros_like(b)).requires_grad_(True)
              for s, b in zip(starts or [None] * len(Bs), Bs)]
    opt = torch.optim.SGD(deltas, lr=lr)
    previous, quiet = None, 0
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((1 - torch.nn.functional.cosine_similarity(t, (b + d) @ a, dim=0).mean())
                   + lambda_reg * (d ** 2).sum() for t, b, a, d in zip(targets, Bs, As, deltas))
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if previous is not None and abs(previous - value) < tol:
            quiet += 1
            if quiet >= patience:
                break
        else:
            quiet, previous = 0, value
    return [d.detach() for d in deltas]


@register
class LoRAFAIR(Method):
    name = "lorafair"
    summary = ("LoRA-FAIR: FedIT's averages, with the server refining B so that (mean B + dB) mean A points like "
               "sum_k p_k B_k A_k (cosine + lambda ||dB||^2); clients restart from the refined pair.")
    citation = "Bian et al., LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement, " \
               "ICCV 2025"
    config_sections = ("lorafair",)
    averages_tensors = False  # the refinement needs the data-weighted products
    own_server_step = "the refinement of B is its server step"

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_A, ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(roles)
        return [ClientPlan(cid, download, train=roles, upload=roles) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        if not updates:
            return state
        averaged = self.average(state, updates)
        weights = data_weights(updates)
        opts = self.section("lorafair")
        names, targets = list(averaged.adapter.modules), []
        for name in names:
            Bs, As = client_factors(updates, name)
            targets.append(sum(p * (B.double() @ A.double()) for p, B, A in zip(weights, Bs, As)))
        mods = averaged.adapter.modules
        deltas = refine_bs(targets, [mods[n].B for n in names], [mods[n].A for n in names], opts.lambda_reg, opts.lr,
                           opts.steps)
        modules = {n: LoraModule(mods[n].A, (mods[n].B.double() + d).to(mods[n].B.dtype), mods[n].alpha)
                   for n, d in zip(names, deltas)}
        return ServerState(Adapter(modules, dict(averaged.adapter.head)), averaged.extra)

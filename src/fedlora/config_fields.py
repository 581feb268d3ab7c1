"""The field helper of every config section, and the sections the methods own (``[pilot]``, ``[flexlora]``,
``[hetlora]``, ``[flora]``): each method receives only its own (``Method.config_sections``).  Plain dataclasses,
importing no method, so :mod:`fedlora.config` can gather them without importing the methods."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})



@dataclass
class PilotConfig:
    ig_examples: int = _f(32, "Examples per client for the IG-Score gradient norms.")
    score_mix: float = _f(0.5, "lambda: weight of the global IG-Score in the combined score.")
    score_decay: float = _f(0.9, "beta: moving-average decay of the server's global IG-Score.")
    momentum_share: float = _f(0.5, "kappa: share of the temporal momentum in the STAgg step "
                               "(theta += eta_g*[(1-kappa)*w*mean_update + kappa*momentum]); 0 = spatial only, which "
                               "with every client training every layer is FedAvg.")
    momentum_decay: float = _f(0.5, "gamma: decay of the per-layer momentum H <- gamma*H + (1-gamma)*mean_update.")
    momentum_bias_correction: bool = _f(True, "Divide the momentum by (1 - gamma^t) in the step, t = momentum updates "
                                        "so far (as in Adam), so round 1 of a fully covered layer steps exactly "
                                        "FedAvg's update; false = the uncorrected momentum (round 1 steps "
                                        "(1 - kappa*gamma) x FedAvg).")
    dwa_max: float = _f(3.0, "w_max: cap of the dynamic weight w = min(1/coverage, w_max) of an under-covered layer "
                        "(coverage = share of the round's clients that trained it); 1 = no boost.")
    dwa: bool = _f(True, "Dynamic weight adjustment: a layer trained by a share rho of the round's clients gets "
                   "w = min(1/rho, dwa_max), not renormalised (fully covered layers and the head keep w = 1); false "
                   "= w = 1 for every trained layer (spatial-temporal only).")
    server_lr: float = _f(1.0, "eta_g: server step size.")


@dataclass
class FlexLoraConfig:
    svd_split: str = _f("B", "How singular values are split when truncating: 'B' (all into B, the official code) or "
                        "'sqrt' (sqrt into each factor).", choices=("B", "sqrt"))


@dataclass
class HetLoraConfig:
    weighting: str = _f("sparsity", "Aggregation weights: 'sparsity' (proportional to ||B_k A_k||_F, the paper) or "
                        "'data' (data size, FlexLoRA's baseline).", choices=("sparsity", "data"))
    penalty: float = _f(1e-3, "Rank self-pruning regulariser weight lambda.")
    gamma: float = _f(0.99, "Rank decay gamma: the tail beyond floor(gamma*r) is penalised and pruned when it shrinks.")
    prune: bool = _f(True, "Let clients drop the tail (r <- floor(gamma*r)) when its norm shrank in a round.")
    uncovered: str = _f("keep", "A rank index no client of the round covers: 'keep' its previous row of A and column "
                        "of B (so no component dies), or 'zero' it (plain zero-padding, which no later client can "
                        "revive).", choices=("keep", "zero"))


@dataclass
class FloraConfig:
    alpha_per_rank: float = _f(2.0, "FLoRA's scaling convention: alpha_k = alpha_per_rank * r_k, so every client and "
                               "the stack share s = alpha_per_rank (FLoRA's code: 2); 0 = use lora.alpha for every "
                               "rank (s_k = lora.alpha / r_k).")


@dataclass
class FedSVDConfig:
    period: int = _f(1, "Re-factorise B*A by SVD after every `period` rounds (the authors' code: 1, every round); "
                     "0 = never (then FedSVD is FFA-LoRA with the server's A).")

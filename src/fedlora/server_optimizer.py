"""Server optimisers on the averaged update (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2;
Hsu et al., 2019, FedAvgM).

For a method whose aggregate is an average of uploaded tensors, the round's *update* is ``Δ_t = x̄_t − x_t`` (the
average the method computed minus the global value the clients started from; the paper's pseudo-gradient is −Δ_t),
and the server takes a step along it instead of adopting ``x̄_t`` outright:

* ``fedavg``:     ``x_{t+1} = x_t + η Δ_t``  (η = 1 is plain FedAvg, the default, bit-identical to no optimiser)
* ``fedavgm``:    ``v_t = β v_{t−1} + Δ_t``, ``x_{t+1} = x_t + η v_t``  (Hsu et al., 2019, Alg. 1; Flower's FedAvgM)
* ``fedadagrad``: ``v_t = v_{t−1} + Δ_t²``
* ``fedadam``:    ``v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²``
* ``fedyogi``:    ``v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)``
  and for the three adaptive ones ``m_t = β₁ m_{t−1} + (1 − β₁) Δ_t``, ``x_{t+1} = x_t + η m_t / (√v_t + τ)``.

Choices (docs/methods.md §7c): as in Reddi et al.'s Algorithm 2, ``m_{−1} = 0``, ``v_{−1} = τ²``, no bias correction
and β₁ for FedAdagrad too (Flower's FedAdam adds a bias correction and its FedAdagrad sets β₁ = 0; the authors' own
code uses bias-corrected Keras-style optimisers); τ = ``server.eps`` defaults to 1e-3, the value the paper's
experiments use most.  x̄ is the method's data-weighted average (the paper averages uniformly over sampled clients).  ``server.lr = 0`` means the optimiser's usual step: 1 for fedavg/fedavgm, 1e-2 for
the adaptive ones.  The moments are per tensor and live in the server state (so they are checkpointed and an
interrupted run resumes exactly); a tensor no client uploaded in a round is left as it is, its moments too.
Arithmetic is in float64, results are cast back to each tensor's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
_VELOCITY, _MOMENTUM, _SECOND = "server_opt/velocity/", "server_opt/m/", "server_opt/v/"


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimiser with its hyperparameters (``server.*`` in the configuration)."""

    name: str = "fedavg"
    lr: float = 0.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3

    @property
    def step_size(self) -> float:
        """η: ``lr``, or the optimiser's usual step when ``lr`` is 0."""
        if self.lr > 0:
            return self.lr
        return 1e-2 if self.name in ADAPTIVE else 1.0

    @property
    def is_identity(self) -> bool:
        """True when the step is plain FedAvg (the new global value is the average itself)."""
        return self.name == "fedavg" and self.step_size == 1.0

    @classmethod
    def from_config(cls, server: Any) -> "ServerOptimizer":
        """From a ``server`` config section (or None, which gives plain FedAvg)."""
        if server is None:
            return cls()
        return cls(server.optimizer, server.lr, server.momentum, server.beta1, server.beta2, server.eps)


def server_step(opt: ServerOptimizer, current: dict[str, Tensor], averaged: dict[str, Tensor],
                extra: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The new global tensors for the keys of ``averaged``, and the server state's ``extra`` with updated moments.

    ``current`` holds the global tensors the round started from; ``extra`` is not modified (a new dict is returned).
    """
    if opt.is_identity:
        return dict(averaged), extra
    eta = opt.step_size
    out: dict[str, Tensor] = {}
    extra = dict(extra)
    for key, avg in averaged.items():
        x = current[key].to(torch.float64)
        delta = avg.to(torch.float64) - x
        if opt.name == "fedavg":
            step = delta
        elif opt.name == "fedavgm":
            v = extra.get(_VELOCITY + key)
            v = delta if v is None else opt.momentum * v.to(torch.float64) + delta
            extra[_VELOCITY + key] = v
            step = v
        else:
            m = extra.get(_MOMENTUM + key)
            m = torch.zeros_like(delta) if m is None else m.to(torch.float64)
            v = extra.get(_SECOND + key)
            v = torch.full_like(delta, opt.eps ** 2) if v is None else v.to(torch.float64)
            m = opt.beta1 * m + (1 - opt.beta1) * delta
            sq = delta * delta
            if opt.name == "fedadagrad":
                v = v + sq
            elif opt.name == "fedadam":
                v = opt.beta2 * v + (1 - opt.beta2) * sq
            elif opt.name == "fedyogi":
                v = v - (1 - opt.beta2) * sq * torch.sign(v - sq)
            else:
                raise ValueError(f"unknown server optimizer {opt.name!r}; one of {', '.join(OPTIMIZERS)}")
            extra[_MOMENTUM + key], extra[_SECOND + key] = m, v
            step = m / (v.sqrt() + opt.eps)
        out[key] = (x + eta * step).to(avg.dtype)
    return out, extra

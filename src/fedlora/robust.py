"""Robustness around aggregation (DESIGN.md: wrappers, not branches inside methods).

* :func:`bound_norm` — norm bounding: scale a client's update ``Δ = uploaded − sent`` so ``‖Δ‖₂ ≤ bound`` over all of
  its tensors (Sun et al., 2019, "Can you really backdoor federated learning?").
* :func:`combine` — the coordinate-wise rule a method uses to merge the tensors it averages: ``mean`` (data-weighted
  FedAvg), ``median`` (coordinate-wise median) or ``trimmed_mean`` (drop the ⌊β·K⌋ largest and smallest values per
  coordinate, average the rest).  The robust rules are unweighted: a client's data size is its own claim.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RULES = ("mean", "median", "trimmed_mean")


def bound_norm(uploaded: dict[str, Tensor], reference: dict[str, Tensor], bound: float) -> tuple[dict[str, Tensor], float]:
    """``reference + Δ·min(1, bound/‖Δ‖)`` per key; returns the bounded tensors and the original ‖Δ‖."""
    norm = math.sqrt(sum(float(((uploaded[k].double() - reference[k].double()) ** 2).sum()) for k in uploaded))
    if bound <= 0 or norm <= bound:
        return uploaded, norm
    factor = bound / norm
    return {k: (reference[k].double() + (uploaded[k].double() - reference[k].double()) * factor).to(uploaded[k].dtype)
            for k in uploaded}, norm


def combine(tensors: list[Tensor], weights: list[float], rule: str = "mean", trim_fraction: float = 0.1) -> Tensor:
    """Merge one tensor across clients by ``rule`` (see module docstring); float64 inside, input dtype out."""
    if rule == "mean":
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for t, w in zip(tensors, weights):
            acc.add_(t.to(torch.float64), alpha=w)
        return acc.to(tensors[0].dtype)
    stack = torch.stack([t.to(torch.float64) for t in tensors])
    if rule == "median":
        return torch.quantile(stack.flatten(1), 0.5, dim=0).reshape(tensors[0].shape).to(tensors[0].dtype)
    if rule == "trimmed_mean":
        k = int(math.floor(trim_fraction * len(tensors)))
        if 2 * k >= len(tensors):
            k = (len(tensors) - 1) // 2
        ordered = stack.sort(dim=0).values
        return ordered[k: len(tensors) - k].mean(dim=0).to(tensors[0].dtype)
    raise ValueError(f"unknown aggregation rule {rule!r}; one of {', '.join(RULES)}")

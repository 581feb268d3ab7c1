"""Robustness around aggregation (docs/architecture.md: wrappers, not branches inside methods).

:class:`RobustAggregation` wraps a method the way Flower's robust and DP strategies wrap an inner strategy: the
method stays as written, and the wrapper (made by :func:`with_robust` from the ``robust`` config section) bounds each
accepted upload's norm before the method sees it and makes the method's tensor average use a robust rule.  Only
methods whose aggregate is a per-tensor average (``Method.averages_tensors``) can be wrapped; the others are refused
before any work starts (the engine's option check).

* :func:`bound_norm` — norm bounding: scale a client's update ``Δ = uploaded − sent`` so ``‖Δ‖₂ ≤ bound`` over all of
  its tensors (Sun et al., 2019, "Can you really backdoor federated learning?").
* :func:`combine` — the coordinate-wise rule a method uses to merge the tensors it averages: ``mean`` (data-weighted
  FedAvg), ``median`` (coordinate-wise median) or ``trimmed_mean`` (drop the ⌊β·K⌋ largest and smallest values per
  coordinate, average the rest).  The robust rules are unweighted: a client's data size is its own claim.
"""
from __future__ import annotations

import math
from typing import Callable

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


def robust_rule(robust) -> Callable[[list[Tensor], list[float]], Tensor]:
    """The per-tensor merge of a ``robust`` section: ``combine`` with its rule and trim fraction."""
    rule, trim = robust.aggregation, robust.trim_fraction
    return lambda tensors, weights: combine(tensors, weights, rule, trim)


def is_plain(robust) -> bool:
    """True when a ``robust`` section changes nothing (data-weighted mean, no norm bound)."""
    return robust is None or (robust.aggregation == "mean" and robust.norm_bound <= 0)


class RobustAggregation:
    """A method with robust aggregation around it (Flower's ``FedMedian``/``FedTrimmedAvg`` and its server-side
    clipping wrapper, as one wrapper over any averaging method).

    * :meth:`admit` — on the server, each accepted upload: ``Δ = uploaded − sent`` scaled to ``‖Δ‖₂ ≤ bound``
      (``robust.norm_bound``; the reference is what the client started from: the plan's download over the
      shared-seed initial adapter at the client's ranks), returning the tensors kept and ``‖Δ‖`` before bounding.
    * the inner method's tensor average (:meth:`fedlora.methods.base.Method.average`) merges each tensor with
      ``robust.aggregation`` (coordinate-wise median or trimmed mean; unweighted) instead of the data-weighted mean.

    Every other attribute — the plans, the client-side hooks, streaming, export — is the inner method's.
    """

    def __init__(self, inner, robust):
        if not inner.averages_tensors:
            raise ValueError(f"method {inner.name!r} does not average tensors; robust rules cannot wrap it")
        self.inner = inner
        self.robust = robust
        inner.merge_tensor = robust_rule(robust)  # the seam of Method.average: one tensor across clients

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def admit(self, plan, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], float | None]:
        bound = self.robust.norm_bound
        if bound <= 0:
            return tensors, None
        reference = {k: plan.download[k] for k in tensors if k in plan.download}
        if len(reference) < len(tensors):  # tensors not sent this round start from the shared-seed initial adapter
            spec = self.inner.spec
            start = spec.initial(ranks=spec.ranks_of(plan), seed=plan.config.get("init_seed"))
            reference = plan.uploaded(start.with_tensors(plan.download))
        return bound_norm(tensors, reference, bound)


def with_robust(method, robust):
    """``method`` itself when ``robust`` changes nothing, else the method inside :class:`RobustAggregation`."""
    return method if is_plain(robust) else RobustAggregation(method, robust)

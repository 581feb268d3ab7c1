"""FedRA (Su et al., arXiv 2311.11227; algorithms.md §4.7) and the "top-k layers that fit" baseline, under the same
memory budgets as Fed-piLot.

* ``fedra``: every round each client trains a *random* set of layers: the layers in a random order (seeded by round
  and client), each added when the set's predicted memory still fits the client's budget.
* ``topk``: each client trains the last layers, from the top block down, as many as fit (the cheapest by position:
  they need the shortest backpropagation).

Both aggregate each LoRA tensor over the clients that trained it (Fed-piLot's spatial part, no momentum, no dynamic
weights; oracle O28).  ``memory.smallest_for_all = true`` turns either into the "everyone trains only what the
smallest client can" baseline.
"""
from __future__ import annotations

import numpy as np

from fedlora.methods.base import register
from fedlora.methods.pilot import LayerAssignment, fit_layers


@register
class FedRA(LayerAssignment):
    name = "fedra"
    summary = "FedRA: each client trains a random set of LoRA layers that fits its memory budget, every round."
    citation = "Su et al., FedRA: A Random Allocation Strategy for Federated Tuning, 2023"

    def choose(self, round_idx, state, cid):
        n = len(self.spec.layer_groups)
        order = [int(j) for j in np.random.default_rng([self.spec.seed, round_idx, cid, 53]).permutation(n)]
        budget, mm = self._budget(cid), self.spec.memory
        chosen: list[int] = []
        for j in order:  # each layer in random order joins if the set still fits (a misfit is skipped, not a stop)
            if mm.predict(chosen + [j]) <= budget:
                chosen.append(j)
        return sorted(chosen), {}


@register
class TopK(LayerAssignment):
    name = "topk"
    summary = "Top-k baseline: each client trains the last LoRA layers that fit its memory budget."

    def choose(self, round_idx, state, cid):
        n = len(self.spec.layer_groups)
        return fit_layers(self.spec, self._budget(cid), order=list(reversed(range(n))),
                          position_aware=self.cfg.memory.position_aware), {}

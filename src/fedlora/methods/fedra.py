"""FedRA (a sub-model method), the random-k and top-k layer baselines, under the same memory budgets as Fed-piLot.

* ``fedra`` — FedRA (Su, Li, Xue, "FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the Power of
  Heterogeneous Clients", ECCV 2024, arXiv 2311.11227; official code https://github.com/leondada/FedRA, files
  ``main.py``, ``server.py`` (``get_para_range``, ``agg_range_fill``), ``client.py``).  Every round a random
  allocation matrix gives each client a random subset of the transformer blocks; the client trains the *sub-model*
  made of those blocks alone: the blocks it did not draw are left out of its forward and backward passes (the hidden
  state goes straight from one drawn block to the next; :func:`fedlora.layers.submodel`), which is why its memory per
  block is small.  The server averages each block's LoRA over the clients that had it; a block nobody had keeps its
  value.  Evaluation and the global model use the full-depth model.
* ``randk`` — random blocks trained *inside the full-depth model*: every block still runs forward and backpropagation
  reaches the earliest trained block (what ``fedra`` was before it became a sub-model method).  Each round, the
  blocks in a random order (seeded by round and client), each added when the set's predicted memory still fits the
  client's budget (a misfit is skipped, not a stop), with the cost model pilot and topk share: the paper's additive
  costs by default, the exact full-depth memory with ``memory.position_aware = true`` (exactly the old rule).
* ``topk`` — each client trains the last blocks, from the top down, as many as fit (the cheapest by position: they
  need the shortest backpropagation).

All three aggregate each LoRA tensor over the clients that trained it (Fed-piLot's spatial part, no momentum, no
dynamic weights; oracle O28, docs/oracles.md).  ``memory.smallest_for_all = true`` turns any of them into the
"everyone trains only what the smallest client can" baseline.

**FedRA here.**  Client k's row of round t's allocation matrix is a random order of the blocks (numpy generator seeded
by ``(seed, t, k, 53)``, the same order ``randk`` uses), each block taken while the *sub-model's* predicted memory
``M_sub(S) = M_step + Σ_{j∈S} (G_j + a_j)`` (:meth:`fedlora.memory.MemoryModel.predict_submodel`) fits the budget.
The plan carries ``{"submodel": True}``; the client (:meth:`FedRA.training_scope`) trains under
``submodel(model, layers)`` and reports that prediction.  Only the drawn blocks' LoRA (and the head) is downloaded.

**Why ``randk`` is not FedRA.**  At full depth a set whose earliest block is e pays the activations of every block
from e up, so when activations dominate (MiniLM at batch 16: 33 MB per block against 0.15 MB of LoRA gradients and
AdamW state) the budget only affords sets near the top: with equal block costs ``randk`` ends with the top blocks,
like ``topk`` (measured on examples/pilot_glue.toml: {5}, {3,4,5}, all six, every round).  FedRA's sub-model pays
only for the blocks it draws, so as many blocks come from the whole depth.

**Where ours differs from the official code, and why.**

1. *How many blocks a client gets.*  Theirs: a fixed number of layers per client, its "capacity" (``--net_type``,
   e.g. 12, 10, 8, 6, 4, 3 of ViT-B's 12 blocks).  Ours: as many as the client's memory budget allows on the
   sub-model memory model, so FedRA is compared with Fed-piLot, ``randk`` and ``topk`` under the same budgets.  When
   every block costs the same (same LoRA shapes, as in MiniLM or SmolLM2) the greedy rule over a uniform random
   order draws exactly k uniformly random blocks, k = ⌊(budget − M_step)/(G + a)⌋: their
   ``np.random.choice(L, k, replace=False)``; with unequal costs it is the natural generalisation.
2. *The allocation matrix.*  Theirs is redrawn every round from numpy's global generator, for every client (sampled
   or not), rows independent.  Ours draws each row from its own generator seeded by (seed, round, client), so a
   client's blocks do not depend on which other clients were sampled or on the engine (simulation, Flower), and a
   run is reproducible.  Neither guarantees that every block is drawn by someone (their loop that redraws rows until
   every layer is covered is commented out in ``server.py``); a block nobody drew keeps its global value.
3. *What "layer" and "adapter" mean.*  Theirs: a ViT-B/16 (or MLP-Mixer) block, LoRA r=8, α=8, dropout 0.1 on
   ``attn.proj`` and ``mlp.fc2``; the LoRA of the patch embedding, the classifier head (and prompt tokens, none in
   their runs) are trained by every client; the final norm is sent and averaged but frozen.  Ours: one layer = the
   LoRA modules of one transformer block of a text model (``lora.target_modules``, e.g. MiniLM's query/value, r and
   α from the config); every LoRA module must be inside a block; the head is trained by everyone when ``lora.head =
   "aggregate"``.
4. *Building the sub-model.*  Theirs builds a shallower model of depth k and copies the drawn blocks' whole state
   (frozen weights and LoRA) into positions 0..k−1, in ascending order.  Ours swaps the block ``nn.ModuleList`` of
   the one loaded model for the drawn blocks, in ascending order, during local training and puts it back after: the
   same computation.  A LLaMA block keeps its full-depth ``layer_idx``, which only the key/value cache reads (the
   cache is indexed by it, so it stays consistent; SmolLM2's sub-model logits equal those of a shallower re-indexed
   copy, with the cache on or off).
5. *What travels and what the budget counts.*  Theirs sends a client the drawn blocks' frozen weights too.  Ours
   assumes every client holds the foundation model and sends only the drawn blocks' LoRA (and the head); memory is
   counted above the loaded model (training memory: gradients, optimiser state, activations), so the saving of not
   holding the skipped blocks' frozen weights is not credited to FedRA.
6. *Aggregation.*  Theirs: the plain (unweighted) mean of each block's LoRA A and B over the clients that had it,
   the head over all sampled clients.  Ours: the data-size-weighted mean (``LayerAssignment.aggregate``, STAgg's
   spatial part); the same when clients hold equally many examples.  A and B are averaged separately in both.
7. *Local training and sampling.*  Theirs: SGD (momentum 0.9, constant lr 0.01 — its cosine schedule is commented
   out —, weight decay 1e-5, gradient-norm clip 10, batch 128, 100 or 150 rounds), one epoch capped at the smallest
   client's number of batches (plus one: its loop breaks after ``i > mmm``), one client per domain each round.
   Ours: the config's ``[train]`` settings and ``clients.fraction``, the same for every method.
8. *Who gets which capacity.*  Theirs ties capacity to the domain (clipart 12, infograph 10, painting 8, quickdraw
   6, real 4, sketch 3 layers), so capacity lines up with the data shift.  Ours: ``memory.budgets`` assigned to
   clients in turn (client k gets ``budgets[k % len]``), independent of their data.
9. *Unequal block costs.*  With blocks of different costs the greedy draw over a random order (a misfit skipped)
   picks cheaper blocks more often than dearer ones; with equal costs (every model we ship) it is uniform.
10. *Official quirks not copied.*  Their patch-embedding LoRA is averaged only in rounds where client 0 was sampled
    (``server.py``), and a block nobody drew has ``fc2.lora_A`` written twice and ``fc2.lora_B`` not at all (harmless
    under ``strict=False``).  They evaluate the global model per domain at a few rounds; we evaluate every
    ``eval.every`` rounds on the validation set (and each client's local split).
11. *A client whose budget fits no block* sits the round out here (their smallest client has 3 layers, so the case
    never arises there); it would otherwise train the head on a model of no block.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from fedlora.layers import submodel
from fedlora.methods.base import register
from fedlora.methods.pilot import LayerAssignment, fit_layers


def random_order(seed: int, round_idx: int, cid: int, n: int) -> list[int]:
    """The blocks 0..n-1 in client ``cid``'s random order for round ``round_idx`` (its allocation-matrix row)."""
    return [int(j) for j in np.random.default_rng([seed, round_idx, cid, 53]).permutation(n)]


def take_while_fits(order: list[int], cost, budget: float) -> list[int]:
    """Each block of ``order`` in turn joins the set if ``cost(set + [block]) <= budget`` (a misfit is skipped, not
    a stop); the chosen blocks, sorted."""
    chosen: list[int] = []
    for j in order:
        if cost(chosen + [j]) <= budget:
            chosen.append(j)
    return sorted(chosen)


@register
class FedRA(LayerAssignment):
    name = "fedra"
    summary = ("FedRA: each round each client trains the sub-model of a random set of blocks that fits its memory "
               "budget; the blocks it did not draw are skipped in its forward and backward pass.")
    citation = ("Su, Li, Xue, FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the Power of "
                "Heterogeneous Clients, ECCV 2024")

    def predicted_memory(self, plan, layers: list[int]) -> float:
        """A sub-model skips the blocks it did not draw: its own memory model."""
        return self.spec.memory.predict_submodel(layers)

    @contextlib.contextmanager
    def training_scope(self, ctx, plan, report):
        """The client trains the sub-model of its drawn blocks (:func:`fedlora.layers.submodel`)."""
        with super().training_scope(ctx, plan, report), submodel(ctx.model, report["layers"]):
            yield

    def choose(self, round_idx, state, cid):
        order = random_order(self.spec.seed, round_idx, cid, len(self.spec.layer_groups))
        return take_while_fits(order, self.spec.memory.predict_submodel, self._budget(cid)), {"submodel": True}

    def configure(self, round_idx, state, client_ids):
        """A sub-model never reads the LoRA of the blocks it skips: send only the drawn blocks' (and the head).  A
        client whose budget fits no block sits the round out: a sub-model of no block (embeddings straight into the
        head) is not the global model, and a head trained on it would corrupt the global head."""
        plans = []
        for p in super().configure(round_idx, state, client_ids):
            if p.modules:
                plans.append(dataclasses.replace(p, download=_drawn_only(p)))
            else:
                plans.append(dataclasses.replace(p, download={}, train=frozenset(), upload=frozenset()))
        return plans


def _drawn_only(plan) -> dict:
    """The plan's download restricted to the LoRA of its drawn blocks and the head."""
    from fedlora.adapters import ROLE_HEAD, module_of, role_of

    return {k: v for k, v in plan.download.items() if role_of(k) == ROLE_HEAD or module_of(k) in plan.modules}


@register
class RandK(LayerAssignment):
    name = "randk"
    citation = "a baseline of Zhang et al., Fed-piLot (2024): random layers within the budget"
    summary = ("Random-k baseline: each client trains a random set of LoRA layers that fits its memory budget inside "
               "the full-depth model (every block runs), every round.")

    def choose(self, round_idx, state, cid):
        """The shared cost model of pilot and topk: ``memory.position_aware = false`` (default) the paper's additive
        costs ``M_step + Σ c_j``, true the exact full-depth memory (FedRA's rule before it became a sub-model
        method); a budget that fits every layer trains every layer."""
        n = len(self.spec.layer_groups)
        mm, budget = self.spec.memory, self._budget(cid)
        if mm.predict(range(n)) <= budget:
            return list(range(n)), {}
        order = random_order(self.spec.seed, round_idx, cid, n)
        if self.section("memory").position_aware:
            return take_while_fits(order, mm.predict, budget), {}
        costs = mm.additive_costs()
        return take_while_fits(order, lambda s: mm.step_bytes + sum(costs[j] for j in s), budget), {}


@register
class TopK(LayerAssignment):
    name = "topk"
    citation = "a baseline of Zhang et al., Fed-piLot (2024): the last layers that fit the budget"
    summary = "Top-k baseline: each client trains the last LoRA layers that fit its memory budget."

    def choose(self, round_idx, state, cid):
        n = len(self.spec.layer_groups)
        return fit_layers(self.spec, self._budget(cid), order=list(reversed(range(n))),
                          position_aware=self.section("memory").position_aware), {}

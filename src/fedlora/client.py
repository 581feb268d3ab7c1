"""Local training of one client for one round: trainable set, optimiser, optional DP-SGD; returns an Update.

Only the parameters whose role is in ``plan.train`` require gradients and only they are given to the optimiser
(FFA-LoRA oracle O5, docs/oracles.md).  Under DP the model is wrapped, for this client only, in Opacus'
``GradSampleModule`` and the optimiser in ``DPOptimizer`` (:mod:`fedlora.dpsgd`); the hooks are removed before the
next client.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from fedlora.adapters import ROLE_HEAD, Adapter, role_of
from fedlora.data.tasks import Examples
from fedlora.dpsgd import local_step
from fedlora.protocol import ClientPlan, LocalHooks, Update
from fedlora.models import LoraSlots
from fedlora.privacy import ClientAccountant, ClientPrivacy

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def steps_per_round(train_cfg, num_examples: int) -> int:
    """Optimiser steps a client takes per round: ``local_steps``, or ``ceil(local_epochs · n / batch_size)``."""
    if train_cfg.local_epochs > 0:
        return max(1, math.ceil(train_cfg.local_epochs * num_examples / train_cfg.batch_size))
    return train_cfg.local_steps


def round_lr(train_cfg, round_idx: int) -> float:
    """``lr · lr_decay^(t−1)`` for round t (a per-round schedule, as FlexLoRA's code halves its lr at round 15)."""
    return train_cfg.lr * getattr(train_cfg, "lr_decay", 1.0) ** max(0, round_idx - 1)


def make_optimizer(params: list[nn.Parameter], train_cfg, lr: float, head: tuple[list[nn.Parameter], float] = ((), 0.0)
                   ) -> torch.optim.Optimizer:
    """The local optimiser; ``head = (head parameters, their lr)`` puts the task head in its own parameter group
    (``train.head_lr``).  Under DP-SGD this is post-processing: noise is added to the whole clipped gradient first."""
    head_params, head_lr = head
    ids = {id(p) for p in head_params}
    groups: list[dict] = [{"params": [p for p in params if id(p) not in ids]}]
    if ids:
        groups.append({"params": [p for p in params if id(p) in ids], "lr": head_lr})
    groups = [g for g in groups if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=train_cfg.weight_decay)


def round_head_lr(train_cfg, round_idx: int) -> float:
    """The head's learning rate in round t: ``head_lr · lr_decay^(t−1)``, or the LoRA rate when ``head_lr`` is 0."""
    head_lr = getattr(train_cfg, "head_lr", 0.0)
    if not head_lr:
        return round_lr(train_cfg, round_idx)
    return head_lr * getattr(train_cfg, "lr_decay", 1.0) ** max(0, round_idx - 1)


def autocast(model: nn.Module, precision: str):
    """``train.precision``: ``bf16`` runs the forward pass (and so its backward) under bfloat16 autocast on the
    model's device; parameters, their gradients and the optimiser state stay fp32 (mixed precision with fp32 master
    weights).  ``fp32`` is a no-op context."""
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively here: any GPU, or a CPU with AVX512-BF16 or AMX.  Elsewhere oneDNN
    emulates them (measured 30x slower than fp32 on an AVX2 CPU; docs/benchmarks.md)."""
    if device != "cpu":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


class _Sampler:
    """Batches of row indices: shuffled passes without replacement, or Poisson samples with rate q under DP."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator, poisson_rate: float | None):
        self.n, self.batch_size, self.rng, self.q = n, batch_size, rng, poisson_rate
        self._perm: np.ndarray = np.empty(0, dtype=int)

    def next(self) -> np.ndarray:
        if self.q is not None:
            return np.flatnonzero(self.rng.random(self.n) < self.q)
        if len(self._perm) < self.batch_size:
            self._perm = np.concatenate([self._perm, self.rng.permutation(self.n)])
        out, self._perm = self._perm[: self.batch_size], self._perm[self.batch_size:]
        return out


class ClientRun:
    """One client's local round as state: its trainable tensors, seed, batch sampler, optimiser, loss term and
    FedProx anchor.  :func:`train_client` runs it alone; :func:`fedlora.client_group.train_group` runs several
    side by side through one forward pass, with exactly the same per-client state."""

    def __init__(self, *, slots: LoraSlots, plan: ClientPlan, examples: Examples, train_cfg, round_idx: int, seed: int,
                 privacy: ClientPrivacy | None = None, hooks: LocalHooks | None = None):
        self.slots, self.plan, self.examples, self.privacy = slots, plan, examples, privacy
        self.params = slots.set_trainable(plan.train, plan.modules)
        if not self.params:
            raise ValueError(f"client {plan.client_id}: the plan trains nothing (roles {sorted(plan.train)})")
        self.seed = s = client_seed(seed, round_idx, plan.client_id)
        n = len(examples)
        self.steps = privacy.steps_per_round if privacy is not None else steps_per_round(train_cfg, n)
        self.sampler = _Sampler(n, train_cfg.batch_size, np.random.default_rng(s),
                                privacy.sample_rate if privacy is not None else None)
        self.micro = train_cfg.batch_size // train_cfg.grad_accum
        # Micro-batches of similar length pad less.  Exact where the step's gradient is a mean over examples:
        # per-example losses (classification) and DP-SGD (per-example gradients); instruction losses average tokens
        # per micro-batch, so their grouping is left as sampled.
        self.sort_by_length = hasattr(examples, "input_ids") and (
            privacy is not None or getattr(examples, "loss_is_mean_over_examples", False))
        self.lengths = (np.fromiter((len(x) for x in examples.input_ids), dtype=np.int64, count=n)
                        if self.sort_by_length else None)
        head_params = [p for k, p in slots.params.items() if role_of(k) == ROLE_HEAD and p.requires_grad]
        self.optimizer = make_optimizer(self.params, train_cfg, round_lr(train_cfg, round_idx),
                                        head=(head_params, round_head_lr(train_cfg, round_idx)))
        self.hooks = hooks or LocalHooks()
        self.losses: list[float] = []
        mu = getattr(train_cfg, "prox_mu", 0.0)
        anchor = [p.detach().clone() for p in self.params] if mu > 0 else None
        self.prox = (lambda: [mu * (p.detach() - a) for p, a in zip(self.params, anchor)]) if mu > 0 else None

    def next_batch(self) -> tuple[int, list[np.ndarray]]:
        """The next step's batch size and its micro-batches (length-sorted where that is exact)."""
        idx = self.sampler.next()
        if self.sort_by_length and len(idx) > self.micro:
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
        return len(idx), [idx[start:start + self.micro] for start in range(0, len(idx), self.micro)]

    def penalty(self, stepper, weight: float):
        """The method's loss term for this step, scaled so that ``weight ×`` it adds it once (None if it has none)."""
        extra = self.hooks.penalty(self.slots)
        if extra is not None and stepper.private:
            raise ValueError("a method's loss term is not part of the privatised gradient; it cannot run under "
                             "DP-SGD")
        return None if extra is None else extra / weight

    def release(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None

    def update(self, stepper, accountant: ClientAccountant | None = None) -> Update:
        """What the client uploads (``plan.upload`` roles) with its metrics."""
        plan, privacy = self.plan, self.privacy
        trained = self.slots.read()
        metrics = {"steps": float(self.steps), "empty_batches": float(stepper.empty_batches)}
        if privacy is None:
            # Under DP the client reports nothing computed from its data but the privatised tensors: its training
            # loss is a statistic of its examples outside the accounting, so it is not sent (the checksum of A is
            # post-processing of the privatised state; Poisson batch sizes depend on n and the seed only).
            metrics["loss"] = float(np.mean(self.losses)) if self.losses else float("nan")
        if privacy is not None and accountant is not None:
            metrics["epsilon"] = accountant.epsilon(plan.client_id, privacy.delta)
        metrics.update(self.hooks.metrics(self.slots, trained))
        return Update(plan.client_id, len(self.examples), plan.uploaded(trained), metrics)


def train_client(*, model: nn.Module, slots: LoraSlots, initial: Adapter | None, plan: ClientPlan, examples: Examples,
                 loss_fn: LossFn, train_cfg, round_idx: int, seed: int,
                 privacy: ClientPrivacy | None = None, accountant: ClientAccountant | None = None,
                 secure_rng: bool = False, hooks: LocalHooks | None = None) -> Update:
    """Run one client's local work and return what it uploads (``plan.upload`` roles only).

    ``hooks`` are the method's (:meth:`fedlora.methods.base.Method.local_hooks`): a loss term added once per step
    and metrics reported with the upload.  ``train_cfg.prox_mu = μ > 0`` adds FedProx's proximal gradient
    ``μ(θ − θ_start)`` over the trained tensors to every step (after clipping and noise under DP-SGD).  The client
    starts from ``initial`` with ``plan.download``'s tensors in place of its own, loaded into the slots;
    ``initial=None`` means the caller has loaded the slots already (the simulation engine does, so that neither the
    initial adapter nor the download is held while the client trains)."""
    if initial is not None:
        slots.load(initial.with_tensors(plan.download))
    run = ClientRun(slots=slots, plan=plan, examples=examples, train_cfg=train_cfg, round_idx=round_idx, seed=seed,
                    privacy=privacy, hooks=hooks)
    torch.manual_seed(run.seed)  # dropout
    model.train()
    try:
        with local_step(model, run.optimizer, privacy, expected_batch_size=train_cfg.batch_size,
                        noise_seed=run.seed + 1, secure_rng=secure_rng, accountant=accountant,
                        client_id=plan.client_id) as stepper:
            for _ in range(run.steps):
                stepper.optimizer.zero_grad(set_to_none=True)
                size, chunks = run.next_batch()
                batch_loss = 0.0
                for i, chunk in enumerate(chunks):
                    with autocast(model, getattr(train_cfg, "precision", "fp32")):
                        loss = loss_fn(stepper.model, examples.batch(chunk))
                    weight = stepper.chunk_weight(len(chunk), size)
                    extra = run.penalty(stepper, weight) if i == 0 else None  # the method's term, once per step
                    if extra is not None:
                        loss = loss + extra
                    (loss * weight).backward()
                    batch_loss += float(loss.detach()) * len(chunk)
                stepper.step(run.params, size, extra_grad=run.prox)
                if size:
                    run.losses.append(batch_loss / size)
    finally:
        run.release()
    return run.update(stepper, accountant)

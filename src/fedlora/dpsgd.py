"""How a client's optimiser step is taken: plainly, or as DP-SGD with Opacus — one wrapper, so the local training
loop has no privacy branch (Opacus' ``make_private`` idea: the private model and optimiser are returned together and
their hooks are closed when the client is done).

DP-SGD here (Abadi et al., CCS 2016; docs/methods.md §4): the shared model is wrapped for this client only in Opacus'
``GradSampleModule`` (exact per-example gradients of each micro-batch's mean loss) and the optimiser in
``DPOptimizer`` (clip each example's flat gradient to ``C``, add ``N(0, σ²C²)`` to the sum, divide by the expected
batch size).  Several micro-batches form one logical Poisson batch: their per-example gradients are concatenated
before the step.  An empty Poisson batch still takes a noise-only step.  Each step is accounted.  A data-independent gradient term
(FedProx's ``μ(θ − θ_start)``) is added after privatisation, so it is neither clipped nor noised.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class PlainStep:
    """The non-private step: micro-batch losses weighted by their share of the batch, then ``optimizer.step()``."""

    private = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.empty_batches = 0

    def chunk_weight(self, chunk_size: int, batch_size: int) -> float:
        """The weight of a micro-batch's mean loss in the step's gradient."""
        return chunk_size / batch_size

    def step(self, params: list[nn.Parameter], batch_size: int, extra_grad=None) -> None:
        """One optimiser step; ``extra_grad()`` (optional) gives a gradient per parameter that is added to the data
        gradient just before the update (FedProx's proximal term)."""
        if extra_grad is not None:
            _add_grads(params, extra_grad())
        self.optimizer.step()

    def close(self) -> None:
        """Nothing to undo."""


class DPSGDStep(PlainStep):
    """DP-SGD for one client's round (see the module docstring); ``accountant`` (optional) is stepped per step."""

    private = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, privacy, expected_batch_size: int,
                 noise_seed: int | None, secure_rng: bool, accountant=None, client_id: int = 0):
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        noise_gen = None if secure_rng else torch.Generator().manual_seed(noise_seed)
        private_optimizer = DPOptimizer(optimizer, noise_multiplier=privacy.noise_multiplier,
                                        max_grad_norm=privacy.clip, expected_batch_size=expected_batch_size,
                                        loss_reduction="mean", generator=noise_gen, secure_mode=secure_rng)
        super().__init__(self._gsm, private_optimizer)
        self.privacy, self.accountant, self.client_id = privacy, accountant, client_id

    def chunk_weight(self, chunk_size: int, batch_size: int) -> float:
        # each micro-batch's mean loss gives exact per-example gradients; Opacus averages over the expected batch
        return 1.0

    def step(self, params: list[nn.Parameter], batch_size: int, extra_grad=None) -> None:
        if batch_size == 0:  # an empty Poisson batch still takes a noise-only step
            self.empty_batches += 1
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:  # several micro-batches: one logical batch for Opacus' averaging
            for p in params:
                if isinstance(p.grad_sample, list):
                    p.grad_sample = torch.cat(p.grad_sample, dim=0)
        if extra_grad is None:
            self.optimizer.step()
        elif self.optimizer.pre_step():  # clipped, noised and averaged: p.grad is the private gradient now
            _add_grads(params, extra_grad())  # data-independent, so neither clipped nor noised (post-processing)
            self.optimizer.original_optimizer.step()
        if self.accountant is not None:
            self.accountant.step(self.client_id, self.privacy.noise_multiplier, self.privacy.sample_rate)

    def close(self) -> None:
        self._gsm._close()


def _add_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())


@contextlib.contextmanager
def local_step(model: nn.Module, optimizer: torch.optim.Optimizer, privacy=None, *, expected_batch_size: int = 0,
               noise_seed: int | None = None, secure_rng: bool = False, accountant=None, client_id: int = 0):
    """The client's step for this round — :class:`DPSGDStep` when it has a privacy plan, else :class:`PlainStep` —
    with Opacus' hooks removed from the shared model on the way out, whatever happens inside."""
    stepper = (DPSGDStep(model, optimizer, privacy, expected_batch_size, noise_seed, secure_rng, accountant,
                         client_id) if privacy is not None else PlainStep(model, optimizer))
    try:
        yield stepper
    finally:
        stepper.close()

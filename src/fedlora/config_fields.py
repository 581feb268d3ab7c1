"""The field helper of every config section, and the sections the methods own (``[pilot]``, ``[flexlora]``,
``[hetlora]``, ``[flora]``, …): each method receives only its own (``Method.config_sections``), and each section
checks itself (``check()``, called by :func:`fedlora.config_checks.validate`).  Plain dataclasses,
importing no method, so :mod:`fedlora.config` can gather them without importing the methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlora.config_checks import _need as need
from fedlora.errors import ConfigError


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

    def check(self) -> None:
        need(self.ig_examples >= 1, "pilot.ig_examples", self.ig_examples, "a positive integer")
        for key in ("score_mix", "score_decay", "momentum_share", "momentum_decay"):
            need(0 <= getattr(self, key) <= 1, f"pilot.{key}", getattr(self, key), "in [0, 1]")
        need(self.dwa_max >= 1, "pilot.dwa_max", self.dwa_max, "at least 1")
        need(self.server_lr > 0, "pilot.server_lr", self.server_lr, "positive")


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

    def check(self) -> None:
        need(self.penalty >= 0 and math.isfinite(self.penalty), "hetlora.penalty", self.penalty,
             "a non-negative number")
        need(0 < self.gamma < 1, "hetlora.gamma", self.gamma, "in (0, 1)")


@dataclass
class FloraConfig:
    alpha_per_rank: float = _f(2.0, "FLoRA's scaling convention: alpha_k = alpha_per_rank * r_k, so every client and "
                               "the stack share s = alpha_per_rank (FLoRA's code: 2); 0 = use lora.alpha for every "
                               "rank (s_k = lora.alpha / r_k).")

    def check(self) -> None:
        need(self.alpha_per_rank >= 0 and math.isfinite(self.alpha_per_rank), "flora.alpha_per_rank",
             self.alpha_per_rank, "a non-negative finite number (0 = use lora.alpha)")


@dataclass
class FedSVDConfig:
    period: int = _f(1, "Re-factorise B*A by SVD after every `period` rounds (the authors' code: 1, every round); "
                     "0 = never (then FedSVD is FFA-LoRA with the server's A).")

    def check(self) -> None:
        need(self.period >= 0, "fedsvd.period", self.period, "a non-negative integer (0 = never re-factorise)")


@dataclass
class LoRAFAIRConfig:
    lambda_reg: float = _f(0.01, "lambda: weight of ||dB||_F^2 in the server's refinement of B (the paper's value).")
    lr: float = _f(0.01, "Learning rate of the server's SGD on dB (the derived code's default).")
    steps: int = _f(1000, "At most this many SGD iterations per round (stops earlier when the loss settles).")

    def check(self) -> None:
        need(self.lambda_reg >= 0 and math.isfinite(self.lambda_reg), "lorafair.lambda_reg", self.lambda_reg,
             "non-negative")
        need(self.lr > 0 and math.isfinite(self.lr), "lorafair.lr", self.lr, "a positive finite number")
        need(self.steps >= 1, "lorafair.steps", self.steps, "a positive integer")


@dataclass
class FedExConfig:
    residual: str = _f("dense", "How a client that took part in the previous round receives that round's residual: "
                       "'dense' (one d_out x d_in matrix per module; only the aggregate is seen) or 'factors' (the "
                       "low-rank stack of the participants' scaled factors while it is the smaller: fewer bytes for "
                       "few clients, but each participant's own factors are seen).", choices=("dense", "factors"))


@dataclass
class FedSBConfig:
    init_examples: int = _f(550, "Server-held examples whose summed loss gradient fits the initial A, B and R "
                            "(LoRA-SB's initialisation; the authors' SNLI code uses 550).")
    init_lr: float = _f(0.0, "eta' of the approximated first step -eta' * sign(grad) that the initial adapter "
                        "reproduces; 0 = train.lr / (rounds x local steps), as the authors' code divides the lr by "
                        "the number of training steps.")
    unaccounted_init: bool = _f(False, "Allow DP-SGD although the server's initialisation sample (drawn from the "
                                "training rows in simulation) is not covered by the clients' privacy accounting "
                                "(the authors' DP code does this silently); only for data the server may use "
                                "openly.")

    def check(self) -> None:
        need(self.init_examples >= 1, "fedsb.init_examples", self.init_examples, "a positive integer")
        need(self.init_lr >= 0 and math.isfinite(self.init_lr), "fedsb.init_lr", self.init_lr,
             "a non-negative finite number (0 = train.lr / total local steps)")


TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""Tracking backend -> the module it needs (installed with the extra of the same name: pip install fedlora[mlflow])."""


@dataclass
class TrainConfig:
    optimizer: str = _f("adamw", "Local optimiser.", choices=("adamw", "sgd"))
    lr: float = _f(1e-2, "Local learning rate (of round 1).")
    lr_decay: float = _f(0.88, "Multiply the learning rate by this every round: round t uses lr * lr_decay^(t-1).")
    head_lr: float = _f(0.0, "Learning rate of the classification head (round 1; decays with lr_decay); 0 = train.lr "
                        "(a head on normalised features needs large weights: docs/methods.md §4b).")
    weight_decay: float = _f(0.0, "Weight decay.")
    momentum: float = _f(0.0, "SGD momentum.")
    batch_size: int = _f(16, "Examples per optimiser step (the expected Poisson batch size under DP).")
    grad_accum: int = _f(1, "Micro-batches per optimiser step (batch_size must be divisible by it).")
    local_steps: int = _f(10, "Optimiser steps per client per round (ignored when local_epochs > 0).")
    local_epochs: float = _f(0.0, "If > 0, local work in epochs over the client's training data instead of steps.")
    eval_batch_size: int = _f(128, "Batch size for evaluation.")
    prox_mu: float = _f(0.0, "FedProx: the local loss gains mu/2 * ||theta - theta_start||^2 over the trained tensors "
                        "(theta_start = the round's start; under DP added after clipping and noise, §7d); 0 = off.")
    precision: str = _f("fp32", "'fp32', or 'bf16': bfloat16 autocast in local training, fp32 master weights and "
                        "optimiser state (faster only with AVX512-BF16/AMX or a GPU; refused under DP).",
                        choices=("fp32", "bf16"))
    gradient_checkpointing: bool = _f(False, "Recompute each block's activations in the backward pass instead of "
                                      "storing them: less memory, ~1/3 more compute, the same gradients.")
    client_group: int = _f(1, "Simulation: train up to N sampled clients together, their micro-batches packed through one "
                           "forward pass of the shared base (the same uploads up to float rounding; DP clients and "
                           "layer-subset methods train one at a time; docs/benchmarks.md). 1 = one at a time.")


@dataclass
class TrackConfig:
    tensorboard: bool = _f(False, "Write TensorBoard event files under the run directory (tensorboard --logdir runs). "
                           "Needs the 'tensorboard' extra.")
    mlflow: str = _f("", "Log to MLflow at this tracking URI (e.g. 'sqlite:///runs/mlflow.db', 'http://host:5000'); "
                     "'' = off. Needs the 'mlflow' extra.")
    wandb: str = _f("", "Log to Weights & Biases: 'offline' (files under the run directory; `wandb sync` later) or "
                    "'online'; '' = off. Needs the 'wandb' extra.", choices=("", "offline", "online"))
    experiment: str = _f("fedlora", "MLflow experiment / W&B project the runs are logged to.")

    def check(self) -> None:
        import importlib.util

        need(bool(self.experiment.strip()), "track.experiment", self.experiment, "a non-empty name")
        for key, module in TRACKERS.items():
            if getattr(self, key) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"track.{key} needs the {module!r} package: pip install 'fedlora[{key}]'")


@dataclass
class AttackConfig:
    kind: str = _f("none", "Simulation only: what the clients in attack.clients do. 'scale' (send sent + s*update, "
                   "s = attack.scale), 'sign_flip' (sent - update), 'gaussian' (Gaussian noise with the update's shape "
                   "and L2 norm), 'label_flip' (train honestly on labels y -> L-1-y; with an odd number of classes the "
                   "middle one stays); 'none' = every client honest.",
                   choices=("none", "scale", "sign_flip", "gaussian", "label_flip"))
    clients: list = _f([], "Client ids (0-based) that are malicious under attack.kind (at least one must stay "
                       "honest).")
    scale: float = _f(10.0, "attack.kind = 'scale': the factor on the malicious client's update.")

    def check(self) -> None:
        if self.kind == "none":  # clients without a kind are an ignored setting (a grid over kinds keeps them)
            return
        need(len(self.clients) > 0, "attack.clients", self.clients, f"at least one client id (attack.kind = "
             f"{self.kind!r})")
        for i, c in enumerate(self.clients):
            need(isinstance(c, int) and not isinstance(c, bool) and c >= 0, f"attack.clients[{i}]", c,
                 "a non-negative client id")
        need(len(set(self.clients)) == len(self.clients), "attack.clients", self.clients, "distinct client ids")
        need(self.scale > 0 and math.isfinite(self.scale), "attack.scale", self.scale, "a positive finite number")


@dataclass
class SecureConfig:
    aggregation: bool = _f(False, "Flower engine: secure aggregation (SecAgg+, Bell et al. 2020, with Flower's workflow "
                           "and client mod): the server learns only the data-weighted sum of the uploads, never one "
                           "client's. Methods whose aggregate is an average of uploads only (fedit, ffa, fedsa, "
                           "rolora, fedsb).")
    num_shares: float = _f(1.0, "SecAgg+: shares of each client's secrets, as a fraction of the round's clients "
                           "(<= 1) or a count (> 2); 1.0 = every client holds a share of every other's.")
    reconstruction_threshold: float = _f(0.5, "SecAgg+: shares needed to rebuild a secret, as a fraction of the "
                                         "shares (<= 1) or a count; it is also the fewest live neighbours each "
                                         "client needs, so it bounds the dropouts a round survives.")
    clipping_range: float = _f(8.0, "SecAgg+: uploaded values are quantised on [-c, c]; a client whose upload has a "
                               "larger value fails its round instead of being clipped silently.")
    quantization_bits: int = _f(22, "SecAgg+: values are quantised to 2**bits levels on [-c, c] (each coordinate of "
                                "the average is off by about K * 2c / 2**bits / R for K clients, R = sum of their "
                                "examples / the largest client's).")

    def check(self) -> None:
        need((self.num_shares > 2 and float(self.num_shares).is_integer()) or 0 < self.num_shares <= 1,
             "secure.num_shares", self.num_shares, "a fraction in (0, 1] or a whole count > 2")
        need((self.reconstruction_threshold >= 2 and float(self.reconstruction_threshold).is_integer())
             or 0 < self.reconstruction_threshold <= 1, "secure.reconstruction_threshold",
             self.reconstruction_threshold, "a fraction in (0, 1] or a whole count >= 2")
        if self.num_shares > 2 and self.reconstruction_threshold >= 2:
            need(self.reconstruction_threshold < self.num_shares, "secure.reconstruction_threshold",
                 self.reconstruction_threshold, f"less than secure.num_shares ({self.num_shares})")
        need(self.clipping_range > 0 and math.isfinite(self.clipping_range), "secure.clipping_range",
             self.clipping_range, "a positive finite number")
        need(8 <= self.quantization_bits <= 28, "secure.quantization_bits", self.quantization_bits,
             "in [8, 28] (the masked sum lives modulo 2**32)")

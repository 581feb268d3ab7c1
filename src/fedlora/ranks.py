"""Heterogeneous client resources: which LoRA rank each client uses on each target module.

FlexLoRA (Bai et al., NeurIPS 2024; docs/methods.md §9) draws one *configuration type* per client before training
from a resource distribution; a type gives one rank to the attention modules and one to the MLP modules.  The four
types, in the paper's Table 1 order, are r8, r30, r30/200 (attention/MLP) and r200; ``lora.rank_types`` holds them
(scale them to the model: FlexLoRA's ranks are for a 2048-wide LLaMA).  The distributions follow the official code,
not its README (80 %, not 85 %, for the heavy tails):

* ``uniform``: each type with probability 1/4;
* ``heavy_tail_light``: 80 % r8, 5 % r30, 5 % r30/200, 10 % r200;
* ``heavy_tail_strong``: 5 % r8, 5 % r30, 10 % r30/200, 80 % r200;
* ``normal``: the N(1.5, 0.7) density at type positions 0..3, normalised (5.75 %, 44.25 %, 44.25 %, 5.75 %): the
  intended bell over the types in Table 1 order, the middle types most likely (our reading of the paper);
* ``normal_code``: FlexLoRA's code read literally.  It applies the same four probabilities to its own list of types,
  whose order is r8, r200, r30/200, r30 (the index is used as the type), so it draws r8 5.75 %, r30 5.75 %,
  r30/200 44.25 %, r200 44.25 %: the largest types most likely.  Offered to reproduce the released runs.

``explicit`` takes one entry per client from ``lora.client_ranks``; ``homogeneous`` gives everyone ``lora.rank``.
"""
from __future__ import annotations

import math

import numpy as np

RankConfig = tuple[int, int]  # (attention rank, MLP rank)


def normal_type_probabilities(mu: float = 1.5, sigma: float = 0.7) -> tuple[float, ...]:
    """FlexLoRA's ``normal`` distribution: the Gaussian density at positions 0..3, normalised (oracle O17,
    docs/oracles.md)."""
    dens = [math.exp(-0.5 * ((i - mu) / sigma) ** 2) for i in range(4)]
    total = sum(dens)
    return tuple(d / total for d in dens)


TYPE_PROBABILITIES: dict[str, tuple[float, ...]] = {
    "uniform": (0.25, 0.25, 0.25, 0.25),
    "heavy_tail_light": (0.80, 0.05, 0.05, 0.10),
    "heavy_tail_strong": (0.05, 0.05, 0.10, 0.80),
    "normal": normal_type_probabilities(),
    # the code's type order is r8, r200, r30/200, r30: its bell's probabilities land on these types
    "normal_code": tuple(normal_type_probabilities()[i] for i in (0, 3, 2, 1)),
}


def draw_types(distribution: str, num_clients: int, seed: int) -> list[int]:
    """One configuration-type index per client, drawn once before training (seeded)."""
    probs = np.asarray(TYPE_PROBABILITIES[distribution])
    rng = np.random.default_rng([seed, 29])
    return [int(i) for i in rng.choice(len(probs), size=num_clients, p=probs / probs.sum())]


def rank_pair(entry) -> RankConfig:
    return (int(entry), int(entry)) if isinstance(entry, int) else (int(entry[0]), int(entry[1]))


def client_rank_configs(lora_cfg, num_clients: int, seed: int) -> list[RankConfig]:
    """(attention rank, MLP rank) for every client, from ``lora.rank_distribution``."""
    dist = lora_cfg.rank_distribution
    if dist == "homogeneous":
        return [(lora_cfg.rank, lora_cfg.rank)] * num_clients
    if dist == "explicit":
        return [rank_pair(e) for e in lora_cfg.client_ranks]
    types = [rank_pair(t) for t in lora_cfg.rank_types]
    return [types[i] for i in draw_types(dist, num_clients, seed)]


def smallest_config(configs: list[RankConfig]) -> RankConfig:
    """The homogeneous configuration every client can afford (the "bucket effect" FlexLoRA avoids)."""
    return (min(c[0] for c in configs), min(c[1] for c in configs))


def is_mlp(module_name: str, mlp_modules: list[str]) -> bool:
    return any(module_name == m or module_name.endswith("." + m) for m in mlp_modules)


def module_ranks(config: RankConfig, module_names, mlp_modules: list[str]) -> dict[str, int]:
    """Per target module, the rank a configuration gives it."""
    return {name: config[1] if is_mlp(name, mlp_modules) else config[0] for name in module_names}


def describe_config(config: RankConfig) -> str:
    return f"r{config[0]}" if config[0] == config[1] else f"r{config[0]}/{config[1]}"

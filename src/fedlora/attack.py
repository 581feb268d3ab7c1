"""Malicious clients, for measuring defences in simulation (``attack.*``; off by default, refused on Flower).

One or more clients (``attack.clients``) misbehave in every round they are sampled; the others are honest.  With
``Δ = trained − sent`` the honest update of a malicious client (what it started from, the plan's download, to what it
would upload):

* ``scale`` — it uploads ``sent + s·Δ`` (``s = attack.scale``, 10 by default): a boosted update (model replacement,
  Bagdasaryan et al., AISTATS 2020; Bhagoji et al., ICML 2019);
* ``sign_flip`` — ``sent − Δ``: the update reversed, at its own norm (Damaskinos et al., 2018; Li et al., RSA 2019);
* ``gaussian`` — ``sent + g·‖Δ‖/‖g‖`` with ``g ~ N(0, I)`` over all its uploaded tensors together: garbage of the
  right shape and norm, which a norm bound cannot tell from an honest update (Blanchard et al., NeurIPS 2017);
* ``label_flip`` — it trains honestly on labels ``y → L−1−y`` (for SST-2, positive ↔ negative; with an odd number
  of classes the middle one stays, e.g. MNLI's neutral) and uploads what it trained (Tolpegin et al., ESORICS 2020;
  Fang et al., USENIX Security 2020): a data-poisoning client that follows the protocol.

The update attacks act on the client's upload before it is encoded, so the server sees exactly what a malicious
participant would send; the robust rules (:mod:`fedlora.robust`) and upload checks then run as for anyone.  The
Gaussian draw is seeded by (run seed, round, client), so an attacked run is as reproducible as a clean one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from fedlora.errors import ConfigError

UPDATE_KINDS = ("scale", "sign_flip", "gaussian")


def is_malicious(attack, client_id: int) -> bool:
    """True when ``client_id`` is one of ``attack.clients`` under an active ``attack.kind``."""
    return attack is not None and attack.kind != "none" and client_id in attack.clients


def check_attack(attack, num_clients: int, task) -> None:
    """Refuse, before any work, client ids outside the federation and label flips on a task without labels."""
    if attack.kind == "none":
        return
    bad = [c for c in attack.clients if c >= num_clients]
    if bad:
        raise ConfigError(f"attack.clients {bad} are not clients of this run (ids 0..{num_clients - 1})")
    if attack.kind == "label_flip" and getattr(task, "task_type", "") != "SEQ_CLS":
        raise ConfigError("attack.kind = 'label_flip' needs a classification task (labels to flip); "
                          f"this run's task is {type(task).__name__}")
    if len(attack.clients) == num_clients:
        raise ConfigError(f"attack.clients names every client ({num_clients}); at least one must be honest")


def poison_update(kind: str, uploaded: dict[str, Tensor], sent: dict[str, Tensor], scale: float = 10.0,
                  seed: int = 0) -> dict[str, Tensor]:
    """The malicious upload for an honest one (module docstring); float64 inside, each tensor's dtype out."""
    delta = {k: uploaded[k].double() - sent[k].double() for k in uploaded}
    if kind == "scale":
        bad = {k: d * scale for k, d in delta.items()}
    elif kind == "sign_flip":
        bad = {k: -d for k, d in delta.items()}
    elif kind == "gaussian":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(d.shape, generator=gen, dtype=torch.float64) for k, d in sorted(delta.items())}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        noise_norm = math.sqrt(sum(float((g ** 2).sum()) for g in noise.values()))
        bad = {k: g * (norm / noise_norm if noise_norm > 0 else 0.0) for k, g in noise.items()}
    else:
        raise ValueError(f"not an update attack: {kind!r}; one of {', '.join(UPDATE_KINDS)}")
    return {k: (sent[k].double() + bad[k]).to(uploaded[k].dtype) for k in uploaded}


def update_poisoner(attack, client_id: int, sent: dict[str, Tensor], round_idx: int,
                    run_seed: int) -> Callable[[dict[str, Tensor]], dict[str, Tensor]] | None:
    """For a malicious client under an update attack, the function that turns its honest upload into the malicious
    one (``sent``: what it started from, per uploaded key); None for everyone else."""
    if not is_malicious(attack, client_id) or attack.kind not in UPDATE_KINDS:
        return None
    sent = {k: v.detach().clone() for k, v in sent.items()}
    seed = (run_seed * 1_000_003 + round_idx * 10_007 + client_id) % (2 ** 63)
    return lambda uploaded: poison_update(attack.kind, uploaded, sent, attack.scale, seed)


def flip_labels(examples, num_labels: int):
    """The same examples with every label ``y`` replaced by ``L − 1 − y`` (``L = num_labels``)."""
    import dataclasses

    return dataclasses.replace(examples, labels=(num_labels - 1) - examples.labels)


def client_examples(attack, client_train: list, client_id: int, num_labels: int):
    """The training examples client ``client_id`` trains on: its own, with labels flipped when it is malicious under
    ``label_flip`` (a copy: the engine's examples, which a server-held sample may draw from, stay clean)."""
    examples = client_train[client_id]
    if attack is not None and attack.kind == "label_flip" and client_id in attack.clients:
        return flip_labels(examples, num_labels)
    return examples

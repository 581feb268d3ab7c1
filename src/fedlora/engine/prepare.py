"""Everything a run checks and computes before a model loads: the task's data, the partition into clients, each
client's LoRA ranks and its DP-SGD plan.  Bad input fails here, in seconds, with a clear message."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from fedlora.attack import check_attack
from fedlora.client import steps_per_round
from fedlora.config import ExperimentConfig
from fedlora.data.partition import partition, split_local
from fedlora.errors import ConfigError
from fedlora.methods import available_methods, get_method
from fedlora.privacy import ClientPrivacy, plan_privacy
from fedlora.ranks import RankConfig, client_rank_configs, smallest_config
from fedlora.robust import is_plain as robust_is_plain
from fedlora.tasks import make_task


@dataclass
class ClientData:
    train_rows: list[int]
    val_rows: list[int]
    name: str = ""
    val_from_validation: bool = False  # by_task: local validation rows index the validation file, not train


@dataclass
class Prepared:
    """Everything checked and computed before the model loads."""

    cfg: ExperimentConfig
    task: object  # ClassificationTask | InstructionTask
    clients: list[ClientData]
    privacy: dict[int, ClientPrivacy] = field(default_factory=dict)
    rank_configs: list[RankConfig] = field(default_factory=list)
    global_eval_rows: list[int] | None = None  # rows of the validation data the global model is scored on
    heldout: list[str] = field(default_factory=list)



def sample_clients(seed: int, round_idx: int, num_clients: int, fraction: float) -> list[int]:
    """``max(⌊fraction·N⌋, 1)`` distinct clients, the same set for the same (seed, round) (oracle O29,
    docs/oracles.md)."""
    m = max(int(fraction * num_clients + 1e-9), 1)
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx, 3])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def _capped(rows: list[int], cap: int, *key: int) -> list[int]:
    if cap and len(rows) > cap:  # a seeded subset; the rest is simply not used
        return sorted(np.random.default_rng([*key, 17]).choice(rows, size=cap, replace=False).tolist())
    return list(rows)


def _by_task(cfg: ExperimentConfig, task) -> tuple[list[ClientData], list[int], list[str]]:
    """One client per ``data.client_column`` value; ``clients.heldout_tasks`` tasks kept out as unseen."""
    c = cfg.clients
    train_groups = task.groups(task.train_rows)
    val_groups = task.groups(task.val_rows)
    names = sorted(set(train_groups))
    rng = np.random.default_rng([cfg.seed, 41])
    if c.heldout_tasks >= len(names):
        raise ConfigError(f"clients.heldout_tasks = {c.heldout_tasks} leaves no training task (the data has "
                          f"{len(names)} tasks)")
    heldout = sorted(rng.choice(names, size=c.heldout_tasks, replace=False).tolist()) if c.heldout_tasks else []
    remaining = [n for n in names if n not in set(heldout)]
    if c.num > len(remaining):
        raise ConfigError(f"clients.num = {c.num} but the data has only {len(remaining)} training tasks "
                          f"({len(names)} in {cfg.data.train}, {len(heldout)} held out); set clients.num = 0 for all")
    if c.num:
        remaining = sorted(rng.choice(remaining, size=c.num, replace=False).tolist())
    train_by, val_by = {}, {}
    for i, g in enumerate(train_groups):
        train_by.setdefault(g, []).append(i)
    for i, g in enumerate(val_groups):
        val_by.setdefault(g, []).append(i)
    cap = cfg.eval.max_client_examples
    clients = [ClientData(train_by[n], _capped(val_by.get(n, []), cap, cfg.seed, k), n, True)
               for k, n in enumerate(remaining)]
    if heldout:
        missing = [n for n in heldout if n not in val_by]
        if missing:
            raise ConfigError(f"held-out tasks {missing[:3]} have no rows in data.validation ({cfg.data.validation}); "
                              f"the unseen-task evaluation needs them")
        global_rows = sorted(i for j, n in enumerate(heldout) for i in _capped(val_by[n], cap, cfg.seed, 10_000 + j))
    else:
        global_rows = list(range(len(task.val_rows)))
    return clients, global_rows, heldout


def _server_optimizer_methods() -> list[str]:
    return [n for n in available_methods() if get_method(n).accepts_server_optimizer]


def secure_methods() -> list[str]:
    """The registered methods whose aggregate is the data-weighted average of the uploads and nothing more
    (``Method.secure_aggregation``; Fed-SB is not: it drops restarted clients' cores, which a sum cannot)."""
    return [n for n in available_methods() if get_method(n).secure_aggregation]


def check_secure(cfg, method_cls) -> None:
    """Refuse secure aggregation (``secure.*``, :mod:`fedlora.engine.flower_secure`) for a method or setting that
    needs each client's update."""
    if not cfg.secure.aggregation:
        return
    if not method_cls.secure_aggregation:
        why = method_cls.own_server_step or "its aggregate reads more than the average of the uploads"
        raise ConfigError(f"secure.aggregation = true: method {cfg.method!r} needs each client's update on the "
                          f"server ({why}), which secure aggregation hides; it works with: "
                          f"{', '.join(secure_methods())}")
    r = cfg.robust
    if r.aggregation != "mean" or r.norm_bound > 0:
        raise ConfigError(f"secure.aggregation = true hides each client's update, so robust.aggregation = "
                          f"{r.aggregation!r} / robust.norm_bound = {r.norm_bound} cannot apply (they need every update)")


def _check_method_options(cfg: ExperimentConfig, method_cls) -> None:
    if not method_cls.averages_tensors and not robust_is_plain(cfg.robust):  # the wrapper needs an average
        r = cfg.robust
        raise ConfigError(f"method {cfg.method!r} does not average tensors, so robust.aggregation = "
                          f"{r.aggregation!r} / robust.norm_bound = {r.norm_bound} cannot apply; robust rules work "
                          f"with: {', '.join(n for n in available_methods() if get_method(n).averages_tensors)}")
    if not method_cls.accepts_server_optimizer and (cfg.server.optimizer != "fedavg" or cfg.server.lr not in (0, 1)):
        own = f" ({method_cls.own_server_step})" if method_cls.own_server_step else ""
        raise ConfigError(f"method {cfg.method!r} does not aggregate by averaging uploaded tensors{own}, so "
                          f"server.optimizer = {cfg.server.optimizer!r} / server.lr = {cfg.server.lr} cannot apply; "
                          f"server optimisers work with: {', '.join(_server_optimizer_methods())}")
    if cfg.train.gradient_checkpointing and method_cls.needs_memory_model:
        raise ConfigError(f"train.gradient_checkpointing cannot be used with method {cfg.method!r}: its memory model "
                          f"(layer costs against the clients' budgets) assumes stored activations")
    check_secure(cfg, method_cls)
    method_cls.check_config(cfg)


def prepare(cfg: ExperimentConfig, plan_dp: bool = True) -> Prepared:
    """Load and check data, partition it, assign client ranks and plan DP — no model is touched.  ``plan_dp=False``:
    no DP plan (a Flower node, which receives its client's σ, q, steps and C in each plan)."""
    method_cls = get_method(cfg.method)
    _check_method_options(cfg, method_cls)
    task = make_task(cfg)
    heldout: list[str] = []
    global_rows = None
    if cfg.clients.partition == "by_task":
        clients, global_rows, heldout = _by_task(cfg, task)
    else:
        task.check_partition(cfg)
        parts = partition(task.train_labels, task.num_labels, cfg)
        clients = []
        for k, rows in enumerate(parts):
            tr, va = split_local(rows, cfg.clients.val_fraction, cfg.seed, k)
            clients.append(ClientData(tr, _capped(va, cfg.eval.max_client_examples, cfg.seed, k)))
    check_attack(cfg.attack, len(clients), task)
    configs = client_rank_configs(cfg.lora, len(clients), cfg.seed)
    if len(configs) != len(clients):
        raise ConfigError(f"lora.client_ranks has {len(configs)} entries but there are {len(clients)} clients")
    if not method_cls.heterogeneous_ranks:
        configs = [smallest_config(configs)] * len(clients)
    prepared = Prepared(cfg, task, clients, rank_configs=configs, global_eval_rows=global_rows, heldout=heldout)
    if cfg.dp.enabled and plan_dp:
        sizes = {k: len(c.train_rows) for k, c in enumerate(clients)}
        steps = {k: steps_per_round(cfg.train, n) for k, n in sizes.items()}
        prepared.privacy = plan_privacy(cfg.dp, sizes, steps, cfg.rounds, cfg.train.batch_size)
    return prepared


def partition_digest(prepared: Prepared) -> str:
    """SHA-256 of every client's train/validation row indices: equal digests mean identical client data."""
    import hashlib

    rows = [[c.train_rows, c.val_rows] for c in prepared.clients]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


"""Settings that would do nothing: a non-default value for a key that the chosen method or mode never reads.

``dp.epsilon = 3`` without ``dp.enabled = true`` would run a non-private experiment without a word; a ``[flexlora]``
section under ``method = "fedit"`` or ``memory.budgets`` under a method that assigns no layers would be silently
dropped.  ``fedlora run`` refuses such a configuration (naming the key and why); ``fedlora compare`` warns once per
cell, because a config shared by several methods legitimately carries keys only some of them read.

Separate from :mod:`fedlora.config_checks` (which judges each value by itself, at load time, without importing a
method): knowing what a method reads needs its class (``Method.config_sections``, ``needs_memory_model``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import fields

from fedlora.errors import ConfigError

# engine keys read only in some modes: section -> {key: (mode in which it is read, predicate on the config)}
_MODE_KEYS = {
    "clients": {"dirichlet_alpha": ("clients.partition = 'dirichlet'", lambda c: c.clients.partition == "dirichlet")},
    "robust": {"trim_fraction": ("robust.aggregation = 'trimmed_mean'",
                                 lambda c: c.robust.aggregation == "trimmed_mean")},
    "train": {"momentum": ("train.optimizer = 'sgd'", lambda c: c.train.optimizer == "sgd"),
              "local_steps": ("train.local_epochs = 0", lambda c: not c.train.local_epochs)},
    "server": {"momentum": ("server.optimizer = 'fedavgm'", lambda c: c.server.optimizer == "fedavgm"),
               "beta1": ("an adaptive server.optimizer (fedadam, fedyogi, fedadagrad)",
                         lambda c: c.server.optimizer in ("fedadam", "fedyogi", "fedadagrad")),
               "beta2": ("server.optimizer = 'fedadam' or 'fedyogi'",
                         lambda c: c.server.optimizer in ("fedadam", "fedyogi")),
               "eps": ("an adaptive server.optimizer (fedadam, fedyogi, fedadagrad)",
                       lambda c: c.server.optimizer in ("fedadam", "fedyogi", "fedadagrad"))},
    "secure": {k: ("secure.aggregation = true", lambda c: c.secure.aggregation)
               for k in ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_bits")},
    "attack": {"scale": ("attack.kind = 'scale'", lambda c: c.attack.kind == "scale"),
               "clients": ("an attack.kind other than 'none'", lambda c: c.attack.kind != "none")},
    "track": {"experiment": ("track.mlflow or track.wandb", lambda c: bool(c.track.mlflow or c.track.wandb))},
    "data": {"client_column": ("clients.partition = 'by_task' or data.instructions",
                               lambda c: c.clients.partition == "by_task" or bool(c.data.instructions))},
}
# keys only one task reads: each task class lists its own (fedlora.tasks, `own_keys`)


def _changed(section, default) -> list[str]:
    return [f.name for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]


def ignored_settings(cfg) -> list[tuple[str, str]]:
    """``(key, why)`` for every non-default setting that ``cfg``'s method and modes would not read."""
    from fedlora.methods import get_method
    from fedlora.registry import method_names

    default = type(cfg)()
    method = get_method(cfg.method)
    out: list[tuple[str, str]] = []
    if not cfg.dp.enabled:
        out += [(f"dp.{k}", "dp.enabled = false, so the run is not private and no DP setting is used; set "
                 "dp.enabled = true (or drop the key)") for k in _changed(cfg.dp, default.dp) if k != "enabled"]
    owners: dict[str, list[str]] = {}
    for name in method_names():
        for section in _reads(get_method(name)):
            owners.setdefault(section, []).append(name)
    reads_memory = method.needs_memory_model or "memory" in _reads(method)
    for section, names in sorted(owners.items()):
        if section in _reads(method) or (section == "memory" and reads_memory):
            continue
        who = ("layer-assignment methods (" + ", ".join(sorted(n for n in method_names()
                                                             if get_method(n).needs_memory_model)) + ")"
               if section == "memory" else "method " + " / ".join(repr(n) for n in sorted(names)))
        out += [(f"{section}.{k}", f"[{section}] is read only by {who}; method = {cfg.method!r} ignores it")
                for k in _changed(getattr(cfg, section), getattr(default, section))]
    from fedlora.tasks import TASKS

    ours = set(TASKS[cfg.data.task].own_keys)
    for name, task in sorted(TASKS.items()):
        for key in sorted(set(task.own_keys) - ours):
            section, field = key.split(".")
            if getattr(getattr(cfg, section), field) != getattr(getattr(default, section), field):
                out.append((key, f"it is read only with data.task = {name!r}"))
    for section, keys in _MODE_KEYS.items():
        changed = set(_changed(getattr(cfg, section), getattr(default, section)))
        if section == "server" and not method.accepts_server_optimizer:  # (server.optimizer: the engine refuses it)
            out += [(f"server.{k}", f"method {cfg.method!r} has its own server rule and no server optimiser")
                    for k in sorted(changed - {"optimizer"})]
            continue
        out += [(f"{section}.{k}", f"it is read only with {mode}") for k, (mode, used) in keys.items()
                if k in changed and not used(cfg)]
    return out


def _reads(method) -> tuple[str, ...]:
    reads = getattr(method, "reads_sections", None)
    return tuple(getattr(method, "config_sections", ())) if reads is None else tuple(reads)


def refuse_ignored(cfg) -> None:
    """``fedlora run``: raise :class:`ConfigError` naming every setting the run would ignore."""
    found = ignored_settings(cfg)
    if found:
        listed = "; ".join(f"{k} ({why})" for k, why in found)
        raise ConfigError(f"{len(found)} setting{'s' if len(found) > 1 else ''} would be ignored by this run: {listed}")


def non_private_dp(cfg):
    """``cfg`` with the ``[dp]`` section at its defaults when DP is off (what a non-private run reads of it)."""
    if cfg.dp.enabled:
        return cfg
    return dataclasses.replace(cfg, dp=type(cfg.dp)())


def result_settings(cfg):
    """``cfg`` as far as it determines a run's results: every setting the run ignores at its default, no ``[dp]`` of
    a non-private run, no ``[track]`` (where the results are reported).  Equal result settings, equal results: what a
    resumed run and a kept ``compare`` cell are checked against."""
    cfg = copy.deepcopy(non_private_dp(cfg))
    default = type(cfg)()
    for key, _ in ignored_settings(cfg):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, copy.deepcopy(getattr(getattr(default, section), name)))
    return dataclasses.replace(cfg, track=type(cfg.track)())

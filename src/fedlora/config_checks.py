"""Validation of an experiment configuration, at the door: the first invalid value is reported with its key, the
value and what is valid.  Pure: no file or model is opened here except checking that local paths exist.  Operates on
the section objects of :mod:`fedlora.config` without importing it (that module calls :func:`validate`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError


def _need(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"{key} must be {valid}, got {value!r}")


def _check_choices(obj: Any, prefix: str) -> None:
    for f in fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None:
            v = getattr(obj, f.name)
            _need(v in choices, f"{prefix}{f.name}", v, "one of " + ", ".join(repr(c) for c in choices))


def _check_model(m) -> None:
    """model.*"""
    _need(bool(m.name.strip()), "model.name", m.name, "a bundled alias, a model id or a local path")
    _need(8 <= m.max_length <= 8192, "model.max_length", m.max_length, "an integer in [8, 8192]")
    _need(m.threads >= 0, "model.threads", m.threads, "a non-negative integer")


def _check_lora(lo) -> None:
    """lora.*"""
    _need(lo.rank >= 1, "lora.rank", lo.rank, "a positive integer")
    _need(lo.alpha > 0 and math.isfinite(lo.alpha), "lora.alpha", lo.alpha, "a positive finite number")
    _need(0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "in [0, 1)")
    _need(len(lo.target_modules) > 0 and all(isinstance(t, str) and t for t in lo.target_modules),
          "lora.target_modules", lo.target_modules, "a non-empty list of module names")
    _check_ranks(lo)


def _check_data(d) -> None:
    """data.*"""
    for key in ("train", "validation"):
        _check_source(f"data.{key}", getattr(d, key))
    _need(bool(d.text_column), "data.text_column", d.text_column, "a column name")
    _need(bool(d.label_column), "data.label_column", d.label_column, "a column name")
    _need(d.max_train_examples >= 0, "data.max_train_examples", d.max_train_examples, "a non-negative integer")
    _need(d.max_eval_examples >= 0, "data.max_eval_examples", d.max_eval_examples, "a non-negative integer")
    _need(d.holdout >= 0, "data.holdout", d.holdout, "a non-negative integer")
    _need(d.holdout == 0 or d.task == "classification", "data.holdout", d.holdout,
          "0 for instruction tasks (carving a validation set from training rows is classification only)")
    _need(len(set(map(str, d.labels))) == len(d.labels), "data.labels", d.labels, "a list without duplicates")

    if d.task == "instruction":
        _need(bool(d.instruction_column), "data.instruction_column", d.instruction_column, "a column name")
        _need(bool(d.output_column), "data.output_column", d.output_column, "a column name")
        if d.instructions:
            _check_source("data.instructions", d.instructions)


def _check_clients(c) -> None:
    """clients.*"""
    _need(c.num >= 1 or (c.num == 0 and c.partition == "by_task"), "clients.num", c.num,
          "a positive integer (0 = every task is allowed only with clients.partition = 'by_task')")
    _need(c.heldout_tasks >= 0, "clients.heldout_tasks", c.heldout_tasks, "a non-negative integer")
    _need(c.heldout_tasks == 0 or c.partition == "by_task", "clients.heldout_tasks", c.heldout_tasks,
          "0 unless clients.partition = 'by_task'")
    _need(0.0 < c.fraction <= 1.0, "clients.fraction", c.fraction, "in (0, 1]")
    _need(c.dirichlet_alpha > 0, "clients.dirichlet_alpha", c.dirichlet_alpha, "a positive number")
    _need(0.0 <= c.val_fraction < 1.0, "clients.val_fraction", c.val_fraction, "in [0, 1)")
    _need(c.min_examples >= 1, "clients.min_examples", c.min_examples, "a positive integer")
    if c.proportions:
        _need(c.partition == "label_skew", "clients.proportions", c.proportions,
              "empty unless clients.partition = 'label_skew'")
        _need(len(c.proportions) == c.num, "clients.proportions", c.proportions,
              f"a list of {c.num} rows (one per client)")
        for i, row in enumerate(c.proportions):
            _need(isinstance(row, list) and row and all(isinstance(x, (int, float)) and x >= 0 for x in row)
                  and abs(sum(row) - 1.0) < 1e-6, f"clients.proportions[{i}]", row,
                  "a list of non-negative class proportions summing to 1")
        _need(len({len(r) for r in c.proportions}) == 1, "clients.proportions", c.proportions,
              "rows of equal length (one entry per class)")


def _check_train(t) -> None:
    """train.*"""
    _need(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "a positive finite number")
    _need(t.head_lr >= 0 and math.isfinite(t.head_lr), "train.head_lr", t.head_lr,
          "a non-negative finite number (0 = train.lr)")
    _need(0 < t.lr_decay <= 1, "train.lr_decay", t.lr_decay, "in (0, 1]")
    _need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "non-negative")
    _need(0 <= t.momentum < 1, "train.momentum", t.momentum, "in [0, 1)")
    _need(t.batch_size >= 1, "train.batch_size", t.batch_size, "a positive integer")
    _need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "a positive integer")
    _need(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
          f"a divisor of train.batch_size ({t.batch_size})")
    _need(t.local_steps >= 1, "train.local_steps", t.local_steps, "a positive integer")
    _need(t.local_epochs >= 0, "train.local_epochs", t.local_epochs, "non-negative")
    _need(t.client_group >= 1, "train.client_group", t.client_group, "a positive integer (1 = one client at a time)")
    _need(not (t.client_group > 1 and t.gradient_checkpointing), "train.client_group", t.client_group,
          "1 with train.gradient_checkpointing (recomputing a grouped forward would redraw its clients' dropout)")
    _need(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "a positive integer")
    _need(t.prox_mu >= 0 and math.isfinite(t.prox_mu), "train.prox_mu", t.prox_mu,
          "a non-negative finite number (0 = no proximal term)")


def _check_dp(p) -> None:
    """dp.*"""
    if p.enabled:
        _need(p.clip > 0 and math.isfinite(p.clip), "dp.clip", p.clip, "a positive finite number")
        _need(0 < p.delta < 1, "dp.delta", p.delta, "in (0, 1)")
        _need(p.noise_multiplier >= 0, "dp.noise_multiplier", p.noise_multiplier, "non-negative")
        _need(p.epsilon >= 0, "dp.epsilon", p.epsilon, "non-negative (0 = no target)")
        _need(p.noise_multiplier > 0 or (p.epsilon > 0 and math.isfinite(p.epsilon)), "dp.epsilon", p.epsilon,
              "a positive finite target when dp.noise_multiplier = 0 (set one of them)")


def _check_robust(r) -> None:
    """robust.*"""
    _need(0 <= r.trim_fraction < 0.5, "robust.trim_fraction", r.trim_fraction, "in [0, 0.5)")
    _need(r.norm_bound >= 0 and math.isfinite(r.norm_bound), "robust.norm_bound", r.norm_bound,
          "a non-negative finite number (0 = off)")
    _need(r.max_update_mb >= 0, "robust.max_update_mb", r.max_update_mb, "non-negative (0 = automatic)")


def _check_server(sv) -> None:
    """server.*"""
    _need(sv.lr >= 0 and math.isfinite(sv.lr), "server.lr", sv.lr, "a non-negative finite number (0 = the usual step)")
    _need(0 <= sv.momentum < 1, "server.momentum", sv.momentum, "in [0, 1)")
    _need(0 <= sv.beta1 < 1, "server.beta1", sv.beta1, "in [0, 1)")
    _need(0 <= sv.beta2 < 1, "server.beta2", sv.beta2, "in [0, 1)")
    _need(sv.eps > 0 and math.isfinite(sv.eps), "server.eps", sv.eps, "a positive finite number")


def _check_eval(ev) -> None:
    """eval.*"""
    _need(ev.every >= 1, "eval.every", ev.every, "a positive integer")
    _need(1 <= ev.max_new_tokens <= 2048, "eval.max_new_tokens", ev.max_new_tokens, "in [1, 2048]")
    _need(ev.generate_every >= 0, "eval.generate_every", ev.generate_every, "a non-negative integer")
    _need(ev.max_client_examples >= 0, "eval.max_client_examples", ev.max_client_examples,
          "a non-negative integer")


def _check_memory(mem) -> None:
    """memory.*"""
    for i, b in enumerate(mem.budgets):
        _need(isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 and math.isfinite(b),
              f"memory.budgets[{i}]", b, "a non-negative number")
    if mem.unit == "fraction":
        _need(all(b <= 1.0 for b in mem.budgets), "memory.budgets", mem.budgets, "fractions in [0, 1] (memory.unit = "
              "'fraction')")
    _need(mem.knapsack_unit_mb > 0, "memory.knapsack_unit_mb", mem.knapsack_unit_mb, "a positive number")


SECTION_CHECKS = {"model": _check_model, "lora": _check_lora, "data": _check_data, "clients": _check_clients,
                  "train": _check_train, "dp": _check_dp, "robust": _check_robust, "server": _check_server,
                  "eval": _check_eval, "memory": _check_memory}
"""The engine sections' own checks.  The sections methods own (``config_fields``) check themselves (their
``check()``); choices are checked for every section from the field metadata."""


def section_checks(cfg) -> dict:
    """Every section of ``cfg`` with its check: the engine's from :data:`SECTION_CHECKS`, a method section's own
    ``check`` method (None when it has nothing beyond its choices)."""
    return {f.name: SECTION_CHECKS.get(f.name) or getattr(type(getattr(cfg, f.name)), "check", None)
            for f in fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}


def validate(cfg) -> None:
    """Raise :class:`ConfigError` for the first invalid value (key, value, what is valid): the top-level keys, then
    each section by itself (:data:`SECTION_CHECKS`), then the checks that involve two sections."""
    from fedlora.registry import method_names

    methods = method_names()
    _need(cfg.method in methods, "method", cfg.method, "one of " + ", ".join(methods))
    _need(cfg.rounds >= 1, "rounds", cfg.rounds, "a positive integer")
    _need(cfg.seed >= 0, "seed", cfg.seed, "a non-negative integer")
    checks = section_checks(cfg)
    for name in checks:
        _check_choices(getattr(cfg, name), f"{name}.")
    for name, check in checks.items():
        if check is not None:
            check(getattr(cfg, name))
    _need(not (cfg.dp.enabled and cfg.train.precision != "fp32"), "train.precision", cfg.train.precision,
          "fp32 under DP-SGD (dp.enabled = true): per-example clipping in bfloat16 is not tested")
    lo, c = cfg.lora, cfg.clients
    if lo.rank_distribution == "explicit" and c.num:
        _need(len(lo.client_ranks) == c.num, "lora.client_ranks", lo.client_ranks,
              f"a list of {c.num} entries (one per client, clients.num = {c.num})")


def _rank_entry_ok(entry: Any) -> bool:
    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    return pos_int(entry) or (isinstance(entry, list) and len(entry) == 2 and all(pos_int(v) for v in entry))


def _check_ranks(lo) -> None:
    if lo.rank_distribution in ("uniform", "heavy_tail_light", "normal", "normal_code", "heavy_tail_strong"):
        _need(len(lo.rank_types) == 4, "lora.rank_types", lo.rank_types,
              "4 configuration types (FlexLoRA's distributions are defined over 4), each [attention, MLP] ranks")
    for i, entry in enumerate(lo.rank_types):
        _need(_rank_entry_ok(entry), f"lora.rank_types[{i}]", entry, "a positive rank or [attention, MLP] ranks")
    if lo.rank_distribution == "explicit":
        _need(len(lo.client_ranks) > 0, "lora.client_ranks", lo.client_ranks,
              "a non-empty list when lora.rank_distribution = 'explicit'")
    else:
        _need(not lo.client_ranks, "lora.client_ranks", lo.client_ranks,
              "empty unless lora.rank_distribution = 'explicit'")
    for i, entry in enumerate(lo.client_ranks):
        _need(_rank_entry_ok(entry), f"lora.client_ranks[{i}]", entry, "a positive rank or [attention, MLP] ranks")


def _check_source(key: str, source: str) -> None:
    if source.startswith("bundled:"):
        from fedlora.data.sources import BUNDLED

        name = source[len("bundled:"):]
        _need(name in BUNDLED, key, source, "one of " + ", ".join("bundled:" + b for b in BUNDLED))
    elif source.startswith("hf:"):
        _need(len(source) > 3, key, source, "'hf:DATASET_ID[:CONFIG]:SPLIT'")
    else:
        _need(Path(source).is_file(), key, source, "an existing data file (or bundled:…/hf:…)")

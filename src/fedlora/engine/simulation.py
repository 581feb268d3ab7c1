"""The in-process engine: every simulated client shares one frozen base model; adapters are swapped in and out.

The template loop (DESIGN.md)::

    plans = method.configure(t, state, sampled)            # what each client gets
    for plan: bytes_down = wire.encode(plan.download)      # measured traffic, safetensors
              update = train_client(plan, client data)     # local work (DP-SGD optional)
              bytes_up = wire.encode(update.tensors)       # validated on arrival
    state = method.aggregate(t, state, updates)
    evaluate, log (metrics.jsonl / metrics.csv / metrics.png)

Everything a run needs before the model loads (config, data, partition, DP budget) is checked first, so bad input
fails in seconds with a clear message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedlora import wire
from fedlora.adapters import Adapter, LoraModule
from fedlora.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from fedlora.client import layer_gradient_norms, steps_per_round, train_client
from fedlora.config import ExperimentConfig, from_toml, to_dict, to_toml
from fedlora.data.partition import partition, split_local
from fedlora.data.tasks import ClassificationTask
from fedlora.errors import ConfigError, UpdateError
from fedlora.layers import block_index, modules_of, submodel
from fedlora.memory import release_freed_memory, return_large_frees_promptly
from fedlora.methods import available_methods, get_method
from fedlora.methods.base import FederationSpec, ServerState, Update
from fedlora.models import (ADAPTER_INFO, AdapterPool, BaseWeights, WeightFile, adapter_info, check_ranks,
                            export_peft_adapter, inject_lora, load_causal_lm, load_classifier, resolve_model_path,
                            target_shapes)
from fedlora.privacy import ClientAccountant, ClientPrivacy, plan_privacy
from fedlora.ranks import RankConfig, client_rank_configs, describe_config, module_ranks, smallest_config
from fedlora.report import MetricsLog, plot_run
from fedlora.robust import bound_norm


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


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict]
    adapter: Adapter

    @property
    def final_accuracy(self) -> float:
        accs = [r["accuracy"] for r in self.metrics if r.get("accuracy") is not None]
        return accs[-1] if accs else float("nan")


def sample_clients(seed: int, round_idx: int, num_clients: int, fraction: float) -> list[int]:
    """``max(⌊fraction·N⌋, 1)`` distinct clients, the same set for the same (seed, round) (oracle O29)."""
    m = max(int(fraction * num_clients + 1e-9), 1)
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx, 3])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def make_task(cfg: ExperimentConfig):
    if cfg.data.task == "instruction":
        from fedlora.data.instruction import InstructionTask

        return InstructionTask(cfg.data, seed=cfg.seed)
    return ClassificationTask(cfg.data, seed=cfg.seed)


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


def _check_method_options(cfg: ExperimentConfig, method_cls) -> None:
    if not method_cls.averages_tensors:
        r = cfg.robust
        if r.aggregation != "mean" or r.norm_bound > 0:
            raise ConfigError(f"method {cfg.method!r} does not average tensors, so robust.aggregation = "
                              f"{r.aggregation!r} / robust.norm_bound = {r.norm_bound} cannot apply; use fedit or ffa "
                              f"for robust aggregation")
    if not method_cls.accepts_server_optimizer and (cfg.server.optimizer != "fedavg" or cfg.server.lr not in (0, 1)):
        own = f" ({method_cls.own_server_step})" if method_cls.own_server_step else ""
        raise ConfigError(f"method {cfg.method!r} does not aggregate by averaging uploaded tensors{own}, so "
                          f"server.optimizer = {cfg.server.optimizer!r} / server.lr = {cfg.server.lr} cannot apply; "
                          f"server optimisers work with: {', '.join(_server_optimizer_methods())}")
    if method_cls.needs_memory_model and not cfg.memory.budgets:
        raise ConfigError(f"method {cfg.method!r} assigns LoRA layers within each client's memory budget: set "
                          f"memory.budgets (e.g. [0.5, 0.75, 1.0] with memory.unit = 'fraction')")
    if method_cls.needs_memory_model and cfg.dp.enabled:
        raise ConfigError(f"method {cfg.method!r} with dp.enabled: layer-assignment methods do not support DP-SGD yet")
    if cfg.method == "hetlora" and cfg.dp.enabled and cfg.hetlora.penalty > 0:
        raise ConfigError("hetlora.penalty is not part of the privatised gradient: set hetlora.penalty = 0 with "
                          "dp.enabled = true")
    if cfg.data.task == "instruction" and cfg.lora.head == "aggregate":
        pass  # causal LMs have no separate head: nothing to aggregate


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load and check data, partition it, assign client ranks and plan DP — no model is touched."""
    method_cls = get_method(cfg.method)
    _check_method_options(cfg, method_cls)
    task = make_task(cfg)
    heldout: list[str] = []
    global_rows = None
    if cfg.clients.partition == "by_task":
        clients, global_rows, heldout = _by_task(cfg, task)
    else:
        if cfg.data.task == "instruction":
            raise ConfigError("data.task = 'instruction' needs clients.partition = 'by_task' (one client per task "
                              "or owner, data.client_column)")
        parts = partition(task.train_labels, task.num_labels, cfg)
        clients = []
        for k, rows in enumerate(parts):
            tr, va = split_local(rows, cfg.clients.val_fraction, cfg.seed, k)
            clients.append(ClientData(tr, _capped(va, cfg.eval.max_client_examples, cfg.seed, k)))
    configs = client_rank_configs(cfg.lora, len(clients), cfg.seed)
    if len(configs) != len(clients):
        raise ConfigError(f"lora.client_ranks has {len(configs)} entries but there are {len(clients)} clients")
    if not method_cls.heterogeneous_ranks:
        configs = [smallest_config(configs)] * len(clients)
    prepared = Prepared(cfg, task, clients, rank_configs=configs, global_eval_rows=global_rows, heldout=heldout)
    if cfg.dp.enabled:
        sizes = {k: len(c.train_rows) for k, c in enumerate(clients)}
        steps = {k: steps_per_round(cfg.train, n) for k, n in sizes.items()}
        prepared.privacy = plan_privacy(cfg.dp, sizes, steps, cfg.rounds, cfg.train.batch_size)
    return prepared


def partition_digest(prepared: Prepared) -> str:
    """SHA-256 of every client's train/validation row indices: equal digests mean identical client data."""
    import hashlib

    rows = [[c.train_rows, c.val_rows] for c in prepared.clients]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.method}"


def _open_run_dir(path: Path) -> Path:
    path = Path(path)
    if (path / "metrics.jsonl").exists() or (path / "adapter").exists():
        raise ConfigError(f"run directory {path} already holds a run; continue it with --resume {path} or choose "
                          f"another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot use {path} as the run directory: {exc.strerror or exc}") from None
    return path


def fault_point(phase: str, round_idx: int) -> None:
    """Fault injection for reliability tests: ``FEDLORA_FAULT=PHASE@ROUND`` kills this process (SIGKILL, like a
    power cut) when the run reaches that phase of that round.  Phases: ``train`` (after the first client trained),
    ``aggregate`` (after aggregation and evaluation), ``checkpoint`` (tensor file written, commit point not yet),
    ``metrics`` (checkpoint committed, metrics files not yet appended)."""
    if os.environ.get("FEDLORA_FAULT") == f"{phase}@{round_idx}":
        os.kill(os.getpid(), signal.SIGKILL)


def check_resume_config(saved_toml: str, cfg: ExperimentConfig) -> None:
    """A resumed run must use the configuration it started with; only ``rounds`` may grow."""
    saved = to_dict(from_toml(saved_toml, "the checkpoint's config"))
    now = to_dict(cfg)
    diffs = []
    for section, values in now.items():
        if isinstance(values, dict):
            diffs += [f"{section}.{k}: {saved[section][k]!r} -> {v!r}" for k, v in values.items()
                      if saved[section][k] != v]
        elif section != "rounds" and saved[section] != values:
            diffs.append(f"{section}: {saved[section]!r} -> {values!r}")
    if now["rounds"] < saved["rounds"]:
        diffs.append(f"rounds: {saved['rounds']} -> {now['rounds']} (rounds may only grow)")
    if diffs:
        raise CheckpointError("the configuration differs from the one the run started with: " + "; ".join(diffs)
                              + ". Resume with the run's own config.toml (only rounds may be raised).")


class LazyExamples:
    """Client k's tokenised examples, made on first use and kept in a bounded cache: simulating thousands of
    clients never holds every client's tokens at once."""

    def __init__(self, make, n: int, cache_size: int = 256):
        self.make, self.n, self.cache_size = make, n, cache_size
        self._cache: dict[int, object] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        if k not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = self.make(k)
        return self._cache[k]


INITIAL_CACHE_PARAMETERS = 8_000_000  # cached fresh initial adapters: 32 MB of fp32 at most; a larger one is not kept


@dataclass
class Engine:
    """The loaded model and what the round loop needs beside the method: adapters per rank configuration, the
    controllable base weights, every client's examples and the global evaluation set."""

    prepared: Prepared
    tokenizer: object
    model: object
    pool: AdapterPool
    base: BaseWeights
    spec: FederationSpec
    task_type: str
    client_train: object
    client_val: object
    global_val: object
    default_ranks: dict[str, int]
    _initial_cache: dict = field(default_factory=dict)
    _templates: dict = field(default_factory=dict)

    def initial_for(self, ranks: dict[str, int], seed: int | None) -> Adapter:
        """The fresh initial adapter at these ranks (seeded), cached most-recently-used first within
        :data:`INITIAL_CACHE_PARAMETERS` parameters, so that a population with many rank configurations does not
        keep one full adapter per configuration."""
        key = (tuple(sorted(ranks.items())), seed)
        cache = self._initial_cache
        if key in cache:
            cache[key] = cache.pop(key)  # most recent last
            return cache[key]
        adapter = self.spec.initial(ranks=ranks, seed=seed)
        if adapter.num_parameters() <= INITIAL_CACHE_PARAMETERS:
            cache[key] = adapter
            while sum(a.num_parameters() for a in cache.values()) > INITIAL_CACHE_PARAMETERS:
                cache.pop(next(iter(cache)))
        return adapter

    def template_for(self, ranks: dict[str, int]) -> Adapter:
        """An adapter of these ranks with storage-less (``meta``) tensors: keys, shapes and dtypes for checking
        uploads, at no memory cost."""
        key = tuple(sorted(ranks.items()))
        if key not in self._templates:
            init = self.spec.initial(ranks=ranks)
            self._templates[key] = Adapter(
                {n: LoraModule(m.A.to("meta"), m.B.to("meta"), m.alpha) for n, m in init.modules.items()},
                {k: v.to("meta") for k, v in init.head.items()})
        return self._templates[key]


def build_engine(prepared: Prepared, log=print) -> Engine:
    """Load the base model once, wrap it with LoRA at the global ranks and tokenise (lazily) every client's data."""
    cfg, task = prepared.cfg, prepared.task
    if cfg.data.task == "instruction":
        if cfg.model.name in ("smollm2",):
            from fedlora.models import converted_gguf

            converted_gguf(cfg.model.name, cfg.model, log=log)
        tokenizer, base_model = load_causal_lm(cfg.model)
        task_type = "CAUSAL_LM"
    else:
        tokenizer, base_model = load_classifier(cfg.model, task.num_labels, cfg.seed,
                                                zero_head_ok=not get_method(cfg.method).scores_layers_by_gradient)
        task_type = "SEQ_CLS"
    shapes = target_shapes(base_model, cfg.lora)
    client_ranks = {k: module_ranks(c, shapes, cfg.lora.mlp_modules) for k, c in enumerate(prepared.rank_configs)}
    for config in sorted(set(prepared.rank_configs)):
        what = "lora.rank" if cfg.lora.rank_distribution == "homogeneous" else f"client rank type {describe_config(config)}"
        check_ranks(shapes, module_ranks(config, shapes, cfg.lora.mlp_modules), what)
    global_ranks = {n: max(r[n] for r in client_ranks.values()) for n in shapes}
    alpha_per_rank = get_method(cfg.method).alpha_per_rank(cfg)
    model = inject_lora(base_model, cfg.lora, task_type, ranks=global_ranks, alpha_per_rank=alpha_per_rank)
    pool = AdapterPool(model, cfg.lora, task_type, alpha_per_rank=alpha_per_rank)
    slots = pool.slots(global_ranks)
    spec = FederationSpec(slots.shapes, client_ranks, cfg.lora.alpha, cfg.seed, head=slots.head(),
                          alpha_per_rank=alpha_per_rank)
    if get_method(cfg.method).needs_memory_model:
        _attach_memory_model(spec, model, prepared, task_type, log)
    L = cfg.model.max_length
    if cfg.data.task == "instruction":
        def rows(idx, source):
            return [source[i] for i in idx]

        clients = prepared.clients
        client_train = LazyExamples(lambda k: task.tokenise(tokenizer, rows(clients[k].train_rows, task.train_rows), L),
                                    len(clients))
        client_val = LazyExamples(lambda k: task.tokenise(tokenizer, rows(clients[k].val_rows, task.val_rows), L),
                                  len(clients))
        global_val = task.tokenise(tokenizer, rows(prepared.global_eval_rows, task.val_rows), L)
    else:
        train_all = task.tokenise(tokenizer, task.train_rows, task.train_labels, L)
        val_all = task.tokenise(tokenizer, task.val_rows, task.val_labels, L)
        client_train = [train_all.subset(c.train_rows) for c in prepared.clients]
        client_val = [(val_all if c.val_from_validation else train_all).subset(c.val_rows) for c in prepared.clients]
        global_val = val_all if prepared.global_eval_rows is None else val_all.subset(prepared.global_eval_rows)
    base = BaseWeights(model, WeightFile.of_model(resolve_model_path(cfg.model.name, cfg.model)))
    return Engine(prepared, tokenizer, model, pool, base, spec, task_type, client_train, client_val,
                  global_val, global_ranks)


def _attach_memory_model(spec: FederationSpec, model, prepared: Prepared, task_type: str, log) -> None:
    """Layer groups, the (calibrated) memory model of one training step and every client's budget in bytes."""
    from fedlora.layers import layer_groups
    from fedlora.memory import analytic_activation_bytes, build_memory_model, profile_step

    cfg = prepared.cfg
    spec.layer_groups = layer_groups(spec.shapes)
    blocks = [block_index(group[0]) for group in spec.layer_groups]
    if blocks != list(range(len(blocks))):  # layer j of the memory model must be block j of the model
        raise ConfigError(f"layer-assignment methods need LoRA on every transformer block; lora.target_modules "
                          f"match blocks {blocks[:8]}{'…' if len(blocks) > 8 else ''} only")
    ranks = spec.global_ranks()
    params = [sum(ranks[m] * sum(spec.shapes[m]) for m in group) for group in spec.layer_groups]
    mc = model.base_model.model.config
    hidden = getattr(mc, "hidden_size", 768)
    prior = analytic_activation_bytes(cfg.train.batch_size, cfg.model.max_length, hidden,
                                      getattr(mc, "num_attention_heads", 12),
                                      getattr(mc, "intermediate_size", 4 * hidden))
    measure = None
    if cfg.memory.calibrate:
        log("calibrating the memory model: profiling two training steps in child processes")
        profile = dict(model=cfg.model.name, cache_dir=cfg.model.cache_dir,
                       task="instruction" if task_type == "CAUSAL_LM" else "classification",
                       num_labels=getattr(prepared.task, "num_labels", 2), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       targets=list(cfg.lora.target_modules), batch=cfg.train.batch_size, seq=cfg.model.max_length,
                       threads=1)

        def measure(layers):
            return profile_step({**profile, "layers": list(layers)})["measured"]
    spec.memory = build_memory_model(params, prior, calibrate_with=measure)
    full = spec.memory.predict(range(len(spec.layer_groups)))
    scale = full if cfg.memory.unit == "fraction" else 1e6
    b = cfg.memory.budgets
    spec.budgets = {k: float(b[k % len(b)]) * scale for k in range(len(prepared.clients))}
    log(f"memory model: one step training every layer needs {full / 1e6:.1f} MB above the loaded model "
        f"({'calibrated' if spec.memory.calibrated else 'analytical'}); budgets "
        f"{sorted({round(v / 1e6, 1) for v in spec.budgets.values()})} MB")


def _write_clients_file(run_dir: Path, prepared: Prepared, spec: FederationSpec) -> None:
    """``clients.json``: every client's task, data sizes and LoRA ranks (written once, at the start)."""
    rows = [{"client": k, "task": c.name or None, "train_examples": len(c.train_rows),
             "validation_examples": len(c.val_rows), "rank_type": describe_config(prepared.rank_configs[k]),
             "ranks": sorted(set(spec.client_ranks[k].values()))} for k, c in enumerate(prepared.clients)]
    data = {"clients": rows, "heldout_tasks": prepared.heldout}
    if spec.memory is not None:
        for row in rows:
            row["memory_budget_mb"] = spec.budgets[row["client"]] / 1e6
        mm = spec.memory
        data["memory_model"] = {"calibrated": mm.calibrated, "step_mb": mm.step_bytes / 1e6,
                                "per_layer_activation_mb": [a / 1e6 for a in mm.act_bytes],
                                "per_layer_grad_and_optimiser_mb": [g / 1e6 for g in mm.grad_state_bytes],
                                "all_layers_mb": mm.predict(range(mm.num_layers)) / 1e6,
                                "calibration_measurements_mb": {k: v / 1e6 for k, v in mm.measurements.items()}}
    (run_dir / "clients.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   log=print, resume: bool = False, collect=None) -> RunResult:
    """Run (or, with ``resume=True``, continue from ``out_dir``'s last checkpoint) an experiment.

    ``collect(t, plans, engine, prepared, accountant, progress, method, stream) -> RoundUpdates`` runs the clients
    of a round; the default trains them in this process, the Flower engine sends them to SuperNodes."""
    threads = torch.get_num_threads()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    try:
        return _run(cfg, out_dir, progress, log, resume, collect or _collect_updates)
    finally:
        torch.set_num_threads(threads)  # model.threads is this run's, not the caller's process-wide setting


def _run(cfg: ExperimentConfig, out_dir, progress: bool, log, resume: bool, collect) -> RunResult:
    t_start = time.time()
    return_large_frees_promptly()
    ckpt = None
    if resume:
        if out_dir is None:
            raise CheckpointError("resume needs the run directory")
        ckpt = load_checkpoint(Path(out_dir))
        check_resume_config(ckpt.config_toml, cfg)
    prepared = prepare(cfg)
    run_dir = _open_run_dir(Path(out_dir) if out_dir else _default_run_dir(cfg)) if ckpt is None else Path(out_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    n_clients = len(prepared.clients)
    sizes = [len(c.train_rows) for c in prepared.clients]
    shown = ", ".join(map(str, sizes)) if n_clients <= 16 else f"{min(sizes)}–{max(sizes)} each, {sum(sizes)} in all"
    log(f"fedlora: {cfg.method} on {cfg.model.name}, {n_clients} clients ({shown} training examples), "
        f"{cfg.rounds} rounds -> {run_dir}")
    if prepared.heldout:
        log(f"unseen (held-out) tasks: {len(prepared.heldout)}, {len(prepared.global_eval_rows)} evaluation rows")

    eng = build_engine(prepared, log)
    if len(set(prepared.rank_configs)) > 1 or cfg.lora.rank_distribution != "homogeneous":
        counts: dict[str, int] = {}
        for c in prepared.rank_configs:
            counts[describe_config(c)] = counts.get(describe_config(c), 0) + 1
        log("client ranks: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    _write_clients_file(run_dir, prepared, eng.spec)
    method = get_method(cfg.method)(cfg, eng.spec)
    state = method.init_state(eng.spec.initial(ranks=eng.default_ranks))
    accountant = ClientAccountant()
    metrics = MetricsLog(run_dir)
    start = 1
    if ckpt is not None:
        state = ServerState(ckpt.state.adapter, ckpt.state.extra)
        accountant.load_state_dict(ckpt.accountant)
        metrics.replace(ckpt.metrics)  # drops any row written after the last committed checkpoint
        restore_rng(ckpt.rng)
        start = ckpt.round + 1
        log(f"resuming {run_dir} after round {ckpt.round} of {cfg.rounds}")
    plans, train_roles = [], None

    for t in range(start, cfg.rounds + 1):
        t0 = time.time()
        sampled = sample_clients(cfg.seed, t, n_clients, cfg.clients.fraction)
        plans = method.configure(t, state, sampled)
        eng.base.set(method.base_delta(state))  # FLoRA: every client's base holds the merged updates so far
        stream = method.begin(t, state, plans) if hasattr(method, "accumulate") else None
        received = collect(t, plans, eng, prepared, accountant, progress, method, stream)
        state = method.finish(t, state, stream) if stream is not None else method.aggregate(t, state, received.updates)
        train_roles = plans[0].train if plans else train_roles
        stream = plans = None  # the round's downloads are not kept past it
        release_freed_memory()
        row = _round_row(t, received, prepared, accountant, cfg)
        if t % cfg.eval.every == 0 or t == cfg.rounds:
            generate = t == cfg.rounds or (cfg.eval.generate_every > 0 and t % cfg.eval.generate_every == 0)
            row.update(_evaluate_global(eng, method, state, generate))
            release_freed_memory()
        row["wall_s"] = round(time.time() - t0, 3)
        fault_point("aggregate", t)
        save_checkpoint(run_dir, t, state, accountant.state_dict(), metrics.rows + [row], to_toml(cfg),
                        fault=fault_point)
        fault_point("metrics", t)
        metrics.append(row)
        plot_run(metrics.rows, run_dir / "metrics.png", title=f"{cfg.method} · {cfg.model.name}")
        log(_round_line(row, cfg))

    final = method.export_adapter(state)
    _export(eng, method, state, final, run_dir)
    headline = "rougeL" if cfg.data.task == "instruction" else "accuracy"
    last = metrics.rows[-1]
    first_client = {c: k for k, c in reversed(list(enumerate(prepared.rank_configs)))}  # one client per configuration
    trainable = {describe_config(c): eng.spec.initial(ranks=eng.spec.client_ranks[k]).num_parameters(train_roles)
                 for c, k in sorted(first_client.items())} if train_roles else {}
    summary = {"method": cfg.method, "rounds": cfg.rounds, "final_accuracy": last.get("accuracy"),
               "headline_metric": headline, "final_score": last.get(headline),
               "total_upload_bytes": sum(r["upload_bytes"] for r in metrics.rows),
               "total_download_bytes": sum(r["download_bytes"] for r in metrics.rows),
               "max_epsilon": max((r["epsilon"] or 0.0) for r in metrics.rows) if cfg.dp.enabled else None,
               "wall_s": round(time.time() - t_start, 1),
               "trainable_parameters_per_client": (next(iter(trainable.values())) if len(trainable) == 1
                                                   else trainable) if trainable else None,
               "client_train_examples": sizes if n_clients <= 64 else None,
               "num_clients": n_clients,
               "heldout_tasks": prepared.heldout,
               "partition_sha256": partition_digest(prepared)}
    if cfg.data.task == "instruction":
        summary["final_rougeL_teacher_forced"] = last.get("rougeL_teacher_forced")
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "summary.json")  # written last: its presence marks a complete run
    score = summary["final_score"]
    what = "validation accuracy" if headline == "accuracy" else ("unseen-task " if prepared.heldout else "") + "rougeL"
    log(f"final {what}: {score:.4f}  ({summary['wall_s']} s)  -> {run_dir}" if score is not None
        else f"done ({summary['wall_s']} s) -> {run_dir}")
    return RunResult(run_dir, metrics.rows, final)


def _fits(adapter: Adapter, ranks: dict[str, int]) -> bool:
    return {n: m.rank for n, m in adapter.modules.items()} == ranks


class _MergedDelta(Mapping):
    """``base_delta[m] + s·B_m·A_m`` per module, computed when :meth:`BaseWeights.set` reads it: a full-size global
    adapter is merged one module at a time, never as a dictionary of every dense delta."""

    def __init__(self, base_delta: dict | None, adapter: Adapter):
        self.base, self.adapter = base_delta or {}, adapter
        self.names = list(dict.fromkeys([*self.base, *adapter.modules]))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        delta = self.adapter.modules[name].delta().float() if name in self.adapter.modules else None
        if name in self.base:
            return self.base[name] + delta if delta is not None else self.base[name]
        return delta

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _evaluate_global(eng: Engine, method, state: ServerState, generate: bool) -> dict:
    """Score the global model: loaded into the LoRA slots when its ranks fit them, else merged into the base
    (``W0 + offset + s·B·A``, exact, with the slots' B set to zero); the base is restored afterwards."""
    global_adapter = method.global_adapter(state)
    base_delta = method.base_delta(state)
    slots = eng.pool.slots(eng.default_ranks)
    if _fits(global_adapter, eng.default_ranks):
        slots.load(global_adapter)
        eng.base.set(base_delta)
    else:
        slots.load_base_only(dict(global_adapter.head))
        eng.base.set(_MergedDelta(base_delta, global_adapter))
    try:
        return _evaluate(eng, generate)
    finally:
        eng.base.set(base_delta)


def per_client_evaluation(cfg: ExperimentConfig) -> bool:
    """``eval.per_client``, except under DP: a client's accuracy on its own validation rows is a statistic of its
    data released outside the privacy accounting, so private runs score the global model on the server's
    validation set only."""
    return bool(cfg.eval.per_client) and not cfg.dp.enabled


def _evaluate(eng: Engine, generate: bool) -> dict:
    """Global model on the (unseen-task) validation set, and on each client's local validation split."""
    cfg, task = eng.prepared.cfg, eng.prepared.task
    bs = cfg.train.eval_batch_size
    if cfg.data.task == "instruction":
        ev = task.evaluate(eng.model, eng.tokenizer, eng.global_val, bs, generate=generate,
                           max_new_tokens=cfg.eval.max_new_tokens)
        row = {"eval_loss": ev["loss"], "rougeL_teacher_forced": ev["rougeL_teacher_forced"]}
        if "rougeL" in ev:
            row["rougeL"] = ev["rougeL"]
        if per_client_evaluation(cfg):
            per = {}
            for k, c in enumerate(eng.prepared.clients):
                if c.val_rows:
                    per[k] = task.evaluate(eng.model, eng.tokenizer, eng.client_val[k], bs, generate=False,
                                           max_new_tokens=1)["rougeL_teacher_forced"]
            row["client_rougeL_teacher_forced"] = per
            row["client_rougeL_teacher_forced_mean"] = float(np.mean(list(per.values()))) if per else None
        return row
    ev = task.evaluate(eng.model, eng.global_val, bs)
    row = {"accuracy": ev["accuracy"], "eval_loss": ev["loss"]}
    if per_client_evaluation(cfg):
        per = {k: task.evaluate(eng.model, eng.client_val[k], bs)["accuracy"]
               for k in range(len(eng.prepared.clients)) if len(eng.client_val[k])}
        row["client_accuracy"] = per
        row["client_accuracy_mean"] = float(np.mean(list(per.values()))) if per else None
        row["client_accuracy_min"] = float(np.min(list(per.values()))) if per else None
    return row


def _export(eng: Engine, method, state: ServerState, final: Adapter, run_dir: Path) -> None:
    """Write ``adapter/`` atomically (temporary folder, then rename): PEFT's own ``save_pretrained`` when the final
    adapter fits the model's LoRA layers, else a PEFT folder with per-module ranks (``rank_pattern``)."""
    import shutil

    tmp, target = run_dir / "adapter.tmp", run_dir / "adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    if _fits(final, eng.default_ranks) and method.base_delta(state) is None:
        eng.pool.slots(eng.default_ranks).load(final)
        eng.model.save_pretrained(str(tmp), selected_adapters=["default"])
    else:
        export_peft_adapter(final, eng.prepared.cfg.lora, eng.task_type,
                            resolve_model_path(eng.prepared.cfg.model.name, eng.prepared.cfg.model), tmp)
    cfg = eng.prepared.cfg
    info = adapter_info(eng.model, cfg, getattr(eng.prepared.task, "label_names", None))
    (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


@dataclass
class RoundUpdates:
    """What the server received in one round: accepted updates, drops with reasons, traffic and update norms."""

    updates: list[Update] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    up_bytes: int = 0
    down_bytes: int = 0
    reports: dict[int, dict] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)  # sampled clients whose reply never came (Flower)


def _peak_reset() -> int:
    """Reset the process's peak-RSS mark and return the current RSS (measured client memory, Linux)."""
    from fedlora.memory import _reset_peak, _rss_status

    try:
        _reset_peak()
        return _rss_status()[0]
    except OSError:  # pragma: no cover - no /proc
        return 0


def _peak_rss() -> int:
    from fedlora.memory import _rss_status

    try:
        return _rss_status()[1]
    except OSError:  # pragma: no cover
        return 0


def _collect_updates(t, plans, eng: Engine, prepared, accountant, progress, method=None, stream=None) -> RoundUpdates:
    """Send each plan over the wire, train the client, receive and check its upload (bytes counted both ways).
    With a ``stream`` (methods that aggregate incrementally) each accepted upload goes straight into the method's
    accumulator and its tensors are not kept: server memory does not grow with the number of sampled clients."""
    cfg = prepared.cfg
    out = RoundUpdates()
    bar = tqdm(plans, desc=f"round {t}/{cfg.rounds}", unit="client", disable=not progress, leave=False,
               file=sys.stderr)
    for plan in bar:
        payload = wire.encode(plan.download)
        out.down_bytes += len(payload)
        if plan.merge:
            out.down_bytes += len(wire.encode(plan.merge))
        sent = dataclasses.replace(plan, download=wire.decode(payload))
        del payload
        blob, update = client_work(eng, sent, t, method)
        del sent
        receive_upload(eng, plan, blob, update, out, accountant, method, stream)
        del blob
        if "loss" in update.metrics:
            bar.set_postfix(loss=f"{update.metrics['loss']:.3f}")
        release_freed_memory()
        fault_point("train", t)
    bar.close()
    return out


def client_work(eng: Engine, plan, t: int, method=None) -> tuple[bytes, Update]:
    """A client's side of round ``t``, the same in every engine: (Fed-piLot: IG-Score and its own knapsack), start
    from the initial adapter with the plan's download in place, train locally (DP-SGD when the client has a privacy
    plan), and encode the upload.  Returns the upload's bytes and the update without tensors."""
    cfg, task = eng.prepared.cfg, eng.prepared.task
    ranks = plan.ranks or eng.spec.client_ranks[plan.client_id]
    slots = eng.pool.slots(ranks)
    seed = plan.config.get("init_seed")
    report: dict = {}
    if plan.config.get("select") == "pilot":  # client side: IG-Score on local data, then its own knapsack
        scores = layer_gradient_norms(model=eng.model, slots=slots, initial=eng.initial_for(ranks, seed), plan=plan,
                                      examples=eng.client_train[plan.client_id], loss_fn=task.loss,
                                      groups=eng.spec.layer_groups, num_examples=cfg.pilot.ig_examples,
                                      batch_size=cfg.train.batch_size, round_idx=t, seed=cfg.seed)
        layers, report = method.select(plan, scores)
        report["ig_gradient_norms"] = scores
        plan = dataclasses.replace(plan, modules=modules_of(layers, eng.spec.layer_groups))
    if plan.modules is not None:
        report["layers"] = sorted({block_index(m) for m in plan.modules})
        mm = eng.spec.memory  # FedRA's sub-model skips the blocks it did not draw: its own memory model
        report["memory_predicted_mb"] = (mm.predict_submodel if plan.config.get("submodel") else mm.predict)(
            report["layers"]) / 1e6
    if plan.modules is not None and not plan.modules and not (plan.train & {"head"}):
        update = Update(plan.client_id, len(eng.client_train[plan.client_id]), {},
                        {"loss": float("nan"), "skipped": 1.0, "steps": 0.0})  # nothing fits its budget: sits out
    else:
        # the client's starting point goes into the slots here, and neither it nor the download is held while it
        # trains (a rank-56 SmolLM2 adapter is 68 MB)
        slots.load(eng.initial_for(ranks, seed).with_tensors(plan.download))
        plan = dataclasses.replace(plan, download={})
        rss_before = _peak_reset() if plan.modules is not None else None
        with (submodel(eng.model, report["layers"]) if plan.config.get("submodel") else contextlib.nullcontext()):
            update = train_client(model=eng.model, slots=slots, initial=None, plan=plan,
                                  examples=eng.client_train[plan.client_id], loss_fn=task.loss, train_cfg=cfg.train,
                                  round_idx=t, seed=cfg.seed, privacy=eng.prepared.privacy.get(plan.client_id),
                                  accountant=None, secure_rng=cfg.dp.secure_rng)
        if rss_before is not None:
            report["memory_measured_mb"] = (_peak_rss() - rss_before) / 1e6
    update.report.update(report)
    blob = wire.encode(update.tensors)
    return blob, dataclasses.replace(update, tensors={})  # from here on only the bytes travel


def receive_upload(eng: Engine, plan, blob: bytes, update: Update, out: RoundUpdates, accountant,
                   method=None, stream=None) -> None:
    """The server's side of one client's round: account its DP-SGD steps, check the upload (a bad one is dropped
    with its reason), bound its norm if configured, and fold it into the method's accumulator or keep it."""
    cfg = eng.prepared.cfg
    out.up_bytes += len(blob)
    privacy = eng.prepared.privacy.get(plan.client_id)
    if privacy is not None and update.metrics.get("steps"):
        accountant.step(plan.client_id, privacy.noise_multiplier, privacy.sample_rate, int(update.metrics["steps"]))
    ranks = plan.ranks or eng.spec.client_ranks[plan.client_id]
    if update.report.get("layers") is not None and plan.modules is None:  # the client chose its layers
        plan = dataclasses.replace(plan, modules=modules_of(update.report["layers"], eng.spec.layer_groups))
    received, reason = _receive(blob, plan, eng.template_for(ranks), cfg)
    if reason is not None:
        out.dropped[plan.client_id] = reason
        return
    if cfg.robust.norm_bound > 0:
        start = eng.initial_for(ranks, plan.config.get("init_seed")).with_tensors(plan.download)
        received, out.norms[plan.client_id] = bound_norm(received, plan.uploaded(start), cfg.robust.norm_bound)
    if stream is not None:
        method.accumulate(stream, Update(update.client_id, update.num_examples, received, update.metrics))
        received = {}
    out.updates.append(Update(update.client_id, update.num_examples, received, update.metrics, update.report))
    if update.report:
        out.reports[plan.client_id] = update.report


def _receive(blob: bytes, plan, initial: Adapter, cfg) -> tuple[dict, str | None]:
    """Server-side checks of one upload; a bad one is dropped with its reason instead of stopping the run."""
    try:
        limit = int(cfg.robust.max_update_mb * 1e6)
        return wire.receive_update(blob, plan.uploaded(initial), who=f"client {plan.client_id}",
                                   max_bytes=limit), None
    except UpdateError as exc:
        return {}, str(exc)


def _round_row(t, received: RoundUpdates, prepared, accountant, cfg) -> dict:
    updates = received.updates
    trained = [u for u in updates if not u.metrics.get("skipped") and "loss" in u.metrics]  # none under DP
    n = sum(u.num_examples for u in trained)
    loss = sum(u.metrics["loss"] * u.num_examples for u in trained) / n if n else None
    row = {"round": t, "loss": loss, "accuracy": None, "eval_loss": None, "upload_bytes": received.up_bytes,
           "download_bytes": received.down_bytes, "epsilon": None, "clients": len(updates),
           "rejected": len(received.dropped)}
    if received.dropped:
        row["dropped"] = received.dropped
    if received.missing:
        row["missing"] = received.missing
    if received.norms:
        row["update_norm"] = received.norms
    for key in ("layers", "memory_predicted_mb", "memory_measured_mb"):
        per = {k: r[key] for k, r in received.reports.items() if key in r}
        if per:
            row[f"{key}_per_client" if key != "layers" else "layers_trained"] = per
    if cfg.dp.enabled:
        eps = {k: accountant.epsilon(k, cfg.dp.delta) for k in range(len(prepared.clients))}
        row["epsilon"] = max(eps.values())
        row["epsilon_per_client"] = eps
        row["noise_multiplier_per_client"] = {k: p.noise_multiplier for k, p in prepared.privacy.items()}
    return row


def _round_line(row: dict, cfg) -> str:
    parts = [f"round {row['round']:>3}/{cfg.rounds}", f"loss {row['loss']:.4f}" if row["loss"] is not None else ""]
    if row.get("accuracy") is not None:
        parts.append(f"val acc {row['accuracy']:.4f}")
    if row.get("rougeL_teacher_forced") is not None:
        parts.append(f"unseen rougeL-tf {row['rougeL_teacher_forced']:.4f}")
    if row.get("rougeL") is not None:
        parts.append(f"rougeL {row['rougeL']:.4f}")
    parts.append(f"up {row['upload_bytes'] / 1e3:.1f} kB  down {row['download_bytes'] / 1e3:.1f} kB")
    if row.get("epsilon") is not None:
        parts.append(f"eps {row['epsilon']:.2f}")
    parts.append(f"{row['wall_s']:.1f}s")
    return "  ".join(p for p in parts if p)

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

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlora import wire
from fedlora.adapters import Adapter, initial_adapter
from fedlora.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from fedlora.client import steps_per_round, train_client
from fedlora.config import ExperimentConfig, from_toml, to_dict, to_toml
from fedlora.data.partition import partition, split_local
from fedlora.data.tasks import ClassificationTask
from fedlora.errors import ConfigError, UpdateError
from fedlora.methods import get_method
from fedlora.methods.base import ServerState, Update
from fedlora.models import LoraSlots, inject_lora, load_classifier
from fedlora.privacy import ClientAccountant, ClientPrivacy, plan_privacy
from fedlora.report import MetricsLog, plot_run
from fedlora.robust import bound_norm


@dataclass
class ClientData:
    train_rows: list[int]
    val_rows: list[int]


@dataclass
class Prepared:
    """Everything checked and computed before the model loads."""

    cfg: ExperimentConfig
    task: ClassificationTask
    clients: list[ClientData]
    privacy: dict[int, ClientPrivacy] = field(default_factory=dict)


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
    """``max(⌊fraction·N⌋, 1)`` distinct clients, the same set for the same (seed, round)."""
    m = max(int(fraction * num_clients + 1e-9), 1)
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx, 3])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load and check data, partition it and plan DP — no model is touched."""
    task = ClassificationTask(cfg.data, seed=cfg.seed)
    parts = partition(task.train_labels, task.num_labels, cfg)
    clients = []
    for k, rows in enumerate(parts):
        tr, va = split_local(rows, cfg.clients.val_fraction, cfg.seed, k)
        cap = cfg.eval.max_client_examples
        if cap and len(va) > cap:  # evaluate on a seeded subset; the rest is simply not used
            va = sorted(np.random.default_rng([cfg.seed, k, 17]).choice(va, size=cap, replace=False).tolist())
        clients.append(ClientData(tr, va))
    prepared = Prepared(cfg, task, clients)
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


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   log=print, resume: bool = False) -> RunResult:
    """Run (or, with ``resume=True``, continue from ``out_dir``'s last checkpoint) an experiment."""
    t_start = time.time()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    ckpt = None
    if resume:
        if out_dir is None:
            raise CheckpointError("resume needs the run directory")
        ckpt = load_checkpoint(Path(out_dir))
        check_resume_config(ckpt.config_toml, cfg)
    prepared = prepare(cfg)
    run_dir = _open_run_dir(Path(out_dir) if out_dir else _default_run_dir(cfg)) if ckpt is None else Path(out_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    task = prepared.task
    log(f"fedlora: {cfg.method} on {cfg.model.name}, {cfg.clients.num} clients "
        f"({', '.join(str(len(c.train_rows)) for c in prepared.clients)} training examples), "
        f"{cfg.rounds} rounds -> {run_dir}")

    tokenizer, base = load_classifier(cfg.model, task.num_labels, cfg.seed)
    model = inject_lora(base, cfg.lora)
    slots = LoraSlots.of(model)
    initial = initial_adapter(slots.shapes, cfg.lora.rank, cfg.lora.alpha, cfg.seed, head=slots.head())

    train_all = task.tokenise(tokenizer, task.train_rows, task.train_labels, cfg.model.max_length)
    val_examples = task.tokenise(tokenizer, task.val_rows, task.val_labels, cfg.model.max_length)
    client_train = [train_all.subset(c.train_rows) for c in prepared.clients]
    client_val = [train_all.subset(c.val_rows) for c in prepared.clients]

    method = get_method(cfg.method)(cfg)
    state = method.init_state(initial)
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
    plans = []

    for t in range(start, cfg.rounds + 1):
        t0 = time.time()
        sampled = sample_clients(cfg.seed, t, cfg.clients.num, cfg.clients.fraction)
        plans = method.configure(t, state, sampled)
        received = _collect_updates(t, plans, model, slots, initial, client_train, task, prepared, accountant,
                                    progress)
        state = method.aggregate(t, state, received.updates)
        row = _round_row(t, received, prepared, accountant, cfg)
        if t % cfg.eval.every == 0 or t == cfg.rounds:
            slots.load(method.global_adapter(state))
            row.update(_evaluate(model, task, val_examples, client_val, cfg))
        row["wall_s"] = round(time.time() - t0, 3)
        fault_point("aggregate", t)
        save_checkpoint(run_dir, t, state, accountant.state_dict(), metrics.rows + [row], to_toml(cfg),
                        fault=fault_point)
        fault_point("metrics", t)
        metrics.append(row)
        plot_run(metrics.rows, run_dir / "metrics.png", title=f"{cfg.method} · {cfg.model.name}")
        log(_round_line(row, cfg))

    final = method.global_adapter(state)
    slots.load(final)
    _export_adapter(model, run_dir)
    summary = {"method": cfg.method, "rounds": cfg.rounds, "final_accuracy": metrics.rows[-1].get("accuracy"),
               "total_upload_bytes": sum(r["upload_bytes"] for r in metrics.rows),
               "total_download_bytes": sum(r["download_bytes"] for r in metrics.rows),
               "max_epsilon": max((r["epsilon"] or 0.0) for r in metrics.rows) if cfg.dp.enabled else None,
               "wall_s": round(time.time() - t_start, 1),
               "trainable_parameters_per_client": final.num_parameters(plans[0].train) if plans else None,
               "client_train_examples": [len(c.train_rows) for c in prepared.clients],
               "partition_sha256": partition_digest(prepared)}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "summary.json")  # written last: its presence marks a complete run
    log(f"final validation accuracy: {summary['final_accuracy']:.4f}  ({summary['wall_s']} s)  -> {run_dir}")
    return RunResult(run_dir, metrics.rows, final)


def _export_adapter(model, run_dir: Path) -> None:
    """Save the PEFT adapter to a temporary folder, then swap it in: ``adapter/`` is never half-written."""
    import shutil

    tmp, final = run_dir / "adapter.tmp", run_dir / "adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@dataclass
class RoundUpdates:
    """What the server received in one round: accepted updates, drops with reasons, traffic and update norms."""

    updates: list[Update] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    up_bytes: int = 0
    down_bytes: int = 0


def _collect_updates(t, plans, model, slots, initial, client_train, task, prepared, accountant,
                     progress) -> RoundUpdates:
    """Send each plan over the wire, train the client, receive and check its upload (bytes counted both ways)."""
    cfg = prepared.cfg
    out = RoundUpdates()
    bar = tqdm(plans, desc=f"round {t}/{cfg.rounds}", unit="client", disable=not progress, leave=False,
               file=sys.stderr)
    for plan in bar:
        payload = wire.encode(plan.download)
        out.down_bytes += len(payload)
        plan = type(plan)(plan.client_id, wire.decode(payload), plan.train, plan.upload, plan.config)
        update = train_client(model=model, slots=slots, initial=initial, plan=plan,
                              examples=client_train[plan.client_id], loss_fn=task.loss, train_cfg=cfg.train,
                              round_idx=t, seed=cfg.seed, privacy=prepared.privacy.get(plan.client_id),
                              accountant=accountant, secure_rng=cfg.dp.secure_rng)
        blob = wire.encode(update.tensors)
        out.up_bytes += len(blob)
        received, reason = _receive(blob, plan, initial, cfg)
        if reason is not None:
            out.dropped[plan.client_id] = reason
            continue
        if cfg.robust.norm_bound > 0:
            reference = initial.with_tensors(plan.download).to_flat(plan.upload)
            received, out.norms[plan.client_id] = bound_norm(received, reference, cfg.robust.norm_bound)
        out.updates.append(Update(update.client_id, update.num_examples, received, update.metrics))
        bar.set_postfix(loss=f"{update.metrics['loss']:.3f}")
        fault_point("train", t)
    bar.close()
    return out


def _evaluate(model, task, val_examples, client_val, cfg) -> dict:
    """Global model on the validation set, and on each client's local validation split."""
    ev = task.evaluate(model, val_examples, cfg.train.eval_batch_size)
    row = {"accuracy": ev["accuracy"], "eval_loss": ev["loss"]}
    if cfg.eval.per_client:
        per = {k: task.evaluate(model, client_val[k], cfg.train.eval_batch_size)["accuracy"]
               for k in range(cfg.clients.num) if len(client_val[k])}
        row["client_accuracy"] = per
        row["client_accuracy_mean"] = float(np.mean(list(per.values()))) if per else None
        row["client_accuracy_min"] = float(np.min(list(per.values()))) if per else None
    return row


def _receive(blob: bytes, plan, initial: Adapter, cfg) -> tuple[dict, str | None]:
    """Server-side checks of one upload; a bad one is dropped with its reason instead of stopping the run."""
    try:
        limit = int(cfg.robust.max_update_mb * 1e6)
        return wire.receive_update(blob, initial.to_flat(plan.upload), who=f"client {plan.client_id}",
                                   max_bytes=limit), None
    except UpdateError as exc:
        return {}, str(exc)


def _round_row(t, received: RoundUpdates, prepared, accountant, cfg) -> dict:
    updates = received.updates
    n = sum(u.num_examples for u in updates)
    loss = sum(u.metrics["loss"] * u.num_examples for u in updates) / n if n else None
    row = {"round": t, "loss": loss, "accuracy": None, "eval_loss": None, "upload_bytes": received.up_bytes,
           "download_bytes": received.down_bytes, "epsilon": None, "clients": len(updates),
           "rejected": len(received.dropped)}
    if received.dropped:
        row["dropped"] = received.dropped
    if received.norms:
        row["update_norm"] = received.norms
    if cfg.dp.enabled:
        eps = {k: accountant.epsilon(k, cfg.dp.delta) for k in range(cfg.clients.num)}
        row["epsilon"] = max(eps.values())
        row["epsilon_per_client"] = eps
        row["noise_multiplier_per_client"] = {k: p.noise_multiplier for k, p in prepared.privacy.items()}
    return row


def _round_line(row: dict, cfg) -> str:
    parts = [f"round {row['round']:>3}/{cfg.rounds}", f"loss {row['loss']:.4f}" if row["loss"] is not None else ""]
    if row.get("accuracy") is not None:
        parts.append(f"val acc {row['accuracy']:.4f}")
    parts.append(f"up {row['upload_bytes'] / 1e3:.1f} kB  down {row['download_bytes'] / 1e3:.1f} kB")
    if row.get("epsilon") is not None:
        parts.append(f"eps {row['epsilon']:.2f}")
    parts.append(f"{row['wall_s']:.1f}s")
    return "  ".join(p for p in parts if p)

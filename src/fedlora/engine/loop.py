"""The round loop both engines run (docs/architecture.md, "How a round flows")::

    plans = method.configure(t, state, sampled)            # what each client gets
    received = collect(t, plans, ...)                      # in process, or by Flower's SuperNodes
    state = method.aggregate(t, state, received.updates)   # or the method's streaming accumulator
    evaluate, checkpoint, log (metrics.jsonl / metrics.csv / metrics.png)

Everything a run needs before the model loads (config, data, partition, DP budget) is checked first
(:mod:`fedlora.engine.prepare`), so bad input fails in seconds with a clear message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.adapters import Adapter
from fedlora.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from fedlora.config import ExperimentConfig, to_toml
from fedlora.engine.client_round import RoundUpdates
from fedlora.engine.client_state import ClientStates
from fedlora.engine.evaluate import evaluate_global, per_client_evaluation, personal_scores
from fedlora.engine.prepare import partition_digest, prepare, sample_clients
from fedlora.engine.preflight import preflight_model
from fedlora.engine.rundir import (check_resume_config, check_run_dir, default_run_dir, export_adapter, fault_point,
                                   open_run_dir, write_clients_file)
from fedlora.engine.runtime import build_engine, build_method
from fedlora.engine.weight_gradients import summed_weight_gradients
from fedlora.memory import release_freed_memory, return_large_frees_promptly
from fedlora.methods.base import ServerState
from fedlora.model_card import command_line, write_model_card
from fedlora.privacy import ClientAccountant
from fedlora.ranks import describe_config
from fedlora.report import MetricsLog, plot_run
from fedlora.tracking import Trackers


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict]
    adapter: Adapter

    @property
    def final_accuracy(self) -> float:
        accs = [r["accuracy"] for r in self.metrics if r.get("accuracy") is not None]
        return accs[-1] if accs else float("nan")



def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   log=print, resume: bool = False, *, collect, evaluate_clients=None) -> RunResult:
    """Run (or, with ``resume=True``, continue from ``out_dir``'s last checkpoint) an experiment.

    ``collect(t, plans, engine, prepared, accountant, progress, method, stream) -> RoundUpdates`` runs the clients
    of a round: :func:`fedlora.engine.simulation.collect_in_process` trains them in this process,
    :class:`fedlora.engine.flower.FlowerRound` sends them to SuperNodes.  ``evaluate_clients(t, state, engine,
    method) -> dict`` runs a personalised method's per-client evaluation where the clients are (default: in this
    process, :func:`evaluate_in_process`)."""
    threads = torch.get_num_threads()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    opened: list[Trackers] = []
    try:
        return _run(cfg, out_dir, progress, log, resume, collect, evaluate_clients or evaluate_in_process, opened)
    finally:
        for trackers in opened:  # a run that stopped early is marked so in its tracking runs
            trackers.close()
        torch.set_num_threads(threads)  # model.threads is this run's, not the caller's process-wide setting


def _run(cfg: ExperimentConfig, out_dir, progress: bool, log, resume: bool, collect, evaluate_clients,
         opened: list) -> RunResult:
    t_start = time.time()
    return_large_frees_promptly()
    ckpt = None
    if resume:
        if out_dir is None:
            raise CheckpointError("resume needs the run directory")
        ckpt = load_checkpoint(Path(out_dir))
        check_resume_config(ckpt.config_toml, cfg)
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    if ckpt is None:
        check_run_dir(run_dir)
    preflight_model(cfg)  # targets and ranks from the weight files' headers, before the data is read
    prepared = prepare(cfg)
    if cfg.lora.rank_distribution not in ("homogeneous", "explicit"):
        preflight_model(cfg, set(prepared.rank_configs))  # the drawn rank types
    n_clients = len(prepared.clients)
    sizes = [len(c.train_rows) for c in prepared.clients]
    shown = ", ".join(map(str, sizes)) if n_clients <= 16 else f"{min(sizes)}–{max(sizes)} each, {sum(sizes)} in all"
    log(f"fedlora: {cfg.method} on {cfg.model.name}, {n_clients} clients ({shown} training examples), "
        f"{cfg.rounds} rounds -> {run_dir}")
    if prepared.heldout:
        log(f"unseen (held-out) tasks: {len(prepared.heldout)}, {len(prepared.global_eval_rows)} evaluation rows")

    eng = build_engine(prepared, log)
    if ckpt is None:
        open_run_dir(run_dir)  # created only now: a refusal up to here leaves no directory behind
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    eng.client_states = ClientStates(run_dir)
    if len(set(prepared.rank_configs)) > 1 or cfg.lora.rank_distribution != "homogeneous":
        counts: dict[str, int] = {}
        for c in prepared.rank_configs:
            counts[describe_config(c)] = counts.get(describe_config(c), 0) + 1
        log("client ranks: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    write_clients_file(run_dir, prepared, eng.spec)
    method = build_method(cfg, eng.spec)
    initial = eng.spec.initial(ranks=eng.default_ranks)
    if method.init_examples() and ckpt is None:  # fitted to data (Fed-SB's LoRA-SB init); a resumed run has its state
        grads = summed_weight_gradients(eng, initial, method.init_examples(), log)
        initial = method.initial_from_gradients(initial, grads)
        del grads
    state = method.init_state(initial)
    del initial
    accountant = ClientAccountant()
    metrics = MetricsLog(run_dir)
    start = 1
    if ckpt is not None:
        state = ServerState(ckpt.state.adapter, ckpt.state.extra)
        accountant.load_state_dict(ckpt.accountant)
        metrics.replace(ckpt.metrics)  # drops any row written after the last committed checkpoint
        restore_rng(ckpt.rng)
        start = ckpt.round + 1
        eng.client_states.rollback(ckpt.round)  # what an interrupted later round had kept on its clients
        log(f"resuming {run_dir} after round {ckpt.round} of {cfg.rounds}")
    try:  # TensorBoard / MLflow / W&B, when [track] asks for them
        trackers = Trackers.open(cfg, run_dir, start, metrics.rows)
    except Exception:
        if ckpt is None:  # refused before the first round: leave no run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    opened.append(trackers)
    plans, train_roles = [], None

    for t in range(start, cfg.rounds + 1):
        t0 = time.time()
        sampled = sample_clients(cfg.seed, t, n_clients, cfg.clients.fraction)
        plans = method.configure(t, state, sampled)
        if prepared.privacy:  # each client's σ, q, steps and C travel with its plan
            plans = [dataclasses.replace(p, privacy=prepared.privacy[p.client_id]) for p in plans]
        eng.base.set(method.base_delta(state))  # FLoRA: every client's base holds the merged updates so far
        stream = method.begin(t, state, plans) if method.streams else None
        light = method.state_during_round(state) if stream is not None and t > 1 else None
        if light is not None:  # the full previous state is in round t-1's checkpoint: not held during the round
            state = light
        received = collect(t, plans, eng, prepared, accountant, progress, method, stream)
        state = method.finish(t, state, stream) if stream is not None else method.aggregate(t, state, received.updates)
        if light is not None and state is light:  # no upload arrived: the previous state stands, read back
            state = previous_state(run_dir, t - 1)
        train_roles = plans[0].train if plans else train_roles
        stream = plans = None  # the round's downloads are not kept past it
        release_freed_memory()
        row = _round_row(t, received, prepared, accountant, cfg, method)
        if t % cfg.eval.every == 0 or t == cfg.rounds:
            generate = t == cfg.rounds or (cfg.eval.generate_every > 0 and t % cfg.eval.generate_every == 0)
            row.update(evaluate_global(eng, method, state, generate))
            if method.personal_roles() and per_client_evaluation(cfg):  # each client's own model, on the client
                row.update(evaluate_clients(t, state, eng, method))
            release_freed_memory()
        row["wall_s"] = round(time.time() - t0, 3)
        fault_point("aggregate", t)
        save_checkpoint(run_dir, t, state, accountant.state_dict(), metrics.rows + [row], to_toml(cfg),
                        fault=fault_point)
        eng.client_states.commit(t)
        fault_point("metrics", t)
        metrics.append(row)
        trackers.log_round(row)
        plot_run(metrics.rows, run_dir / "metrics.png", title=f"{cfg.method} · {cfg.model.name}")
        log(_round_line(row, cfg, prepared.task))

    final = method.export_adapter(state)
    export_adapter(eng, method, state, final, run_dir)
    if method.personal_roles():  # each client's own model, as PEFT adapters (the first PERSONAL_EXPORTS clients)
        for k in eng.client_states.clients()[:PERSONAL_EXPORTS]:
            export_adapter(eng, method, state, final.with_tensors(eng.client_states.get(k)), run_dir,
                           name=f"personal/client-{k}")
    headline = prepared.task.headline
    if method.personal_roles() and last_row_has(metrics.rows, f"personal_{prepared.task.client_metric}_mean"):
        headline = f"personal_{prepared.task.client_metric}_mean"  # a personalised method's result is its clients'
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
    summary.update(prepared.task.summary(last))
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    command = command_line()
    write_model_card(run_dir / "adapter", cfg, summary, command=command)
    for k in (eng.client_states.clients()[:PERSONAL_EXPORTS] if method.personal_roles() else []):
        write_model_card(run_dir / "personal" / f"client-{k}", cfg, summary, command=command, client=k)
    os.replace(tmp, run_dir / "summary.json")  # written last: its presence marks a complete run
    trackers.finish(summary)
    score = summary["final_score"]
    what = ("unseen-task " if prepared.heldout else "") + prepared.task.headline_label
    if headline.startswith("personal_"):
        what = f"personalised {prepared.task.client_metric} (mean over clients)"
    log(f"final {what}: {score:.4f}  ({summary['wall_s']} s)  -> {run_dir}" if score is not None
        else f"done ({summary['wall_s']} s) -> {run_dir}")
    return RunResult(run_dir, metrics.rows, final)



def previous_state(run_dir: Path, round_idx: int) -> ServerState:
    """The server state committed after ``round_idx`` (its checkpoint), as the round loop held it."""
    ckpt = load_checkpoint(run_dir)
    if ckpt.round != round_idx:
        raise CheckpointError(f"{run_dir}: the last checkpoint is of round {ckpt.round}, expected {round_idx}")
    return ServerState(ckpt.state.adapter, ckpt.state.extra)


PERSONAL_EXPORTS = 16
"""A personalised run exports the personal adapters of this many clients (those with the smallest ids)."""


def last_row_has(rows: list[dict], key: str) -> bool:
    return bool(rows) and rows[-1].get(key) is not None


def evaluate_in_process(t, state, eng, method) -> dict:
    """Personalised evaluation with each client's kept tensors read from its own file (in-process clients)."""
    return personal_scores(eng, method, state, eng.client_states.get)


def _round_row(t, received: RoundUpdates, prepared, accountant, cfg, method) -> dict:
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
    if received.grouping:
        row["client_group"] = received.grouping  # how many trained in groups, how many alone and why
    if received.secure:
        row["secure_aggregation"] = received.secure  # SecAgg+: contributors, bytes, and that no tensor came in clear
    if received.norms:
        row["update_norm"] = received.norms
    columns = {**method.report_columns, **({"state_restarted": "state_restarted_per_client"}
                                            if method.personal_roles() else {})}
    for key, column in columns.items():
        per = {k: r[key] for k, r in received.reports.items() if key in r}
        if per:
            row[column] = per
    if cfg.dp.enabled:
        eps = {k: accountant.epsilon(k, cfg.dp.delta) for k in range(len(prepared.clients))}
        row["epsilon"] = max(eps.values())
        row["epsilon_per_client"] = eps
        row["noise_multiplier_per_client"] = {k: p.noise_multiplier for k, p in prepared.privacy.items()}
    return row


def _round_line(row: dict, cfg, task) -> str:
    parts = [f"round {row['round']:>3}/{cfg.rounds}", f"loss {row['loss']:.4f}" if row["loss"] is not None else ""]
    for key, label in task.round_fields:  # the task's scores, as it names them
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    personal = f"personal_{task.client_metric}_mean"
    if row.get(personal) is not None:
        parts.append(f"personal {row[personal]:.4f}")
    parts.append(f"up {row['upload_bytes'] / 1e3:.1f} kB  down {row['download_bytes'] / 1e3:.1f} kB")
    if row.get("epsilon") is not None:
        parts.append(f"eps {row['epsilon']:.2f}")
    parts.append(f"{row['wall_s']:.1f}s")
    return "  ".join(p for p in parts if p)

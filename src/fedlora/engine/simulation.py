"""The in-process engine: every simulated client shares one frozen base model; adapters are swapped in and out.

:func:`run_experiment` is the round loop of :mod:`fedlora.engine.loop` with :func:`collect_in_process` as its
``collect``: each sampled client's download goes through the wire (safetensors bytes, counted), the client trains
(:func:`fedlora.engine.client_round.client_work`) and its upload is received and checked
(:func:`fedlora.engine.client_round.receive_upload`) — the same two halves the Flower engine runs on SuperNodes.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tqdm.auto import tqdm

from fedlora import wire
from fedlora.config import ExperimentConfig
from fedlora.engine import loop
from fedlora.engine.client_group import collect_grouped
from fedlora.engine.client_round import RoundUpdates, client_work, receive_upload
from fedlora.engine.prepare import ClientData, Prepared, prepare, sample_clients  # noqa: F401  (public names)
from fedlora.engine.loop import RunResult  # noqa: F401
from fedlora.engine.rundir import fault_point
from fedlora.errors import ConfigError
from fedlora.engine.runtime import Engine, build_engine  # noqa: F401
from fedlora.memory import release_freed_memory


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   log=print, resume: bool = False, collect=None) -> RunResult:
    """Run (or, with ``resume=True``, continue from ``out_dir``'s last checkpoint) an experiment in this process;
    ``collect`` replaces :func:`collect_in_process` (the Flower engine passes its own)."""
    if collect is None and cfg.secure.aggregation:
        raise ConfigError("secure.aggregation = true runs on the Flower engine (SecAgg+ between a ServerApp and "
                          "its ClientApps: `flwr run`, docs/deployment.md); the in-process engine has no server to "
                          "hide the clients' updates from")
    return loop.run_experiment(cfg, out_dir, progress, log, resume, collect=collect or collect_in_process)


def collect_in_process(t, plans, eng: Engine, prepared, accountant, progress, method=None, stream=None) -> RoundUpdates:
    """Send each plan over the wire, train the client, receive and check its upload (bytes counted both ways).
    With a ``stream`` (methods that aggregate incrementally) each accepted upload goes straight into the method's
    accumulator and its tensors are not kept: server memory does not grow with the number of sampled clients."""
    cfg = prepared.cfg
    group = getattr(cfg.train, "client_group", 1)
    if group > 1:  # clients trained together through one forward pass (fedlora.engine.client_group)
        with tqdm(total=len(plans), desc=f"round {t}/{cfg.rounds}", unit="client", disable=not progress,
                  leave=False, file=sys.stderr) as bar:
            return collect_grouped(t, plans, eng, accountant, method, stream, bar, group)
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
        kept = eng.client_states.get(plan.client_id) if plan.keep else None  # the client's own file
        blob, update, kept = client_work(eng, sent, t, method, kept)
        if plan.keep:
            eng.client_states.put(plan.client_id, t, kept)
        del sent, kept
        receive_upload(eng, plan, blob, update, out, accountant, method, stream)
        del blob
        if "loss" in update.metrics:
            bar.set_postfix(loss=f"{update.metrics['loss']:.3f}")
        release_freed_memory()
        fault_point("train", t)
    bar.close()
    return out


"""The client half of the Flower engine, from wire form to wire form: the node's engine (its base model loaded once
per process) runs :func:`fedlora.engine.client_round.client_work` for the plan it was sent.  Used by the ClientApp
in Flower's simulation runtime and by a deployment node's long-lived worker (:mod:`fedlora.engine.flower_worker`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fedlora import wire
from fedlora.config import ExperimentConfig, from_toml
from fedlora.engine.client_round import client_work
from fedlora.engine.flower_messages import apply_memory, plan_from_text, update_to_text


_ENGINES: dict = {}  # config text → (engine, method): the base model is loaded once per process


def _engine(config_text: str, data_dir: str | None):
    key = (config_text, data_dir)
    if key not in _ENGINES:
        from fedlora.engine.prepare import prepare
        from fedlora.engine.runtime import build_engine, build_method

        cfg = from_toml(config_text, where="the server's config")
        # layer-subset methods: the server's calibrated memory model comes with each plan; no profiling here
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, calibrate=False))
        if cfg.model.threads:  # the same thread count as the server's engine gives bit-identical local training
            import torch

            torch.set_num_threads(cfg.model.threads)
        if data_dir:
            cfg = _rebase_data(cfg, Path(data_dir))
        _ENGINES.clear()
        eng = build_engine(prepare(cfg, plan_dp=False), log=lambda *_: None)  # σ comes in the plans
        _ENGINES[key] = (eng, build_method(cfg, eng.spec))
    return _ENGINES[key]


def _rebase_data(cfg: ExperimentConfig, root: Path) -> ExperimentConfig:
    data = cfg.data
    changes = {}
    for name in ("train", "validation", "instructions"):
        value = getattr(data, name, "")
        if value and "://" not in value and not value.startswith(("bundled:", "hf:")) and not Path(value).is_absolute():
            changes[name] = str(root / value)
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **changes)) if changes else cfg


def local_round(config_text: str, data_dir: str | None, plan_text: str, round_idx: int, download: bytes,
                partition: int, memory_text: str = "", merge: bytes = b"",
                base_state: bytes | None = None) -> tuple[bytes, str, bytes]:
    """A client's round from wire form to wire form: (upload bytes, update JSON, the client's base state).  Runs in
    the ClientApp process (simulation runtime: a long-lived Ray actor) or in the node's worker (deployment).
    ``base_state`` is what the previous call returned for this node (FLoRA's offset, a personalised method's kept
    tensors; Flower keeps it in the node's ``context.state``); ``None`` when there is none."""
    eng, method = _engine(config_text, data_dir)
    if memory_text:
        apply_memory(eng.spec, memory_text)
    plan = plan_from_text(plan_text, wire.decode(download))
    if plan.client_id != partition:
        raise ValueError(f"this node holds partition {partition}, the plan is for client {plan.client_id}")
    node_state = wire.decode(base_state) if base_state is not None else {}
    previous = _part(node_state, "base/") if base_state is not None else None
    kept = _part(node_state, "keep/") or None
    offsets = method.client_base(wire.decode(merge) if merge else {}, previous)
    eng.base.set(offsets or None)  # this client's frozen base: W0 + the method's offsets (FLoRA), else W0
    blob, update, kept = client_work(eng, plan, round_idx, method, kept)
    state = {**{"base/" + k: v for k, v in offsets.items()}, **{"keep/" + k: v for k, v in kept.items()}}
    return blob, update_to_text(update), wire.encode(state)


def local_evaluate(config_text: str, data_dir: str | None, shared: bytes, partition: int,
                   base_state: bytes | None = None) -> str:
    """A personalised method's evaluation on this node: its client's own model — the global ``shared`` tensors with
    the ones it keeps (from the node state; none if it never trained) — on its local validation rows.  Returns
    JSON ``{"score": …}`` (null when the client has no validation rows)."""
    import json

    from fedlora.engine.evaluate import client_evaluate

    eng, method = _engine(config_text, data_dir)
    node_state = wire.decode(base_state) if base_state is not None else {}
    eng.base.set(_part(node_state, "base/") or None)
    if not eng.prepared.clients[partition].val_rows:
        return json.dumps({"score": None})
    return json.dumps({"score": client_evaluate(eng, partition, wire.decode(shared), _part(node_state, "keep/") or None)})


def _part(state: dict, prefix: str) -> dict:
    """The node state's tensors under one prefix: ``base/`` (FLoRA's and FedEx-LoRA's base offset), ``keep/`` (the
    roles a personalised method keeps on the client)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

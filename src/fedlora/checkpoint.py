"""Checkpoints after every round, written atomically, and exact resume.

A checkpoint is two files in ``RUN_DIR/checkpoint/``:

* ``state-<round>.safetensors`` — the global adapter and every tensor of the method's state (never pickle);
* ``checkpoint.json`` — round number, the SHA-256 of that tensor file, the method's non-tensor state, each client's
  DP accountant history, the RNG states (python, numpy, torch), the metrics rows so far and the resolved config.

Order of writes: tensors to a temporary name, fsync, rename; then the JSON the same way.  The JSON is the commit
point: until it is renamed into place the previous checkpoint stays valid, so a crash at any moment leaves either the
old or the new checkpoint, never a half-written one.  On resume the tensor file's hash is checked, and the metrics
files are rewritten from the checkpoint so a round that finished training but not its checkpoint is simply re-run.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlora.errors import FedloraError
from fedlora.lora import adapter_from_peft_state_dict
from fedlora.protocol import ServerState

CHECKPOINT_DIR = "checkpoint"
FORMAT = 1


class CheckpointError(FedloraError):
    """A checkpoint that is missing, corrupted, or belongs to another configuration."""


@dataclass
class Checkpoint:
    round: int
    state: ServerState
    accountant: dict[int, list]
    metrics: list[dict]
    config_toml: str
    rng: dict[str, Any]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch global RNG states as plain JSON (no pickle anywhere in a checkpoint)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8))


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"extra/{k}": v for k, v in extra.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    return tensors, plain


def save_checkpoint(run_dir: Path, round_idx: int, state: ServerState, accountant_state: dict[int, list],
                    metrics: list[dict], config_toml: str, fault=None) -> None:
    """Write the checkpoint of a completed round atomically (see module docstring)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    d.mkdir(exist_ok=True)
    extra_tensors, extra_plain = _split_extra(state.extra)
    tensors = {f"adapter/{k}": v.contiguous() for k, v in state.adapter.to_flat().items()} | extra_tensors
    name = f"state-{round_idx}.safetensors"
    tmp = d / (name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, d / name)
    if fault is not None:
        fault("checkpoint", round_idx)  # between the tensor file and the commit point
    digest = _sha256_of(d / name)
    meta = {
        "format": FORMAT, "round": round_idx, "tensors": name, "sha256": digest,
        "alphas": {n: m.alpha for n, m in state.adapter.modules.items()},
        "head_keys": sorted(state.adapter.head),
        "extra": extra_plain,
        "accountant": {str(k): v for k, v in accountant_state.items()},
        "rng": _rng_state(), "metrics": metrics, "config": config_toml,
    }
    tmp_json = d / "checkpoint.json.tmp"
    _fsync_write(tmp_json, json.dumps(meta, default=_json_default).encode())
    os.replace(tmp_json, d / "checkpoint.json")
    for old in d.glob("state-*.safetensors"):  # only now is the previous round's file unreferenced
        if old.name != name:
            old.unlink(missing_ok=True)


def _sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file read in 4 MiB chunks (a full-size FlexLoRA state is ~600 MB: never held twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(v):
    if isinstance(v, float) and v != v:
        return None
    raise TypeError(f"not JSON-serialisable in a checkpoint: {type(v).__name__}")


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and verify the last checkpoint of ``run_dir``; :class:`CheckpointError` says what is wrong."""
    d = Path(run_dir) / CHECKPOINT_DIR
    meta_path = d / "checkpoint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint ({meta_path} missing): nothing to resume; "
                              f"a run writes one after each completed round")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensor_path = d / meta["tensors"]
        expected = meta["sha256"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {meta_path} is corrupted ({type(exc).__name__}: {exc}); "
                              f"resume refused, no file was changed") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {meta_path} has format {meta.get('format')}, expected {FORMAT}")
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing; resume refused, no file was changed")
    if _sha256_of(tensor_path) != expected:
        raise CheckpointError(f"checkpoint tensors {tensor_path} do not match their recorded SHA-256 (corrupted); "
                              f"resume refused, no file was changed")
    flat = load_file(str(tensor_path))
    adapter_flat = {k[len("adapter/"):]: v for k, v in flat.items() if k.startswith("adapter/")}
    adapter = adapter_from_peft_state_dict(adapter_flat, meta["alphas"])
    extra = dict(meta.get("extra", {}))
    extra.update({k[len("extra/"):]: v for k, v in flat.items() if k.startswith("extra/")})
    accountant = {int(k): [tuple(h) for h in v] for k, v in meta["accountant"].items()}
    return Checkpoint(meta["round"], ServerState(adapter, extra), accountant, meta["metrics"], meta["config"],
                      meta["rng"])

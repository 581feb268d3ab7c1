"""What travels between a Flower ServerApp and its ClientApps besides tensors: a plan's and an update's non-tensor
fields as JSON, the server's memory model, and the safetensors bytes wrapped as one Flower ``Array``.  Nothing is
unpickled."""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a deployment's per-message ClientApp process imports this module: no torch at import time
    from fedlora.protocol import ClientPlan, Update


def plan_to_text(plan: ClientPlan) -> str:
    """The non-tensor fields of a plan as JSON."""
    return json.dumps({"client_id": plan.client_id, "train": sorted(plan.train), "upload": sorted(plan.upload),
                       "config": plan.config, "ranks": plan.ranks,
                       "modules": sorted(plan.modules) if plan.modules is not None else None,
                       "keep": sorted(plan.keep),
                       "privacy": dataclasses.asdict(plan.privacy) if plan.privacy is not None else None})


def plan_from_text(text: str, download: dict) -> ClientPlan:
    from fedlora.privacy import ClientPrivacy
    from fedlora.protocol import ClientPlan

    d = json.loads(text)
    privacy = ClientPrivacy(**d["privacy"]) if d.get("privacy") is not None else None
    return ClientPlan(int(d["client_id"]), download, frozenset(d["train"]), frozenset(d["upload"]),
                      dict(d["config"]), {k: int(v) for k, v in d["ranks"].items()},
                      modules=frozenset(d["modules"]) if d["modules"] is not None else None, privacy=privacy,
                      keep=frozenset(d.get("keep", ())))


def update_to_text(update: Update) -> str:
    return json.dumps({"client_id": update.client_id, "num_examples": update.num_examples,
                       "metrics": update.metrics, "report": update.report}, allow_nan=True)


def update_from_text(text: str) -> Update:
    from fedlora.protocol import Update

    d = json.loads(text)
    report = {k: ({int(i): v for i, v in val.items()} if isinstance(val, dict) else val)
              for k, val in d["report"].items()}
    return Update(int(d["client_id"]), int(d["num_examples"]), {}, dict(d["metrics"]), report)


def memory_to_text(spec) -> str:
    """The server's memory model and budgets (layer-subset methods), so that every client's knapsack uses the one
    the server calibrated, as in simulation; '' when the method has none."""
    if getattr(spec, "memory", None) is None:
        return ""
    m = spec.memory
    return json.dumps({"model": {"step_bytes": m.step_bytes, "grad_state_bytes": list(m.grad_state_bytes),
                                 "act_bytes": list(m.act_bytes), "calibrated": m.calibrated},
                       "budgets": {str(k): v for k, v in spec.budgets.items()}})


def apply_memory(spec, text: str) -> None:
    """Install the server's memory model and budgets (:func:`memory_to_text`) in this client's spec."""
    from fedlora.memory import MemoryModel

    d = json.loads(text)
    spec.memory = MemoryModel(**d["model"])
    spec.budgets = {int(k): float(v) for k, v in d["budgets"].items()}


def bytes_array(blob: bytes):
    from flwr.app import Array

    return Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)

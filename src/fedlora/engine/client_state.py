"""What a client keeps between rounds in the in-process engine (FedSA-LoRA's own B and head; any method's
``ClientPlan.keep`` roles): one safetensors file per client and round it trained in, under ``RUN_DIR/client_state/``.

The files are the clients', never the server's: the in-process engine reads a client's file only to run that
client's round or its personalised evaluation, as the client itself would.  They live on disk, so a population of
thousands of clients costs no memory.  Versions make resume exact: a client's state written in round t is
``<client>-r<t>.safetensors``; after round t's checkpoint is committed every older version is removed
(:meth:`ClientStates.commit`), and resuming from round t's checkpoint removes anything a later, interrupted round
wrote (:meth:`ClientStates.rollback`).  A Flower node keeps the same tensors in its ``context.state`` instead.
"""
from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_DIR = "client_state"
_NAME = re.compile(r"^(\d+)-r(\d+)\.safetensors$")


class ClientStates:
    """Per-client tensors on disk, by client id and round (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / STATE_DIR

    def _versions(self) -> dict[int, list[tuple[int, Path]]]:
        out: dict[int, list[tuple[int, Path]]] = {}
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = _NAME.match(p.name)
                if m:
                    out.setdefault(int(m.group(1)), []).append((int(m.group(2)), p))
        return {k: sorted(v) for k, v in out.items()}

    def get(self, client_id: int) -> dict[str, Tensor] | None:
        """The client's latest kept tensors, or None if it has none (it never trained, or lost them)."""
        versions = self._versions().get(client_id)
        return load_file(str(versions[-1][1])) if versions else None

    def put(self, client_id: int, round_idx: int, tensors: dict[str, Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{client_id}-r{round_idx}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def clients(self) -> list[int]:
        """Clients that hold state."""
        return sorted(self._versions())

    def commit(self, round_idx: int) -> None:
        """Round ``round_idx`` is checkpointed: keep each client's newest version only."""
        for versions in self._versions().values():
            for _, p in versions[:-1]:
                p.unlink(missing_ok=True)

    def rollback(self, round_idx: int) -> None:
        """Resuming after round ``round_idx``: remove versions written by later rounds."""
        for versions in self._versions().values():
            for r, p in versions:
                if r > round_idx:
                    p.unlink(missing_ok=True)

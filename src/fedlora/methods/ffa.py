"""FFA-LoRA: Federated Freeze-A LoRA (Sun, Li, Li, Ding; ICLR 2024; docs/methods.md §3).

A is drawn once from the shared seed (PEFT's Kaiming-uniform init, :func:`fedlora.adapters.seeded_lora_A`), every
client regenerates the identical A, and A is never trained nor sent.  Only the zero-initialised B (and the head, when
``lora.head = "aggregate"``) is trained, uploaded and averaged: ``B^{t+1} = Σ_k p_k B_k``, which makes aggregation
exact, ``s·B^{t+1}A = Σ_k p_k s·B_k A`` (oracle O4, docs/oracles.md), and halves traffic for square modules (O6).

Our choices (P1–P3 of docs/oracles.md): A init = PEFT default (P1); r = 8, alpha = 16 (P2); head aggregated by
default (P3).
Each client reports a checksum of the A it trained with; the server refuses a round whose clients disagree with its
own A (O4 holds only when every client holds the same A).
"""
from __future__ import annotations

import zlib

from torch import Tensor

from fedlora.adapters import ROLE_B, Adapter
from fedlora.errors import UpdateError
from fedlora.methods.base import ClientPlan, LocalHooks, Method, ServerState, Update, register


def a_checksum(adapter: Adapter) -> int:
    """CRC32 over the bytes of every A factor, in module order (used to prove all clients share one A)."""
    crc = 0
    for name in sorted(adapter.modules):
        a: Tensor = adapter.modules[name].A.detach().contiguous().cpu()
        crc = zlib.crc32(a.numpy().tobytes(), crc)
    return crc


class ReportsSharedA(LocalHooks):
    """FFA-LoRA's client side: report the checksum of the A it trained with (post-processing of the shared seed, not
    of its data, so it may be sent under DP)."""

    def metrics(self, slots, trained: Adapter) -> dict[str, float]:
        return {"a_checksum": float(a_checksum(trained))}


@register
class FFALoRA(Method):
    name = "ffa"
    summary = "FFA-LoRA: A frozen from a shared seed and never sent; only B (and the head) trained and averaged."
    accepts_server_optimizer = True
    secure_aggregation = True
    citation = "Sun et al., Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024"

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_B}) | self.head_roles()
        download = state.adapter.to_flat(roles)
        return [ClientPlan(cid, download, train=roles, upload=roles) for cid in client_ids]

    def local_hooks(self, plan: ClientPlan, slots) -> LocalHooks:
        return ReportsSharedA()

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        expected = a_checksum(state.adapter)
        for u in updates:
            got = u.metrics.get("a_checksum")
            if got is not None and int(got) != expected:
                raise UpdateError(f"client {u.client_id} trained with a different A (checksum {int(got)} != "
                                  f"{expected}); FFA-LoRA needs the identical shared A on every client")
        return self.average(state, updates)

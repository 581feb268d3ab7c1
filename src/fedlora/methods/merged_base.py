"""Methods that fold updates into the frozen base weight (FLoRA's stack, FedEx-LoRA's residual): the server keeps
the cumulative dense offset ``Δ_t = Σ_{τ≤t} B_τ A_τ`` per module, every client trains on ``W0 + Δ_t``, and the offset
travels in low-rank form.

Each round adds one low-rank increment per module, kept as a stack of factors (``stack_B``, ``stack_A``): a client
that took part in the previous round downloads only that round's stacks and adds ``stack_B @ stack_A`` to the offset
it holds (the server's own operation, so its base is bit-identical to the server's); a client that missed a round
downloads the whole dense offset.  The in-process engine gives every client the server's offset directly
(:meth:`MergesIntoBase.base_delta`); a Flower node rebuilds it from the plan (:meth:`MergesIntoBase.client_base`).
"""
from __future__ import annotations

from torch import Tensor

from fedlora.methods.base import Method, ServerState


class MergesIntoBase(Method):
    """Shared machinery; a subclass calls :meth:`merge_for` in ``configure`` and :meth:`add_increment` in
    ``aggregate``, and remembers the round's participants in ``state.extra["participants"]``."""

    def merge_for(self, state: ServerState, client_id: int) -> dict[str, Tensor]:
        """The plan's ``merge`` tensors for one client: the last round's stacks if it took part in it, else the whole
        offset (or nothing before the first merge)."""
        names = list(state.adapter.modules)
        if client_id in set(state.extra.get("participants", [])):
            merge = {}
            for name in names:
                if f"stack_B/{name}" in state.extra:
                    merge[f"{name}.stack_B"] = state.extra[f"stack_B/{name}"]
                    merge[f"{name}.stack_A"] = state.extra[f"stack_A/{name}"]
            return merge
        return {f"{name}.delta": state.extra[f"offset/{name}"] for name in names if f"offset/{name}" in state.extra}

    @staticmethod
    def add_increment(extra: dict, name: str, B_stack: Tensor, A_stack: Tensor) -> None:
        """Record this round's increment ``B_stack @ A_stack`` of one module and add it to the offset."""
        extra[f"stack_B/{name}"], extra[f"stack_A/{name}"] = B_stack, A_stack
        product = B_stack @ A_stack
        previous = extra.get(f"offset/{name}")
        extra[f"offset/{name}"] = product if previous is None else previous + product

    @staticmethod
    def without_stacks(extra: dict) -> dict:
        """The state's extras without the previous round's stacks (each round replaces them)."""
        return {k: v for k, v in extra.items() if not k.startswith(("stack_A/", "stack_B/"))}

    def client_base(self, merge: dict[str, Tensor], previous: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """On a Flower node: this client's frozen base becomes ``W0 + offset``; returns the offset.  The plan carries
        either the whole cumulative offset (``<module>.delta``) or, for a client that took part in the previous
        round, only that round's stack (``<module>.stack_B`` / ``.stack_A``), added to the client's ``previous``
        offset with the server's own operation (``previous + B_stack @ A_stack``), so the base is bit-identical to
        the server's.  A client without its previous offset fails the round; the server then sends it the whole
        offset.  No merge: the plain base (the first round)."""
        deltas = {k[:-len(".delta")]: v for k, v in merge.items() if k.endswith(".delta")}
        stacks = sorted(k[:-len(".stack_B")] for k in merge if k.endswith(".stack_B"))
        if stacks:
            if previous is None:
                raise ValueError(f"this client has lost its {self.name} base offset; it gets the whole offset the "
                                 f"next time it is sampled")
            deltas = {n: (previous[n] + merge[n + ".stack_B"] @ merge[n + ".stack_A"]) if n in previous
                      else merge[n + ".stack_B"] @ merge[n + ".stack_A"] for n in stacks}
        return deltas

    def base_delta(self, state: ServerState) -> dict[str, Tensor] | None:
        offsets = {k[len("offset/"):]: v for k, v in state.extra.items() if k.startswith("offset/")}
        return offsets or None

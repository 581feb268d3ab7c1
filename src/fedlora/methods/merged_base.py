"""Methods that fold updates into the frozen base weight (FLoRA's stack, FedEx-LoRA's residual): the server keeps
the cumulative dense offset ``Δ_t = Σ_{τ≤t} B_τ A_τ`` per module, every client trains on ``W0 + Δ_t``, and the offset
travels in low-rank form.

Each round adds one low-rank increment per module, kept as a stack of factors (``stack_B``, ``stack_A``): a client
that took part in the previous round downloads only that round's increment — the stacks (FLoRA, as its paper), the
dense product (FedEx-LoRA's default: the stacks would show each participant's own factors), or whichever is smaller
— and adds it to the offset it holds with the server's own operation, so its base is bit-identical to the
server's; a client that missed a round downloads the whole dense offset.  A round without accepted updates clears
the increment and the participants, so that no client applies an increment twice.  The in-process engine gives every client the server's offset directly
(:meth:`MergesIntoBase.base_delta`); a Flower node rebuilds it from the plan (:meth:`MergesIntoBase.client_base`).
"""
from __future__ import annotations

from torch import Tensor

from fedlora.methods.base import Method, ServerState


class MergesIntoBase(Method):
    """Shared machinery; a subclass calls :meth:`merge_for` in ``configure`` and :meth:`add_increment` in
    ``aggregate``, and remembers the round's participants in ``state.extra["participants"]``."""

    increment_form: str = "stack"
    """How a participant downloads the round's increment: ``"stack"`` (the factors, as FLoRA's paper sends them,
    whatever their size), ``"dense"`` (one matrix; only the aggregate is seen) or ``"smaller"`` (whichever is)."""

    def merge_for(self, state: ServerState, client_id: int) -> dict[str, Tensor]:
        """The plan's ``merge`` tensors for one client: the last round's increment if it took part in it (in the
        :attr:`increment_form`), else the whole offset (or nothing before the first merge)."""
        names = list(state.adapter.modules)
        if client_id in set(state.extra.get("participants", [])):
            merge = {}
            for name in names:
                if f"stack_B/{name}" in state.extra:
                    B, A = state.extra[f"stack_B/{name}"], state.extra[f"stack_A/{name}"]
                    smaller = B.numel() + A.numel() >= B.shape[0] * A.shape[1]
                    if self.increment_form == "dense" or (self.increment_form == "smaller" and smaller):
                        merge[f"{name}.step"] = B @ A  # the server's own product: the client adds it bit for bit
                    else:
                        merge[f"{name}.stack_B"], merge[f"{name}.stack_A"] = B, A
            return merge
        return {f"{name}.delta": state.extra[f"offset/{name}"] for name in names if f"offset/{name}" in state.extra}

    @staticmethod
    def add_increment(extra: dict, name: str, B_stack: Tensor, A_stack: Tensor) -> None:
        """Record this round's increment ``B_stack @ A_stack`` of one module and add it to the offset."""
        extra[f"stack_B/{name}"], extra[f"stack_A/{name}"] = B_stack, A_stack
        product = B_stack @ A_stack
        previous = extra.get(f"offset/{name}")
        extra[f"offset/{name}"] = product if previous is None else previous + product

    def empty_round(self, state: ServerState) -> ServerState:
        """No update was accepted: the offset stands, no increment, no participants (everyone gets the offset)."""
        return ServerState(state.adapter, {**self.without_stacks(state.extra), "participants": []})

    @staticmethod
    def without_stacks(extra: dict) -> dict:
        """The state's extras without the previous round's stacks (each round replaces them)."""
        return {k: v for k, v in extra.items() if not k.startswith(("stack_A/", "stack_B/"))}

    def client_base(self, merge: dict[str, Tensor], previous: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """On a Flower node: this client's frozen base becomes ``W0 + offset``; returns the offset.  The plan carries
        either the whole cumulative offset (``<module>.delta``) or, for a client that took part in the previous
        round, only that round's increment (``<module>.stack_B`` / ``.stack_A``, or the dense ``<module>.step``),
        added to the client's ``previous`` offset with the server's own operation (``previous + B_stack @ A_stack``),
        so the base is bit-identical to the server's.  A client without its previous offset fails the round; the server then sends it the whole
        offset.  No merge: the plain base (the first round)."""
        deltas = {k[:-len(".delta")]: v for k, v in merge.items() if k.endswith(".delta")}
        steps = {k[:-len(".stack_B")]: merge[k] @ merge[k[:-len(".stack_B")] + ".stack_A"]
                 for k in merge if k.endswith(".stack_B")}
        steps.update({k[:-len(".step")]: v for k, v in merge.items() if k.endswith(".step")})
        if steps:
            if previous is None:
                raise ValueError(f"this client has lost its {self.name} base offset; it gets the whole offset the "
                                 f"next time it is sampled")
            deltas = {n: previous[n] + step if n in previous else step for n, step in sorted(steps.items())}
        return deltas

    def base_delta(self, state: ServerState) -> dict[str, Tensor] | None:
        offsets = {k[len("offset/"):]: v for k, v in state.extra.items() if k.startswith("offset/")}
        return offsets or None

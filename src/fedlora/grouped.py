"""Many clients through one forward pass of the shared frozen encoder (``train.client_group``; docs/design/client_group.md).

Each client's micro-batch is *packed* with the others' into one sequence of real tokens (no padding; positions restart
at every row), so the frozen base model's linear layers run one large matrix product over all clients' tokens — where
the speed comes from — while everything that belongs to a client stays the client's:

* its LoRA factors and head are its own leaf tensors (a :class:`~fedlora.models.LoraSlots` of its own); each LoRA layer
  adds ``s_g · B_g A_g x`` to client g's tokens only, in PEFT's order;
* attention is computed per client on its rows, re-padded to the width sequential training pads them to, with the
  model's own attention function (its ``config._attn_implementation``);
* every dropout (hidden, attention, LoRA, the head's) draws client g's mask from client g's own random state, at the
  shape sequential training draws it (``n_g × L_g × d``), and keeps the entries of real tokens — so the masks are the
  ones the client would have drawn alone, and the result equals sequential training up to the order of float sums;
* pooling (masked mean, first token, or BERT's pooler) is per row.

The loss is ``Σ_g w_g · ℓ_g``; the base is frozen and client g's tensors touch only its own rows, so one backward pass
gives every client exactly its own gradient.  Scope: BERT-family encoders for sequence classification (the bundled
MiniLM); :func:`groupable` says why anything else is not grouped.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.adapters import A_SUFFIX, B_SUFFIX
from fedlora.lora import CoreLinear
from fedlora.models import LoraSlots

ATTENTION = "fedlora_grouped"


@dataclass
class Member:
    """One client inside a grouped forward: its tensors, its random state, and where its rows and tokens sit."""

    slots: LoraSlots
    rng: Tensor
    rows: slice = field(default_factory=lambda: slice(0))
    tokens: slice = field(default_factory=lambda: slice(0))
    real: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))  # (n_g, L_g) real tokens

    @property
    def n(self) -> int:
        return self.real.shape[0]

    def draw(self, fn):
        """Run ``fn`` under this client's random state (dropout masks), and keep the advanced state."""
        torch.set_rng_state(self.rng)
        out = fn()
        self.rng = torch.get_rng_state()
        return out


def _lora_layers(peft_model) -> dict[str, nn.Module]:
    return {n: m for n, m in peft_model.base_model.model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(getattr(m, "lora_A", {}))}


def _head_wrappers(peft_model) -> dict[str, nn.Module]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "modules_to_save")
            and isinstance(getattr(m, "original_module", None), nn.Linear)}


MODEL_TYPES = ("bert",)
"""Architectures whose packed forward is checked equal to the padded one (tests/test_client_group.py).  Others that
look alike are not: RemBERT, Megatron-BERT and LUKE attend outside the attention interface, MobileBERT's embedding
mixes neighbouring tokens, RoBERTa's positions start after the padding index."""


def _lora_variant(layer: nn.Module) -> str | None:
    """Why a PEFT LoRA layer is not plain ``s·B·A·x`` with ``s = alpha / r`` (which the grouped forward computes)."""
    for name in layer.lora_A:
        if getattr(layer, "use_dora", {}).get(name):
            return "DoRA"
        if getattr(layer, "lora_bias", {}).get(name):
            return "LoRA bias"
        r = layer.lora_A[name].out_features
        if abs(layer.scaling[name] - layer.lora_alpha[name] / r) > 1e-12:
            return "a LoRA scale other than alpha / r (rsLoRA)"
    if getattr(layer, "merged", False):
        return "a merged adapter"
    return None


def groupable(peft_model) -> str | None:
    """None when ``peft_model`` can train clients in a group, else why not (the caller falls back to sequential)."""
    inner = peft_model.base_model.model
    config = inner.config
    if getattr(config, "model_type", None) not in MODEL_TYPES or getattr(config, "is_decoder", False):
        return f"model type {getattr(config, 'model_type', type(inner).__name__)!r} (packing is checked for BERT only)"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return "positions are not absolute"
    if config._attn_implementation != "sdpa":
        return f"attention {config._attn_implementation!r} (packing is checked with sdpa)"
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    pooler = getattr(encoder, "pooler", None)
    if pooler is None or not (hasattr(pooler, "mode") or (hasattr(pooler, "dense") and hasattr(pooler, "activation"))):
        return f"pooler {type(pooler).__name__} is not one grouped training knows"
    layers = _lora_layers(peft_model)
    if any(isinstance(b, CoreLinear) for m in layers.values() for b in m.lora_B.values()):
        return "LoRA cores (Fed-SB)"
    variant = next((v for v in map(_lora_variant, layers.values()) if v), None)
    if variant:
        return variant
    wrappers = [m for m in inner.modules() if hasattr(m, "modules_to_save")]
    if not wrappers or any(not isinstance(getattr(m, "original_module", None), nn.Linear) for m in wrappers):
        return "a task head that is not one linear layer"
    if any("forward" in vars(m) for m in inner.modules()):
        return "a module whose forward is already replaced"
    return None


def pack(batches: list[dict[str, Tensor]], members: list[Member]) -> dict[str, Tensor]:
    """Concatenate the clients' padded micro-batches into one row of real tokens (``(1, T)``), positions restarting at
    each row, and record in each member where its rows and tokens are."""
    ids, types, pos = [], [], []
    row = tok = 0
    for batch, m in zip(batches, members):
        real = batch["attention_mask"].bool()
        m.real = real
        ids.append(batch["input_ids"][real])
        pos.append((torch.cumsum(real.long(), dim=1) - 1)[real])
        if "token_type_ids" in batch:
            types.append(batch["token_type_ids"][real])
        count = int(real.sum())
        m.rows, m.tokens = slice(row, row + real.shape[0]), slice(tok, tok + count)
        row, tok = row + real.shape[0], tok + count
    out = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(pos)[None]}
    if types:
        out["token_type_ids"] = torch.cat(types)[None]
    return out


def _dropout_mask(member: Member, x: Tensor, p: float, token_layout: bool) -> Tensor:
    """Client ``member``'s dropout mask for its part of ``x``, drawn at its sequential shape, real entries only."""
    shape = (*member.real.shape, x.shape[-1]) if token_layout else (member.n, x.shape[-1])
    mask = member.draw(lambda: torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p))
    return mask[member.real] if token_layout else mask


def _client_dropout(x: Tensor, p: float, members: list[Member]) -> Tensor:
    """Dropout with each client's own mask: ``x`` is packed tokens ``(1, T, d)`` or one row per example ``(N, d)``."""
    token_layout = x.dim() == 3
    flat = x[0] if token_layout else x
    parts = []
    for m in members:
        own = flat[m.tokens] if token_layout else flat[m.rows]
        parts.append(own * _dropout_mask(m, x, p, token_layout) / (1 - p))
    out = torch.cat(parts)
    return out[None] if token_layout else out


def _grouped_attention(members: list[Member], inner_attention):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        outs = []
        for m in members:
            n, width = m.real.shape
            padded = []
            for t in (query, key, value):  # (1, heads, T, d) → client's (n, heads, L, d), zero-padded
                own = t[0, :, m.tokens].transpose(0, 1)  # (T_g, heads, d)
                full = own.new_zeros((n, width, *own.shape[1:]))
                full[m.real] = own
                padded.append(full.transpose(1, 2))
            mask = m.real[:, None, None, :].expand(n, 1, width, width)
            out, _ = m.draw(lambda: inner_attention(module, *padded, mask, dropout=dropout, scaling=scaling,
                                                    **kwargs))
            outs.append(out[m.real])  # (T_g, heads, d)
        return torch.cat(outs)[None], None
    return attention


class GroupedForward:
    """The patches that make one forward pass of ``peft_model`` serve several clients (a context manager per pass)."""

    def __init__(self, peft_model):
        reason = groupable(peft_model)
        if reason is not None:
            raise ValueError(f"grouped training does not support this model: {reason}")
        self.model = peft_model
        inner = peft_model.base_model.model
        self.config = inner.config
        self.encoder = getattr(inner, inner.base_model_prefix)
        self.lora = _lora_layers(peft_model)
        self.heads = _head_wrappers(peft_model)
        self.dropouts = [m for m in inner.modules() if isinstance(m, nn.Dropout) and m.p > 0]

    @contextlib.contextmanager
    def patched(self, members: list[Member]):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = self.config._attn_implementation
        AttentionInterface.register(ATTENTION, _grouped_attention(members, ALL_ATTENTION_FUNCTIONS[original]))
        patched: list[nn.Module] = []

        def patch(module: nn.Module, forward) -> None:
            module.forward = forward
            patched.append(module)

        try:
            self.config._attn_implementation = ATTENTION
            for d in self.dropouts:
                patch(d, (lambda d: lambda x: _client_dropout(x, d.p, members) if d.training else x)(d))
            for name, layer in self.lora.items():
                patch(layer, self._lora_forward(name, layer, members))
            for name, wrapper in self.heads.items():
                patch(wrapper, self._head_forward(name, members))
            patch(self.encoder.pooler, self._pool_forward(self.encoder.pooler, members))
            yield
        finally:
            for module in patched:
                del module.forward  # back to the class's forward (groupable: none had one of its own)
            self.config._attn_implementation = original
            AttentionInterface.register(ATTENTION, _grouped_attention([], None))  # holds no client tensors

    @staticmethod
    def _lora_forward(name: str, layer: nn.Module, members: list[Member]):
        dropout = layer.lora_dropout[layer.active_adapters[0]] if hasattr(layer, "lora_dropout") else None
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            token_layout = x.dim() == 3
            flat = x[0] if token_layout else x
            parts = []
            for m in members:
                a, b = m.slots.params[name + A_SUFFIX], m.slots.params[name + B_SUFFIX]
                own = flat[m.tokens] if token_layout else flat[m.rows]
                if p > 0 and layer.training:
                    own = own * _dropout_mask(m, x, p, token_layout) / (1 - p)
                parts.append(F.linear(F.linear(own, a), b) * (m.slots.alphas[name] / a.shape[0]))
            delta = torch.cat(parts)
            return result + (delta[None] if token_layout else delta)
        return forward

    @staticmethod
    def _head_forward(name: str, members: list[Member]):
        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            parts = [F.linear(x[m.rows], m.slots.params[name + ".weight"], m.slots.params.get(name + ".bias"))
                     for m in members]
            return torch.cat(parts)
        return forward

    @staticmethod
    def _pool_forward(pooler: nn.Module, members: list[Member]):
        def forward(hidden: Tensor) -> Tensor:
            flat = hidden[0]
            lengths = torch.cat([m.real.sum(1) for m in members])
            starts = torch.cumsum(lengths, 0) - lengths
            if getattr(pooler, "mode", None) == "mean":
                row_of = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths)
                sums = flat.new_zeros((len(lengths), flat.shape[-1])).index_add_(0, row_of, flat)
                return F.normalize(sums / lengths[:, None].to(flat.dtype), p=2.0, dim=-1)
            first = flat[starts]
            if getattr(pooler, "mode", None) == "cls":
                return F.normalize(first, p=2.0, dim=-1)
            return pooler.activation(pooler.dense(first))  # BERT's pooler: tanh(W h_[CLS] + b)
        return forward

    def logits(self, batches: list[dict[str, Tensor]], members: list[Member]) -> Tensor:
        """One forward pass over every member's micro-batch; rows in member order."""
        inputs = pack(batches, members)
        with self.patched(members):
            return self.model(**inputs).logits

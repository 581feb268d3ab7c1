"""How a classifier turns token states into the vector its head reads: ``model.pooling``.

``AutoModelForSequenceClassification`` on a BERT-family encoder classifies from BERT's *pooler* (a tanh dense layer
on the first token, trained for next-sentence prediction).  A sentence encoder such as all-MiniLM-L6-v2 was trained to
produce something else: the masked mean of its token states, L2-normalised (its sentence-transformers pipeline is
Transformer → mean Pooling → Normalize).  A logistic regression on frozen all-MiniLM-L6-v2 features (4,000 SST-2
training rows, the 872 validation rows) reaches 0.695 on the pooler output, 0.735 on the first token and 0.791 on the
normalised mean — under DP-SGD, where every step of signal counts, the representation the model was trained for is
worth more than any noise tuning (docs/methods.md, "Pooling and the head").

Choices (``model.pooling``):

* ``pooler`` — the model's own head, unchanged (BERT's pooler; whatever the architecture does);
* ``mean`` — masked mean of the last hidden states, L2-normalised (sentence-transformers' mean pooling + Normalize);
* ``cls`` — the first token's last hidden state, L2-normalised (no dense/tanh);
* ``auto`` — what the model was trained to produce: ``mean`` (or ``cls``) when the model folder is a
  sentence-transformers model whose pooling config says so (the bundled MiniLM), else ``pooler``.

``mean``/``cls`` replace the encoder's ``pooler`` module (BERT-style encoders: BERT, MiniLM, ALBERT, ...), so the
model's own forward, loss, PEFT wrapping and ``save_pretrained`` are untouched; the classification head keeps its
name (``classifier``), so a PEFT adapter saves and reloads it as usual.  The mask reaches the pooler through a
forward pre-hook on the encoder that reads its ``attention_mask`` argument.  A stock ``PeftModel`` on
``AutoModelForSequenceClassification`` cannot know about this: :func:`fedlora.load_adapter` rebuilds the run's exact
model from the adapter folder's ``fedlora.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlora.errors import ModelError

POOLINGS = ("auto", "mean", "cls", "pooler")
HEAD_INITS = ("auto", "zero", "random")


class _MaskedPooler(nn.Module):
    """Replaces a BERT-style ``pooler``: masked mean (``mode='mean'``) or first token (``'cls'``), L2-normalised.
    Holds no parameters; the encoder's ``attention_mask`` is set on it by :func:`apply_pooling`'s pre-hook."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.mask: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.mode == "cls":
            pooled = hidden_states[:, 0]
        else:
            mask = self.mask
            if mask is None or mask.shape != hidden_states.shape[:2]:
                mask = torch.ones(hidden_states.shape[:2], dtype=hidden_states.dtype, device=hidden_states.device)
            m = mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, l2_normalised=True"


def sentence_transformers_pooling(model_path: str | Path | None) -> str | None:
    """'mean' or 'cls' when ``model_path`` is a local sentence-transformers folder whose pooling config uses that
    mode, else None."""
    if model_path is None:
        return None
    config = Path(model_path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    return None


def resolve_pooling(requested: str, model_path: str | Path | None) -> str:
    """``auto`` → the model's own sentence-embedding pooling if it declares one, else ``pooler``."""
    if requested not in POOLINGS:
        raise ModelError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return sentence_transformers_pooling(model_path) or "pooler"


def resolve_head_init(requested: str, pooling: str) -> str:
    """``auto`` → ``zero`` with a normalised pooling (``mean``/``cls``), else the model's own random init."""
    if requested not in HEAD_INITS:
        raise ModelError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "zero" if pooling in ("mean", "cls") else "random"


def _encoder_with_pooler(model: nn.Module) -> nn.Module:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or not hasattr(encoder, "pooler"):
        raise ModelError(f"model.pooling = 'mean'/'cls' needs a BERT-style encoder with a pooler module; "
                         f"{type(model).__name__} has none (use model.pooling = 'pooler', its own head)")
    return encoder


def apply_pooling(model: nn.Module, pooling: str) -> None:
    """Make ``model`` (a ``*ForSequenceClassification``) pool as ``pooling`` says (in place; ``pooler``: no-op)."""
    if pooling == "pooler":
        return
    encoder = _encoder_with_pooler(model)
    pooler = _MaskedPooler(pooling)
    encoder.pooler = pooler
    if getattr(encoder, "_fedlora_pooling_hook", None) is not None:
        encoder._fedlora_pooling_hook.remove()

    def keep_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask
        return None

    encoder._fedlora_pooling_hook = encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    model.config.fedlora_pooling = pooling


def classifier_head(model: nn.Module) -> list[nn.Module]:
    """The task head's linear layers (PEFT's ``modules_to_save`` for sequence classification: classifier/score)."""
    heads = [m for n, m in model.named_modules() if n.split(".")[0] in ("classifier", "score")
             and isinstance(m, nn.Linear)]
    if not heads:
        raise ModelError(f"{type(model).__name__} has no 'classifier' or 'score' head to initialise")
    return heads


@torch.no_grad()
def zero_head(model: nn.Module) -> None:
    """Zero-initialise the classification head (weights and bias): with a normalised pooling the first steps then
    move only the head, and no random direction has to be un-learned under noise (Ke et al. 2024 on DP fine-tuning
    from a random head)."""
    for layer in classifier_head(model):
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()

"""Token helpers of the instruction task: the device a model runs on, a tokenizer's BOS prefix, batched
encoding of many (often repeated) texts."""
from __future__ import annotations

import torch


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer prepends it by default (LLaMA-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode_texts(tokenizer, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """Token ids of each text (no special tokens); each distinct non-empty text is tokenised once, in batches."""
    unique = [t for t in dict.fromkeys(texts) if t]
    table: dict[str, list[int]] = {"": []}
    for start in range(0, len(unique), chunk):
        part = unique[start:start + chunk]
        for text, ids in zip(part, tokenizer(part, add_special_tokens=False)["input_ids"]):
            table[text] = list(ids)
    return [table[t] for t in texts]

"""The wire format: safetensors bytes (never pickle), byte counting, and validation of incoming updates.

Every payload that crosses between server and client, in any engine, goes through :func:`encode` and
:func:`decode`; communication is the length of those bytes, measured, not a formula (docs/methods.md §6;
oracle O30, docs/oracles.md).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from fedlora.errors import UpdateError


def encode(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise named tensors to safetensors bytes (contiguous CPU copies; bf16 is kept as bf16)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _st_save(clean, metadata=metadata)


def decode(payload: bytes) -> dict[str, Tensor]:
    """Parse safetensors bytes; a malformed payload raises :class:`UpdateError`, never executes anything."""
    try:
        return dict(_st_load(payload))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UpdateError(f"payload is not valid safetensors: {exc}") from None


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def expected_size(expected: dict[str, Tensor]) -> int:
    """Serialised size of a payload with exactly these keys, shapes and dtypes (no metadata), computed from the
    shapes — the tensors may be ``meta`` — without allocating or encoding anything: an 8-byte length, the compact
    JSON header (tensors ordered by element size, largest first, then by name) padded with spaces to a multiple of
    8, and the raw data."""
    header, offset = {}, 0
    for name, t in sorted(expected.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset


def receive_update(blob: bytes, expected: dict[str, Tensor], *, who: str, max_bytes: int = 0) -> dict[str, Tensor]:
    """Everything the server does to an arriving upload before a method sees it: size limit (``max_bytes``, default
    twice the planned size), safetensors parse, keys, shapes (rank within the plan), floating dtype, finite values;
    tensors are cast to the planned dtype.  Raises :class:`UpdateError` with the reason."""
    limit = max_bytes or 2 * expected_size(expected) + 4096
    if len(blob) > limit:
        raise UpdateError(f"{who}: payload of {len(blob)} bytes exceeds the limit of {limit} bytes")
    tensors = decode(blob)
    validate_tensors(tensors, expected, who=who)
    return {k: v.to(expected[k].dtype) for k, v in tensors.items()}


def validate_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], *, who: str) -> None:
    """Check an incoming payload against the tensors we expect: same keys, shapes, floating dtype, finite values."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UpdateError(f"{who}: keys differ from the plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in tensors.items():
        ref = expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            rank_dim = 0 if key.endswith(".lora_A.weight") else 1 if key.endswith(".lora_B.weight") else None
            if rank_dim is not None and value.dim() == 2 and ref.dim() == 2 and value.shape[rank_dim] != ref.shape[rank_dim]:
                raise UpdateError(f"{who}: {key} has rank {value.shape[rank_dim]}, the plan's rank is "
                                  f"{ref.shape[rank_dim]}")
            raise UpdateError(f"{who}: {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if not value.is_floating_point():
            raise UpdateError(f"{who}: {key} has dtype {value.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(value).all()):
            raise UpdateError(f"{who}: {key} contains NaN or infinite values")

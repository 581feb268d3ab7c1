"""Every class of malformed update is rejected at the server with a reason, and counted; fuzzed payloads too."""
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import wire
from fedlora.errors import UpdateError

EXPECTED = {"m.lora_A.weight": torch.zeros(4, 6), "m.lora_B.weight": torch.zeros(5, 4), "classifier.bias": torch.zeros(2)}


def _good():
    return {k: torch.randn(v.shape) for k, v in EXPECTED.items()}


def _with(**changes):
    t = _good()
    for k, v in changes.items():
        key = {"A": "m.lora_A.weight", "B": "m.lora_B.weight", "head": "classifier.bias"}[k]
        if v is None:
            del t[key]
        else:
            t[key] = v
    return t


MALFORMED = {
    "missing key": (lambda: wire.encode(_with(head=None)), "keys differ"),
    "unexpected key": (lambda: wire.encode({**_good(), "pooler.weight": torch.zeros(2)}), "keys differ"),
    "rank above the plan": (lambda: wire.encode(_with(A=torch.zeros(8, 6), B=torch.zeros(5, 8))),
                            "rank 8, the plan's rank is 4"),
    "wrong shape": (lambda: wire.encode(_with(head=torch.zeros(3))), "shape"),
    "integer dtype": (lambda: wire.encode(_with(head=torch.zeros(2, dtype=torch.int32))), "dtype"),
    "NaN": (lambda: wire.encode(_with(B=torch.full((5, 4), float("nan")))), "NaN"),
    "infinity": (lambda: wire.encode(_with(B=torch.full((5, 4), float("-inf")))), "NaN or infinite"),
    "oversized payload": (lambda: wire.encode({**_good(), "m.lora_B.weight": torch.zeros(5, 4),
                                               "padding": torch.zeros(100_000)}), "exceeds the limit"),
    "not safetensors": (lambda: b"\x80\x04\x95pickle-looking bytes", "not valid safetensors"),
    "truncated": (lambda: wire.encode(_good())[:-10], "not valid safetensors"),
    "header lies about length": (lambda: struct.pack("<Q", 10**12) + b"{}", "not valid safetensors"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_each_class_of_malformed_update_is_rejected(kind):
    make, match = MALFORMED[kind]
    with pytest.raises(UpdateError, match=match):
        wire.receive_update(make(), EXPECTED, who="client 3")


def test_a_good_update_passes_and_is_cast_to_the_planned_dtype():
    t = {k: v.double() for k, v in _good().items()}
    out = wire.receive_update(wire.encode(t), EXPECTED, who="client 0")
    assert all(v.dtype == torch.float32 for v in out.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_are_rejected_cleanly(blob):
    with pytest.raises(UpdateError):
        wire.receive_update(blob, EXPECTED, who="fuzz")


_shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
_values = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf"), 1e30])
_keys = st.sampled_from(sorted(EXPECTED) + ["x", "m.lora_A.weight.extra", ""])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, st.tuples(_shapes, _dtypes, _values), max_size=5))
def test_fuzz_random_tensor_dicts_are_accepted_only_when_valid(spec):
    tensors = {k: torch.full(shape, v).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt)
               for k, (shape, dt, v) in spec.items()}
    valid = (set(tensors) == set(EXPECTED)
             and all(tuple(t.shape) == tuple(EXPECTED[k].shape) and t.is_floating_point()
                     and bool(torch.isfinite(t).all()) for k, t in tensors.items()))
    try:
        blob = wire.encode(tensors)
    except Exception:  # e.g. a key safetensors itself refuses to write: nothing reaches the server
        return
    if valid:
        wire.receive_update(blob, EXPECTED, who="fuzz")
    else:
        with pytest.raises(UpdateError):
            wire.receive_update(blob, EXPECTED, who="fuzz")

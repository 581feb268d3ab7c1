"""Wire format: safetensors bytes, measured traffic (oracle O30, docs/oracles.md) and validation of arriving
payloads."""
import json
import struct

import pytest
import torch

from fedlora import wire
from fedlora.adapters import initial_adapter
from fedlora.errors import UpdateError


def test_round_trip_is_exact_for_float_dtypes():
    t = {"a": torch.randn(3, 4), "b": torch.randn(2).to(torch.bfloat16), "c": torch.randn(2, 2, dtype=torch.float64)}
    back = wire.decode(wire.encode(t))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])


def test_payload_length_is_header_plus_raw_bytes():
    t = {"x.lora_B.weight": torch.zeros(384, 8)}
    blob = wire.encode(t)
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert len(blob) == 8 + header_len + 384 * 8 * 4
    assert json.loads(blob[8:8 + header_len])["x.lora_B.weight"]["shape"] == [384, 8]


def test_O30_ffa_upload_is_half_of_fedit_for_square_modules():
    # MiniLM q,v shapes: 6 layers × 2 modules of 384×384, r = 8, no head
    shapes = {f"bert.encoder.layer.{i}.attention.self.{m}": (384, 384) for i in range(6) for m in ("query", "value")}
    ad = initial_adapter(shapes, rank=8, alpha=16, seed=0)
    ffa = len(wire.encode(ad.to_flat(("lora_B",))))
    fedit = len(wire.encode(ad.to_flat(("lora_A", "lora_B"))))
    assert ffa >= 12 * 384 * 8 * 4 and fedit >= 2 * 12 * 384 * 8 * 4
    assert 0.49 < ffa / fedit < 0.51


def test_decode_rejects_garbage_without_unpickling():
    with pytest.raises(UpdateError, match="not valid safetensors"):
        wire.decode(b"\x80\x04\x95" + b"junk" * 10)


@pytest.mark.parametrize("bad, match", [
    ({"w": torch.zeros(2, 3)}, "keys differ"),
    ({"w": torch.zeros(3, 2), "extra": torch.zeros(1)}, "keys differ"),
    ({"w": torch.zeros(2, 2)}, "shape"),
    ({"w": torch.zeros(3, 2, dtype=torch.int64)}, "dtype"),
    ({"w": torch.full((3, 2), float("nan"))}, "NaN"),
    ({"w": torch.full((3, 2), float("inf"))}, "NaN or infinite"),
])
def test_validate_rejects_malformed_updates(bad, match):
    expected = {"w": torch.zeros(3, 2)}
    if "w" in bad and bad["w"].shape == (2, 3):
        bad = {"v": bad["w"]}
    with pytest.raises(UpdateError, match=match):
        wire.validate_tensors(bad, expected, who="client 0")


def test_validate_accepts_a_good_update():
    wire.validate_tensors({"w": torch.ones(3, 2)}, {"w": torch.zeros(3, 2)}, who="client 0")


def test_expected_size_is_the_encoded_length_computed_from_shapes_alone():
    """The server's size limit needs the planned payload's length: computed from (meta) shapes, it equals the real
    encoding's length for mixed dtypes, empty tensors and unsorted names, and allocates nothing."""
    from fedlora.wire import expected_size

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        tensors = {}
        for i in range(int(torch.randint(1, 7, (1,), generator=g))):
            dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][int(torch.randint(0, 4, (1,), generator=g))]
            shape = tuple(int(x) for x in torch.randint(0, 40, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g))
            tensors[f"m{int(torch.randint(0, 999, (1,), generator=g))}.{i}"] = torch.zeros(shape, dtype=dtype)
        assert expected_size({k: v.to("meta") for k, v in tensors.items()}) == len(wire.encode(tensors)), tensors.keys()

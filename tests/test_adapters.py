"""The adapter representation: PEFT round trip, seeded A, exact tensor replacement (DESIGN.md)."""
import math

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.adapters import initial_adapter, role_of, seeded_lora_A
from fedlora.errors import UpdateError
from fedlora.lora import adapter_from_peft_state_dict, peft_state_dict
from fedlora.models import LoraSlots, inject_lora
from tests.conftest import lora_cfg, tiny_bert


def test_roles_of_flat_keys():
    assert role_of("bert.encoder.layer.0.attention.self.query.lora_A.weight") == "lora_A"
    assert role_of("x.lora_B.weight") == "lora_B"
    assert role_of("classifier.weight") == "head"


def test_seeded_A_is_reproducible_per_module_and_kaiming_uniform():
    a1 = seeded_lora_A("layer.0.query", 8, 384, seed=3)
    assert torch.equal(a1, seeded_lora_A("layer.0.query", 8, 384, seed=3))
    assert not torch.equal(a1, seeded_lora_A("layer.0.value", 8, 384, seed=3))
    assert not torch.equal(a1, seeded_lora_A("layer.0.query", 8, 384, seed=4))
    bound = 1 / math.sqrt(384)
    assert a1.abs().max() <= bound and a1.abs().max() > 0.9 * bound
    # Var of U(-b, b) is b²/3 = 1/(3·d_in) (PEFT's default init; docs/methods.md §3)
    assert abs(a1.var().item() - 1 / (3 * 384)) < 0.1 / (3 * 384)


def test_initial_adapter_has_zero_B():
    ad = initial_adapter({"m": (6, 5)}, rank=2, alpha=4, seed=0)
    assert ad.modules["m"].A.shape == (2, 5) and ad.modules["m"].B.shape == (6, 2)
    assert ad.modules["m"].scale == 2.0 and not ad.modules["m"].B.any()


def test_with_tensors_checks_keys_and_shapes():
    ad = initial_adapter({"m": (6, 5)}, rank=2, alpha=4, seed=0, head={"classifier.bias": torch.zeros(2)})
    new = ad.with_tensors({"m.lora_B.weight": torch.ones(6, 2)})
    assert new.modules["m"].B.sum() == 12 and ad.modules["m"].B.sum() == 0  # a copy
    with pytest.raises(UpdateError, match="shape"):
        ad.with_tensors({"m.lora_B.weight": torch.ones(6, 3)})
    with pytest.raises(UpdateError, match="no such target module"):
        ad.with_tensors({"other.lora_B.weight": torch.ones(6, 2)})
    with pytest.raises(UpdateError, match="unexpected head"):
        ad.with_tensors({"pooler.weight": torch.ones(2)})


def test_peft_state_dict_round_trip_is_exact_and_keys_match_peft():
    # Prepare: a tiny BERT with LoRA on query/value, random non-zero factors loaded through our slots
    model = inject_lora(tiny_bert(), lora_cfg(rank=4, alpha=8.0, targets=("query", "value")))
    slots = LoraSlots.of(model)
    g = torch.Generator().manual_seed(0)
    ad = slots.read()
    ad = ad.with_tensors({k: torch.randn(*v.shape, generator=g) for k, v in ad.to_flat().items()})
    slots.load(ad)
    # Execute
    peft_sd = get_peft_model_state_dict(model)
    ours = peft_state_dict(ad)
    back = adapter_from_peft_state_dict(peft_sd, slots.alphas)
    # Assert
    assert set(ours) == set(peft_sd)
    for k in ours:
        assert torch.equal(ours[k], peft_sd[k])
    assert all(torch.equal(back.to_flat()[k], v) for k, v in ad.to_flat().items())
    fresh = inject_lora(tiny_bert(seed=5), lora_cfg(rank=4, alpha=8.0, targets=("query", "value")))
    result = set_peft_model_state_dict(fresh, ours)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    x = torch.randint(0, 64, (3, 7))
    model.eval(), fresh.eval()
    with torch.no_grad():
        # same adapter but different random base weights would differ, so copy the base too
        fresh.base_model.model.bert.load_state_dict(model.base_model.model.bert.state_dict())
        torch.testing.assert_close(model(input_ids=x).logits, fresh(input_ids=x).logits)


def test_from_peft_state_dict_rejects_mismatched_ranks():
    sd = {"m.lora_A.weight": torch.zeros(2, 5), "m.lora_B.weight": torch.zeros(6, 3)}
    with pytest.raises(UpdateError, match="rank"):
        adapter_from_peft_state_dict(sd, 4.0)


def test_byte_and_parameter_counts():
    ad = initial_adapter({"m": (6, 5)}, rank=2, alpha=4, seed=0, head={"h": torch.zeros(3)})
    assert ad.num_parameters() == 2 * 5 + 6 * 2 + 3
    assert ad.num_bytes(("lora_B",)) == 6 * 2 * 4

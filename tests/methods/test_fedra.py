"""FedRA as a sub-model method: the sub-model context, the sub-model memory model, FedRA's and random-k's choices, and a
client trained with FedRA (skipped blocks never run, only drawn blocks change)."""
import types

import numpy as np
import pytest
import torch

from fedlora.config import load_config
from fedlora.layers import block_index, block_list, layer_groups, modules_of, submodel
from fedlora.memory import MemoryModel
from fedlora.methods import get_method
from fedlora.methods.base import FederationSpec


# ---------------------------------------------------------------------------------------------- the real MiniLM
@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 with LoRA r=4 on query/value; B random so every LoRA module changes the output."""
    from fedlora.models import LoraSlots, inject_lora, load_classifier

    _, base = load_classifier(types.SimpleNamespace(name="minilm", cache_dir=""), 2, seed=0)
    model = inject_lora(base, types.SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=["query", "value"]),
                        "SEQ_CLS")
    slots = LoraSlots.of(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in slots.params.items():
            if key.endswith("lora_B.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    return model, slots, ids


def _by_hand(model, ids, blocks):
    """Embeddings, then only ``blocks`` of the encoder in order, then pooler and classifier (eval: no dropout)."""
    bert = model.base_model.model.bert
    h = bert.embeddings(input_ids=ids)
    for j in blocks:
        out = bert.encoder.layer[j](h)
        h = out[0] if isinstance(out, tuple) else out
    return model.base_model.model.classifier(bert.pooler(h))


def test_submodel_skips_the_blocks_it_did_not_draw_and_restores_the_full_model(minilm):
    model, _, ids = minilm
    parent, attr, full = block_list(model)
    assert attr == "layer" and parent is model.base_model.model.bert.encoder and len(full) == 6
    with torch.no_grad():
        full_logits = model(input_ids=ids).logits
        torch.testing.assert_close(full_logits, _by_hand(model, ids, range(6)))
        with submodel(model, [3, 1]):
            assert len(model.base_model.model.bert.encoder.layer) == 2
            sub_logits = model(input_ids=ids).logits
        torch.testing.assert_close(sub_logits, _by_hand(model, ids, [1, 3]))
        assert not torch.allclose(sub_logits, full_logits, atol=1e-3)
        assert model.base_model.model.bert.encoder.layer is full  # the very same list is back
        torch.testing.assert_close(model(input_ids=ids).logits, full_logits)
        with pytest.raises(RuntimeError, match="boom"):
            with submodel(model, [0]):
                assert len(block_list(model)[2]) == 1
                raise RuntimeError("boom")
        assert model.base_model.model.bert.encoder.layer is full
        torch.testing.assert_close(model(input_ids=ids).logits, full_logits)
    with pytest.raises(ValueError):
        with submodel(model, [6]):
            pass
    assert model.base_model.model.bert.encoder.layer is full


def test_gradient_never_reaches_the_lora_of_skipped_blocks(minilm):
    model, slots, ids = minilm
    groups = layer_groups(slots.shapes)
    params = slots.set_trainable(frozenset({"lora_A", "lora_B"}))  # every LoRA tensor could take a gradient
    ran = set()
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: ran.add(j))
             for j, blk in enumerate(block_list(model)[2])]
    try:
        with submodel(model, [1, 3]):
            model(input_ids=ids).logits.sum().backward()
        assert ran == {1, 3}
        for j, group in enumerate(groups):
            grads = [slots.params[f"{m}.lora_{x}.weight"].grad for m in group for x in "AB"]
            if j in (1, 3):
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"block {j} was skipped but got a gradient"
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- choices
def _mm(n=6, step=10.0, grad=1.0, act=3.0):
    return MemoryModel(step_bytes=step, grad_state_bytes=[grad] * n, act_bytes=[act] * n)


def _method(name, mm, fractions=(0.5, 0.75, 1.0), seed=0, smallest=False, position_aware=True):
    n = mm.num_layers
    shapes = {f"enc.layer.{j}.{t}": (8, 8) for j in range(n) for t in ("q", "v")}
    full = mm.predict(range(n))
    spec = FederationSpec(shapes, {k: {m: 2 for m in shapes} for k in range(len(fractions))}, 4.0, seed,
                          layer_groups=layer_groups(shapes), memory=mm,
                          budgets={k: f * full for k, f in enumerate(fractions)})
    cfg = load_config(None, [f"method={name}", f"memory.smallest_for_all={str(smallest).lower()}",
                             f"memory.position_aware={str(position_aware).lower()}"])
    return get_method(name)(cfg, spec)


def _old_fedra(spec, t, cid, budget):
    """The rule ``fedra`` used before it became a sub-model method (random blocks inside the full-depth model)."""
    order = [int(j) for j in np.random.default_rng([spec.seed, t, cid, 53]).permutation(len(spec.layer_groups))]
    chosen = []
    for j in order:
        if spec.memory.predict(chosen + [j]) <= budget:
            chosen.append(j)
    return sorted(chosen)


def test_submodel_memory_is_additive_and_never_above_the_full_depth_prediction():
    mm = MemoryModel(step_bytes=7.0, grad_state_bytes=[1.0, 2.0, 1.5, 1.0], act_bytes=[3.0, 4.0, 2.0, 5.0])
    assert mm.predict_submodel([]) == 0.0
    assert mm.predict_submodel([1, 3]) == pytest.approx(7 + (2 + 4) + (1 + 5))
    assert mm.predict([1, 3]) == pytest.approx(7 + 2 + 1 + (4 + 2 + 5))  # full depth: backprop through block 2 too
    for s in ([0], [0, 2], [1, 3], [2, 3], [3], [0, 1, 2, 3]):
        assert mm.predict_submodel(s) <= mm.predict(s)
    assert mm.predict_submodel(range(4)) == mm.predict(range(4)) and mm.predict_submodel([2, 3]) == mm.predict([2, 3])


@pytest.mark.parametrize("mm", [_mm(), _mm(6, 10.0, 1.0, 6.0), _mm(12, 50.0, 2.0, 9.0)])
def test_randk_reproduces_the_old_fedra_choices(mm):
    """With the exact full-depth memory (``memory.position_aware = true``) randk is the old fedra rule."""
    method = _method("randk", mm)
    for t in range(1, 8):
        for cid in range(3):
            layers, config = method.choose(t, None, cid)
            assert layers == _old_fedra(method.spec, t, cid, method.spec.budgets[cid]) and config == {}
    assert get_method("randk").summary and "full-depth" in get_method("randk").summary


@pytest.mark.parametrize("mm", [_mm(6, 10.0, 0.1, 10.0), _mm(6, 10.0, 1.0, 6.0), _mm(12, 50.0, 2.0, 9.0)])
def test_fedra_draws_random_blocks_whose_submodel_fits_where_randk_is_stuck_at_the_top(mm):
    """Equal block costs: a full-depth set whose earliest block is e pays the activations of every block from e up,
    so ``randk``'s small client is confined to the top blocks (with negligible G, exactly the top k); FedRA draws its
    k blocks from the whole depth."""
    fedra, randk = _method("fedra", mm), _method("randk", mm)
    n, differ, positions, old_positions = mm.num_layers, 0, set(), set()
    for t in range(1, 13):
        for cid in range(3):
            budget = fedra.spec.budgets[cid]
            layers, config = fedra.choose(t, None, cid)
            assert config == {"submodel": True}
            assert layers == sorted(set(layers)) and mm.predict_submodel(layers) <= budget
            # equal block costs: exactly as many blocks as the sub-model budget allows (their "capacity" k)
            k = max(c for c in range(n + 1) if mm.predict_submodel(range(c)) <= budget)
            assert len(layers) == k
            old = randk.choose(t, None, cid)[0]
            assert len(layers) >= len(old)
            if mm.grad_state_bytes[0] < 0.05 * mm.act_bytes[0]:
                assert old == list(range(n - len(old), n))
            differ += layers != old
            if cid == 0:
                positions |= set(layers)
                old_positions |= set(old)
    assert differ > 0 and 0 not in old_positions
    assert min(positions) < n // 2 <= min(old_positions)  # the small client draws from the whole depth
    assert fedra.choose(1, None, 2)[0] == list(range(n))  # the full budget takes every block
    assert fedra.choose(1, None, 0) != fedra.choose(2, None, 0)  # a new allocation every round


def test_fedra_fits_more_blocks_than_randk_when_the_top_blocks_are_expensive():
    # the last block's activations are large: any full-depth set pays them, a sub-model only if it draws that block
    mm = MemoryModel(step_bytes=10.0, grad_state_bytes=[1.0] * 6, act_bytes=[4.0] * 5 + [30.0])
    fedra, randk = _method("fedra", mm), _method("randk", mm)
    more = 0
    for t in range(1, 21):
        for cid in (0, 1):
            layers, old = fedra.choose(t, None, cid)[0], randk.choose(t, None, cid)[0]
            assert mm.predict_submodel(layers) <= fedra.spec.budgets[cid] and len(layers) >= len(old)
            more += len(layers) > len(old)
    assert more > 0


def test_fedra_plans_ask_for_a_submodel_and_download_only_the_drawn_blocks():
    from fedlora.adapters import initial_adapter, module_of, role_of

    mm = _mm()
    method = _method("fedra", mm)
    state = method.init_state(initial_adapter(method.spec.shapes, 2, 4.0, 0))
    for plan in method.configure(1, state, [0, 1, 2]):
        layers = method.choose(1, state, plan.client_id)[0]
        assert plan.config["submodel"] is True and plan.modules == modules_of(layers, method.spec.layer_groups)
        assert {module_of(k) for k in plan.download if role_of(k) != "head"} == plan.modules
    # randk runs the full depth: it needs every block's LoRA
    randk = _method("randk", mm)
    plan = randk.configure(1, state, [0])[0]
    assert "submodel" not in plan.config and len(plan.download) == 2 * len(method.spec.shapes)


def test_smallest_for_all_gives_every_fedra_client_the_smallest_sub_model():
    mm = _mm(6, 10.0, 0.1, 10.0)  # everyone gets 0.5 · 70.6 = 35.3: (35.3 − 10) // 10.1 = 2 blocks, anywhere
    method = _method("fedra", mm, smallest=True)
    drawn = [method.choose(t, None, c) for t in (1, 2, 3) for c in range(3)]
    assert all(len(ls) == 2 and mm.predict_submodel(ls) <= 35.3 and cfg == {"submodel": True} for ls, cfg in drawn)
    assert min(j for ls, _ in drawn for j in ls) < 4  # not only the top blocks, as at full depth


# ---------------------------------------------------------------------------------------------- a FedRA client
@pytest.fixture(scope="module")
def engine():
    from pathlib import Path

    from fedlora.engine.simulation import build_engine, prepare

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "examples" / "pilot_tiny.toml",
                      ["method=fedra", "data.max_train_examples=120", "data.max_eval_examples=16",
                       "train.local_steps=2", "memory.calibrate=false"])
    return build_engine(prepare(cfg), log=lambda *_: None)


def test_a_fedra_client_runs_only_its_drawn_blocks_and_changes_only_their_lora(engine):
    from fedlora.adapters import module_of, role_of
    from fedlora.engine.simulation import client_work
    from fedlora import wire

    method = get_method("fedra")(engine.prepared.cfg, engine.spec)
    state = method.init_state(engine.initial_for(engine.spec.global_ranks(), None))
    plan = method.configure(1, state, [0])[0]  # the 0.5 budget
    layers = sorted({block_index(m) for m in plan.modules})
    full = block_list(engine.model)[2]
    assert 0 < len(layers) < len(full)
    ran: list[int] = []
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: ran.append(j)) for j, blk in enumerate(full)]
    try:
        blob, update, _ = client_work(engine, plan, 1, method)
    finally:
        for h in hooks:
            h.remove()
    assert set(ran) == set(layers)  # the skipped blocks never ran forward (nor, so, backward)
    assert block_list(engine.model)[2] is full
    assert update.report["layers"] == layers
    assert update.report["memory_predicted_mb"] == pytest.approx(engine.spec.memory.predict_submodel(layers) / 1e6)
    assert update.report["memory_predicted_mb"] < engine.spec.memory.predict(layers) / 1e6 or layers[0] + len(
        layers) == len(full)
    tensors = wire.decode(blob)
    lora = {k: v for k, v in tensors.items() if role_of(k) != "head"}
    assert {module_of(k) for k in lora} == set(plan.modules)
    start = state.adapter.to_flat()
    assert all(not torch.equal(v, start[k]) for k, v in lora.items() if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("mm", [_mm(6, 10.0, 0.1, 10.0), _mm(12, 50.0, 2.0, 9.0)])
def test_randk_shares_the_additive_cost_model_by_default(mm):
    """Default costs (``memory.position_aware = false``), as pilot and topk: each set's ``M_step + Σ c_j`` fits the
    budget (so its true full-depth memory does too), misfits are skipped, and a budget that fits everything trains
    everything."""
    method = _method("randk", mm, position_aware=False)
    costs = mm.additive_costs()
    for t in range(1, 8):
        for cid in range(3):
            budget = method.spec.budgets[cid]
            layers = method.choose(t, None, cid)[0]
            if mm.predict(range(mm.num_layers)) <= budget:
                assert layers == list(range(mm.num_layers))
                continue
            assert mm.step_bytes + sum(costs[j] for j in layers) <= budget and mm.predict(layers) <= budget
            for j in set(range(mm.num_layers)) - set(layers):  # nothing left out would still have fitted ...
                earlier = [i for i in layers if _position(method, t, cid, i) < _position(method, t, cid, j)]
                assert mm.step_bytes + sum(costs[i] for i in earlier) + costs[j] > budget


def _position(method, t, cid, block):
    from fedlora.methods.fedra import random_order

    return random_order(method.spec.seed, t, cid, len(method.spec.layer_groups)).index(block)


def test_a_fedra_client_whose_budget_fits_no_block_sits_the_round_out():
    """A sub-model of no block is embeddings straight into the head: it trains and uploads nothing (it would
    otherwise train the head on a model that is not the global one and average that head in)."""
    from fedlora.adapters import initial_adapter

    mm = _mm(6, 10.0, 1.0, 30.0)  # one block costs 10 + 31 = 41; budget 0.05 · 196 = 9.8 fits none
    method = _method("fedra", mm, fractions=(0.05, 1.0))
    state = method.init_state(initial_adapter(method.spec.shapes, 2, 4.0, 0))
    none, full = method.configure(1, state, [0, 1])
    assert none.modules == frozenset() and none.train == frozenset() and none.upload == frozenset()
    assert none.download == {}
    assert full.train >= {"lora_A", "lora_B"} and len(full.modules) == len(method.spec.shapes)

"""Grouped training (train.client_group) equals training the clients one after another: the packed forward pass
gives each client its own logits with dropout on, and a round of local steps gives each client its own upload,
within 1e-10 relative in float64 and 1e-5 in fp32 (issue 18's tolerance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import initial_adapter
from fedlora.client import ClientRun, train_client
from fedlora.client_group import train_group
from fedlora.data.tasks import ClassificationTask, Examples
from fedlora.grouped import GroupedForward, Member, groupable
from fedlora.lora import AdapterPool
from fedlora.pooling import apply_pooling
from fedlora.privacy import ClientPrivacy
from fedlora.protocol import ClientPlan, LocalHooks
from tests.conftest import tiny_bert, train_cfg

TARGETS = ["query", "value"]


def _model(dtype=torch.float64, pooling="mean", lora_dropout=0.1):
    """Tiny BERT classifier with LoRA on q/v; every dropout on (hidden, attention, classifier 0.1; LoRA's own)."""
    from types import SimpleNamespace

    from fedlora.lora import inject_lora

    base = tiny_bert().to(dtype)
    if pooling != "pooler":
        apply_pooling(base, pooling)
    lora_cfg = SimpleNamespace(rank=4, alpha=8.0, dropout=lora_dropout, target_modules=TARGETS)
    model = inject_lora(base, lora_cfg, "SEQ_CLS").to(dtype)
    return model, AdapterPool(model, lora_cfg, "SEQ_CLS")


def _examples(n: int, seed: int, pairs: bool = False) -> Examples:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 15, (n,), generator=g).tolist()
    ids = [torch.randint(4, 60, (k,), generator=g).tolist() for k in lengths]
    types = [[0] * (k // 2) + [1] * (k - k // 2) for k in lengths] if pairs else None
    return Examples(ids, types, torch.randint(0, 2, (n,), generator=g), 0)


def _start(pool, ranks, seed, dtype):
    slots = pool.slots(ranks)
    init = initial_adapter(slots.shapes, ranks, 8.0, seed, head={k: v.to(dtype) for k, v in slots.head().items()})
    g = torch.Generator().manual_seed(100 + seed)
    flat = {k: v.to(dtype) for k, v in init.to_flat().items()}
    flat = {k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=dtype)) if ".lora_B." in k or k.startswith(
        "classifier") else v for k, v in flat.items()}  # B ≠ 0 and a non-zero head: every path carries signal
    return init.with_tensors(flat)


class _Penalty(LocalHooks):
    """A loss term on the client's own B (HetLoRA's kind of hook) and a metric computed from its slots."""

    def penalty(self, slots):
        return 0.3 * sum((p ** 2).sum() for k, p in slots.params.items() if k.endswith(".lora_B.weight"))

    def metrics(self, slots, trained):
        return {"b_norm": float(sum(v.norm() for k, v in trained.to_flat().items() if ".lora_B." in k))}


def _clients(pool, dtype, ranks_list, roles, sizes, pairs=False):
    shapes = pool.shapes
    out = []
    for c, (r, n) in enumerate(zip(ranks_list, sizes)):
        ranks = {name: r for name in shapes}
        start = _start(pool, ranks, c, dtype)
        plan = ClientPlan(c, {}, train=roles, upload=roles)
        out.append((ranks, start, plan, _examples(n, 10 + c, pairs)))
    return out


def _sequential(model, pool, clients, cfg, hooks=None, seed=7):
    ups = []
    for ranks, start, plan, ex in clients:
        slots = pool.slots(ranks)
        slots.load(start)
        ups.append(train_client(model=model, slots=slots, initial=None, plan=plan, examples=ex,
                                loss_fn=ClassificationTask.loss, train_cfg=cfg, round_idx=2, seed=seed,
                                hooks=hooks() if hooks else None))
    return ups, torch.get_rng_state()


def _grouped(model, pool, clients, cfg, hooks=None, seed=7):
    runs = []
    for ranks, start, plan, ex in clients:
        own = pool.slots(ranks).standalone(start)
        runs.append(ClientRun(slots=own, plan=plan, examples=ex, train_cfg=cfg, round_idx=2, seed=seed,
                              hooks=hooks() if hooks else None))
    ups = train_group(model, runs, ClassificationTask.loss_from_logits)
    return ups, torch.get_rng_state()


def _assert_same(seq, grp, tol):
    for s, g in zip(seq, grp):
        assert s.client_id == g.client_id and s.num_examples == g.num_examples
        assert set(s.tensors) == set(g.tensors)
        for k in s.tensors:
            err = float((s.tensors[k] - g.tensors[k]).norm() / s.tensors[k].norm().clamp(min=1e-30))
            assert err <= tol, (s.client_id, k, err)
        assert s.metrics.keys() == g.metrics.keys()
        for k in s.metrics:
            assert g.metrics[k] == pytest.approx(s.metrics[k], rel=tol * 10, abs=1e-12), k


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
@pytest.mark.parametrize("pairs", [False, True])
def test_packed_forward_gives_each_client_its_own_logits_with_dropout_on(pooling, pairs):
    model, pool = _model(pooling=pooling)
    assert groupable(model) is None
    clients = _clients(pool, torch.float64, [4, 2, 4], frozenset({"lora_A", "lora_B", "head"}), [5, 7, 3], pairs)
    model.train()
    ref, eval_ref = [], []
    for c, (ranks, start, _, ex) in enumerate(clients):
        slots = pool.slots(ranks)
        slots.load(start)
        batch = {k: v for k, v in ex.batch(range(len(ex))).items() if k != "labels"}
        torch.manual_seed(50 + c)
        ref.append(model(**batch).logits)
        model.eval()
        eval_ref.append(model(**batch).logits)
        model.train()
    members = []
    for c, (ranks, start, _, ex) in enumerate(clients):
        torch.manual_seed(50 + c)
        members.append(Member(pool.slots(ranks).standalone(start), torch.get_rng_state()))
    out = GroupedForward(model).logits([ex.batch(range(len(ex))) for *_, ex in clients], members)
    ref, eval_ref = torch.cat(ref), torch.cat(eval_ref)
    assert not torch.allclose(ref, eval_ref, atol=1e-6)  # dropout is really on: the check is not vacuous
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert model.base_model.model.config._attn_implementation != "fedlora_grouped"  # patches undone
    assert all("forward" not in vars(m) for m in model.modules())


CASES = {
    "fedit": dict(ranks=[4, 4, 4], roles={"lora_A", "lora_B", "head"}),
    "ffa": dict(ranks=[4, 4, 4], roles={"lora_B", "head"}),
    "heterogeneous ranks": dict(ranks=[2, 4, 3], roles={"lora_A", "lora_B", "head"}),
    "penalty hook": dict(ranks=[2, 4, 3], roles={"lora_A", "lora_B", "head"}, hooks=_Penalty),
    "fedprox, adamw, accumulation": dict(ranks=[4, 4, 4], roles={"lora_A", "lora_B", "head"},
                                         cfg=dict(prox_mu=0.5, optimizer="adamw", lr=1e-2, grad_accum=2)),
    "unequal steps": dict(ranks=[4, 4, 4], roles={"lora_B", "head"}, cfg=dict(local_epochs=2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_grouped_round_equals_sequential_round(case, dtype, tol):
    spec = CASES[case]
    cfg = train_cfg(**{**dict(lr=0.5, momentum=0.9, batch_size=4, local_steps=10), **spec.get("cfg", {})})
    model, pool = _model(dtype)
    clients = _clients(pool, dtype, spec["ranks"], frozenset(spec["roles"]), [9, 14, 6])
    seq, seq_rng = _sequential(model, pool, clients, cfg, spec.get("hooks"))
    grp, grp_rng = _grouped(model, pool, clients, cfg, spec.get("hooks"))
    _assert_same(seq, grp, tol)
    assert torch.equal(seq_rng, grp_rng)  # the random state is left where sequential training leaves it
    for (_, start, plan, _), up in zip(clients, grp):  # the round moved every client
        assert any(not torch.allclose(up.tensors[k], start.to_flat()[k]) for k in up.tensors)
    if case == "unequal steps":
        assert [u.metrics["steps"] for u in grp] == [5.0, 7.0, 3.0]


def test_private_clients_are_not_grouped():
    model, pool = _model()
    ranks, start, plan, ex = _clients(pool, torch.float64, [4], frozenset({"lora_B", "head"}), [8])[0]
    privacy = ClientPrivacy(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, clip=1.0, delta=1e-5)
    run = ClientRun(slots=pool.slots(ranks).standalone(start), plan=plan, examples=ex, train_cfg=train_cfg(),
                    round_idx=1, seed=0, privacy=privacy)
    with pytest.raises(ValueError, match="non-private"):
        train_group(model, [run], ClassificationTask.loss_from_logits)


def test_a_model_with_lora_cores_is_not_groupable():
    from fedlora.lora import add_lora_cores

    model, _ = _model()
    add_lora_cores(model)
    assert "cores" in groupable(model)
    with pytest.raises(ValueError, match="does not support"):
        GroupedForward(model)


def test_standalone_slots_are_the_clients_own_tensors():
    model, pool = _model()
    slots = pool.slots({n: 4 for n in pool.shapes})
    start = _start(pool, {n: 4 for n in pool.shapes}, 0, torch.float64)
    own = slots.standalone(start)
    assert own.params.keys() == slots.params.keys()
    for k, p in own.params.items():
        assert p.dtype == slots.params[k].dtype and p.data_ptr() != slots.params[k].data_ptr()
        assert torch.equal(p, start.to_flat()[k])
    assert np.isclose(float(own.read().to_flat()["classifier.bias"].sum()), float(start.to_flat()["classifier.bias"].sum()))


def test_bf16_grouped_round_equals_sequential_round_within_bf16_rounding():
    """Under train.precision = bf16 the grouped loss is computed inside autocast (in fp32), as train_client's is."""
    cfg = train_cfg(lr=0.5, momentum=0.9, batch_size=4, local_steps=10, precision="bf16")
    model, pool = _model(torch.float32)
    clients = _clients(pool, torch.float32, [4, 4, 4], frozenset({"lora_A", "lora_B", "head"}), [9, 14, 6])
    seq, _ = _sequential(model, pool, clients, cfg)
    runs = [ClientRun(slots=pool.slots(r).standalone(s), plan=p, examples=e, train_cfg=cfg, round_idx=2, seed=7)
            for r, s, p, e in clients]
    grp = train_group(model, runs, ClassificationTask.loss_from_logits, precision="bf16")
    _assert_same(seq, grp, 1e-2)


def test_models_and_lora_variants_the_packed_forward_does_not_handle_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    model, _ = _model()
    model.base_model.model.config._attn_implementation = "eager"  # eager adds a boolean mask to the scores
    assert "attention 'eager'" in groupable(model)
    model.base_model.model.config._attn_implementation = "sdpa"
    assert groupable(model) is None
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32,
                                                             max_position_embeddings=40))
    wrapped = get_peft_model(roberta, LoraConfig(r=2, target_modules=TARGETS, task_type="SEQ_CLS"))
    assert "model type 'roberta'" in groupable(wrapped)  # its positions start after the padding index
    for variant, needle in ((dict(use_dora=True), "DoRA"), (dict(use_rslora=True), "rsLoRA")):
        wrapped = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         task_type="SEQ_CLS", **variant))
        assert needle in groupable(wrapped)

"""Local training: trainable set (O5), FFA step formula (O8), α/η equivalence (O7), DP-SGD clipping and noise (O9);
the oracles are in docs/oracles.md."""
import types

import numpy as np
import pytest
import torch

from fedlora import client as client_mod
from fedlora.client import steps_per_round, train_client
from fedlora.methods.base import ClientPlan
from fedlora.privacy import ClientAccountant, ClientPrivacy
from tests.conftest import QuadData, quad_loss, tiny_linear_lora, train_cfg

D_IN, D_OUT, R = 10, 12, 4
FFA = frozenset({"lora_B"})


def _data(n=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return QuadData(torch.randn(n, D_IN, generator=g, dtype=torch.float64),
                    scale * torch.randn(n, D_OUT, generator=g, dtype=torch.float64))


def _plan(init, roles=FFA, download_roles=None):
    return ClientPlan(0, init.to_flat(download_roles or roles), train=roles, upload=roles)


def _run(model, slots, init, data, cfg, plan=None, privacy=None, accountant=None, hooks=None):
    return train_client(model=model, slots=slots, initial=init, plan=plan or _plan(init), examples=data,
                        loss_fn=quad_loss, train_cfg=cfg, round_idx=1, seed=0, privacy=privacy, accountant=accountant,
                        hooks=hooks)


def test_O8_one_sgd_step_changes_delta_W_by_minus_eta_s2_G_AtA():
    # Prepare: W0 fixed, B = 0, A seeded; full-batch SGD on L = ½ Σ_i ‖(W0 + sBA)x_i − y_i‖² / n
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R, alpha=8.0)
    data, eta = _data(n=8), 0.05
    W0 = model.base_model.model[0].base_layer.weight.detach().clone()
    A, s = init.modules["0"].A, init.modules["0"].scale
    # Execute
    up = _run(model, slots, init, data, train_cfg(lr=eta, batch_size=8, local_steps=1))
    # Assert
    X, Y = data.X.T, data.Y.T  # columns are examples
    G = (W0 @ X - Y) @ X.T / 8  # gradient of the mean loss wrt W at B = 0
    expected = -eta * s ** 2 * G @ A.T @ A
    got = s * up.tensors["0.lora_B.weight"] @ A
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_O5_ffa_trains_only_B_and_uploads_no_A(monkeypatch):
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    seen = []
    real = client_mod.make_optimizer
    monkeypatch.setattr(client_mod, "make_optimizer",
                        lambda params, cfg, lr, **kw: seen.extend(params) or real(params, cfg, lr, **kw))
    up = _run(model, slots, init, _data(), train_cfg(local_steps=5, optimizer="adamw", lr=0.01))
    a_param, b_param = slots.params["0.lora_A.weight"], slots.params["0.lora_B.weight"]
    assert [id(p) for p in seen] == [id(b_param)]
    assert set(up.tensors) == {"0.lora_B.weight"}
    assert torch.equal(a_param, init.modules["0"].A)  # bitwise unchanged
    assert up.tensors["0.lora_B.weight"].abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())  # trainable flags are reset for the next client


def test_fedit_plan_trains_A_too():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    both = frozenset({"lora_A", "lora_B"})
    up = _run(model, slots, init, _data(), train_cfg(local_steps=3), plan=_plan(init, both))
    assert set(up.tensors) == {"0.lora_A.weight", "0.lora_B.weight"}
    assert not torch.equal(up.tensors["0.lora_A.weight"], init.modules["0"].A)


def _delta_after(alpha, lr, privacy=None, steps=4):
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R, alpha=alpha)
    up = _run(model, slots, init, _data(n=12), train_cfg(lr=lr, batch_size=4, local_steps=steps), privacy=privacy)
    return init.modules["0"].scale * up.tensors["0.lora_B.weight"] @ init.modules["0"].A, up


@pytest.mark.parametrize("c", [2.0, 0.25])
def test_O7_ffa_alpha_and_learning_rate_are_interchangeable_under_sgd(c):
    dw1, up1 = _delta_after(alpha=8.0, lr=0.05)
    dw2, up2 = _delta_after(alpha=8.0 * c, lr=0.05 / c ** 2)
    torch.testing.assert_close(dw1, dw2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(up2.tensors["0.lora_B.weight"], up1.tensors["0.lora_B.weight"] / c, rtol=1e-9,
                               atol=1e-12)
    assert up1.metrics["loss"] == pytest.approx(up2.metrics["loss"], rel=1e-9)


def test_O7_holds_under_dp_sgd_when_clip_scales_with_alpha():
    c = 2.0
    p1 = ClientPrivacy(noise_multiplier=0.7, sample_rate=0.4, steps_per_round=4, clip=0.5, delta=1e-5)
    p2 = ClientPrivacy(noise_multiplier=0.7, sample_rate=0.4, steps_per_round=4, clip=0.5 * c, delta=1e-5)
    dw1, _ = _delta_after(alpha=8.0, lr=0.05, privacy=p1)
    dw2, _ = _delta_after(alpha=8.0 * c, lr=0.05 / c ** 2, privacy=p2)
    # Opacus clips with C / (‖g‖ + 1e-6): the stabiliser is not scale-invariant, hence 1e-4 instead of 1e-9.
    torch.testing.assert_close(dw1, dw2, rtol=1e-4, atol=1e-8)
    dw3, _ = _delta_after(alpha=8.0 * c, lr=0.05 / c ** 2, privacy=p1)  # C not scaled: a different trajectory
    assert not torch.allclose(dw1, dw3, rtol=1e-2, atol=1e-6)


def _per_example_grads(model, slots, data, init):
    """Reference per-example gradients of B, one autograd call per example."""
    slots.load(init)
    b = slots.params["0.lora_B.weight"]
    b.requires_grad_(True)
    grads = []
    for i in range(len(data)):
        loss = quad_loss(model, data.batch([i]))
        (g,) = torch.autograd.grad(loss, b)
        grads.append(g)
    b.requires_grad_(False)
    return torch.stack(grads)


def test_O9_dp_step_sums_clipped_per_example_gradients():
    # Prepare: large targets so every per-example gradient norm exceeds C; σ = 0, q = 1 (whole data each step)
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    data, C, eta, n = _data(n=6, scale=50.0), 0.5, 0.1, 6
    g = _per_example_grads(model, slots, data, init)
    norms = g.flatten(1).norm(dim=1)
    assert (norms > C).all()
    clipped = g * (C / (norms + 1e-6)).clamp(max=1.0)[:, None, None]
    assert (clipped.flatten(1).norm(dim=1) <= C + 1e-6).all()
    # Execute: one DP-SGD step through the real client path (Opacus GradSampleModule + DPOptimizer)
    priv = ClientPrivacy(noise_multiplier=0.0, sample_rate=1.0, steps_per_round=1, clip=C, delta=1e-5)
    up = _run(model, slots, init, data, train_cfg(lr=eta, batch_size=n), privacy=priv)
    # Assert
    expected_B = -eta * clipped.sum(0) / n
    torch.testing.assert_close(up.tensors["0.lora_B.weight"], expected_B, rtol=1e-8, atol=1e-10)


def test_O9_dp_with_no_noise_and_no_clipping_equals_plain_sgd():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    data = _data(n=6)
    priv = ClientPrivacy(noise_multiplier=0.0, sample_rate=1.0, steps_per_round=3, clip=1e12, delta=1e-5)
    dp = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=6, local_steps=3), privacy=priv)
    plain = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=6, local_steps=3))
    torch.testing.assert_close(dp.tensors["0.lora_B.weight"], plain.tensors["0.lora_B.weight"], rtol=1e-8,
                               atol=1e-10)


def test_O9_noise_std_is_sigma_C_over_batch():
    # Zero inputs give zero gradients, so one step moves B by -lr · N(0, σ²C²) / batch only.
    model, slots, init = tiny_linear_lora(D_IN, 256, 8)
    data = QuadData(torch.zeros(4, D_IN, dtype=torch.float64), torch.zeros(4, 256, dtype=torch.float64))
    sigma, C, n = 1.5, 2.0, 4
    priv = ClientPrivacy(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=1, clip=C, delta=1e-5)
    up = _run(model, slots, init, data, train_cfg(lr=1.0, batch_size=n), privacy=priv)
    step = up.tensors["0.lora_B.weight"]
    assert step.numel() == 2048
    assert abs(step.std().item() / (sigma * C / n) - 1) < 0.06
    assert abs(step.mean().item()) < 4 * (sigma * C / n) / np.sqrt(2048)


def test_dp_reports_epsilon_and_steps_the_accountant():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    acc = ClientAccountant()
    priv = ClientPrivacy(noise_multiplier=1.0, sample_rate=0.25, steps_per_round=5, clip=1.0, delta=1e-5)
    up1 = _run(model, slots, init, _data(n=16), train_cfg(batch_size=4), privacy=priv, accountant=acc)
    up2 = _run(model, slots, init, _data(n=16), train_cfg(batch_size=4), privacy=priv, accountant=acc)
    assert 0 < up1.metrics["epsilon"] < up2.metrics["epsilon"]
    assert acc.state_dict()[0] == [(1.0, 0.25, 10)]  # run-length history: 10 steps of (σ, q)


def test_empty_poisson_batches_take_noise_only_steps():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    priv = ClientPrivacy(noise_multiplier=1.0, sample_rate=0.02, steps_per_round=20, clip=1.0, delta=1e-5)
    up = _run(model, slots, init, _data(n=8), train_cfg(batch_size=1), privacy=priv)
    assert up.metrics["empty_batches"] > 0
    assert torch.isfinite(up.tensors["0.lora_B.weight"]).all() and up.tensors["0.lora_B.weight"].abs().sum() > 0


def test_gradient_accumulation_matches_one_big_batch():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    data = _data(n=8)
    one = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=8, local_steps=2))
    acc = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=8, grad_accum=4, local_steps=2))
    torch.testing.assert_close(one.tensors["0.lora_B.weight"], acc.tensors["0.lora_B.weight"], rtol=1e-10,
                               atol=1e-12)


def test_gradient_accumulation_under_dp_matches_one_big_batch():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    data = _data(n=8, scale=20.0)
    priv = ClientPrivacy(noise_multiplier=0.0, sample_rate=1.0, steps_per_round=2, clip=0.5, delta=1e-5)
    one = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=8), privacy=priv)
    acc = _run(model, slots, init, data, train_cfg(lr=0.1, batch_size=8, grad_accum=4), privacy=priv)
    torch.testing.assert_close(one.tensors["0.lora_B.weight"], acc.tensors["0.lora_B.weight"], rtol=1e-10,
                               atol=1e-12)


def test_lr_decays_per_round():
    from fedlora.client import round_lr

    cfg = train_cfg(lr=0.1, lr_decay=0.5)
    assert [round_lr(cfg, t) for t in (1, 2, 3)] == [0.1, 0.05, 0.025]
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    data = _data(n=8)
    r1 = train_client(model=model, slots=slots, initial=init, plan=_plan(init), examples=data, loss_fn=quad_loss,
                      train_cfg=train_cfg(lr=0.1, batch_size=8), round_idx=1, seed=0)
    r2 = train_client(model=model, slots=slots, initial=init, plan=_plan(init), examples=data, loss_fn=quad_loss,
                      train_cfg=train_cfg(lr=0.2, lr_decay=0.5, batch_size=8), round_idx=2, seed=0)
    # One SGD step from B = 0 is linear in the learning rate: 0.2 · 0.5 = 0.1
    torch.testing.assert_close(r1.tensors["0.lora_B.weight"], r2.tensors["0.lora_B.weight"], rtol=1e-10, atol=1e-14)


def test_steps_per_round_from_epochs():
    cfg = types.SimpleNamespace(local_epochs=1.5, batch_size=16, local_steps=7)
    assert steps_per_round(cfg, 100) == 10  # ceil(1.5·100/16)
    cfg.local_epochs = 0
    assert steps_per_round(cfg, 100) == 7


def test_a_plan_restricted_to_some_modules_trains_and_uploads_only_those():
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from fedlora.adapters import initial_adapter
    from fedlora.models import LoraSlots

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_IN, bias=False), nn.Linear(D_IN, D_OUT, bias=False)).double()
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=8.0, target_modules=["0", "1"])).double()
    for p in model.parameters():
        p.requires_grad_(False)
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, R, 8.0, 0)
    init = init.with_tensors({k: v.double() for k, v in init.to_flat().items()})
    roles = frozenset({"lora_A", "lora_B"})
    plan = ClientPlan(0, init.to_flat(roles), train=roles, upload=roles, modules=frozenset({"1"}))
    seen = []
    real = client_mod.make_optimizer
    client_mod.make_optimizer = lambda params, *a, **k: (seen.extend(params), real(params, *a, **k))[1]
    try:
        up = train_client(model=model, slots=slots, initial=init, plan=plan, examples=_data(n=8), loss_fn=quad_loss,
                          train_cfg=train_cfg(lr=0.1, local_steps=3), round_idx=1, seed=0)
    finally:
        client_mod.make_optimizer = real
    assert sorted(up.tensors) == ["1.lora_A.weight", "1.lora_B.weight"]
    assert len(seen) == 2 and all(p is slots.params[k] for p, k in zip(seen, sorted(up.tensors)))
    assert up.tensors["1.lora_B.weight"].abs().sum() > 0
    assert torch.equal(slots.params["0.lora_B.weight"], torch.zeros_like(slots.params["0.lora_B.weight"]))


def test_under_dp_a_client_reports_no_statistic_of_its_data():
    model, slots, init = tiny_linear_lora(D_IN, D_OUT, R)
    plain = _run(model, slots, init, _data(n=16), train_cfg(batch_size=4))
    assert "loss" in plain.metrics
    priv = ClientPrivacy(noise_multiplier=1.0, sample_rate=0.25, steps_per_round=3, clip=1.0, delta=1e-5)
    private = _run(model, slots, init, _data(n=16), train_cfg(batch_size=4), privacy=priv,
                   accountant=ClientAccountant())
    # steps, Poisson batch bookkeeping (depends on n and the seed only) and epsilon
    assert set(private.metrics) == {"steps", "empty_batches", "epsilon"}
    # FFA-LoRA's hook adds A's checksum: post-processing of the shared seed, not of the client's data
    from fedlora.methods.ffa import ReportsSharedA

    hooked = _run(model, slots, init, _data(n=16), train_cfg(batch_size=4), privacy=priv,
                  accountant=ClientAccountant(), hooks=ReportsSharedA())
    assert set(hooked.metrics) == {"steps", "empty_batches", "epsilon", "a_checksum"}


def _bert_examples(n=9):
    from fedlora.data.tasks import Examples

    g = torch.Generator().manual_seed(3)
    lengths = [3, 12, 5, 9, 4, 15, 6, 11, 7][:n]  # unsorted lengths: micro-batches get re-grouped by length
    ids = [torch.randint(4, 60, (k,), generator=g).tolist() for k in lengths]
    return Examples(ids, None, torch.tensor([i % 2 for i in range(n)]), 0)


@pytest.mark.parametrize("dp", [False, True])
def test_length_sorted_micro_batches_give_the_full_batch_step(dp):
    """Micro-batches are grouped by length (less padding): with per-example losses (and per-example gradients under
    DP) the step equals the one-batch step."""
    from peft import LoraConfig, get_peft_model

    from fedlora.adapters import initial_adapter
    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots
    from tests.conftest import tiny_bert

    model = get_peft_model(tiny_bert().double(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():  # no dropout: its masks depend on the batch's shape
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, 4, 8.0, 0, head={k: v.double() for k, v in slots.head().items()})
    init = init.with_tensors({k: v.double() for k, v in init.to_flat().items()})
    init = init.with_tensors({k: v + 0.1 for k, v in init.to_flat(frozenset({"lora_B"})).items()})
    data = _bert_examples()
    roles = frozenset({"lora_B", "head"})
    plan = ClientPlan(0, init.to_flat(roles), train=roles, upload=roles)
    priv = ClientPrivacy(noise_multiplier=0.0, sample_rate=1.0, steps_per_round=1, clip=0.05, delta=1e-5) if dp \
        else None
    outs = []
    for accum in (1, 3):
        up = train_client(model=model, slots=slots, initial=init, plan=plan, examples=data,
                          loss_fn=ClassificationTask.loss, train_cfg=train_cfg(lr=0.5, batch_size=9, grad_accum=accum),
                          round_idx=1, seed=0, privacy=priv)
        outs.append(up.tensors)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(outs[0][k], plan.download[k]) for k in outs[0])


@pytest.mark.parametrize("dp", [False, True])
def test_head_lr_scales_the_head_step_only(dp):
    """train.head_lr: one SGD step moves the head by head_lr/lr times the plain step and B exactly as before (under
    DP too: the noise is added to the clipped gradient before the optimiser splits it into groups)."""
    from peft import LoraConfig, get_peft_model

    from fedlora.adapters import initial_adapter
    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots
    from tests.conftest import tiny_bert

    model = get_peft_model(tiny_bert().double(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, 4, 8.0, 0, head={k: v.double() for k, v in slots.head().items()})
    init = init.with_tensors({k: v.double() + 0.1 for k, v in init.to_flat(frozenset({"lora_B"})).items()})
    roles = frozenset({"lora_B", "head"})
    plan = ClientPlan(0, init.to_flat(roles), train=roles, upload=roles)
    priv = ClientPrivacy(noise_multiplier=0.5, sample_rate=0.99, steps_per_round=1, clip=0.05, delta=1e-5) if dp \
        else None
    ups = [train_client(model=model, slots=slots, initial=init, plan=plan, examples=_bert_examples(),
                        loss_fn=ClassificationTask.loss, train_cfg=train_cfg(lr=0.5, head_lr=h, batch_size=9),
                        round_idx=1, seed=0, privacy=priv).tensors for h in (0.0, 1.5)]
    for k, v in ups[0].items():
        if "lora_B" in k:
            torch.testing.assert_close(ups[1][k], v, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(ups[1][k] - plan.download[k], 3 * (v - plan.download[k]), rtol=1e-8,
                                       atol=1e-12)


def test_fedprox_adds_mu_times_the_distance_from_the_start_to_every_step():
    """Full-batch SGD, FFA (B starts at 0): step 1 has no proximal pull (θ = θ_start), step 2 adds μ(B₁ − 0), so
    B₂(μ) = B₂(0) − η·μ·B₁ exactly."""
    eta, mu, key = 0.05, 3.0, "0.lora_B.weight"
    data = _data(n=8)

    def run(steps, prox_mu):
        model, slots, init = tiny_linear_lora(D_IN, D_OUT, R, alpha=8.0)
        return _run(model, slots, init, data, train_cfg(lr=eta, batch_size=8, local_steps=steps,
                                                        prox_mu=prox_mu)).tensors[key]

    b1 = run(1, 0.0)
    torch.testing.assert_close(run(1, mu), b1, rtol=0, atol=0)
    torch.testing.assert_close(run(2, mu), run(2, 0.0) - eta * mu * b1, rtol=1e-10, atol=1e-13)


def test_bf16_precision_autocasts_the_forward_and_keeps_fp32_weights():
    """``train.precision = bf16``: the base model's matmuls run in bfloat16 (seen by a hook), the trained tensors and
    the upload stay fp32, and the step is the fp32 step up to bfloat16 rounding."""
    from peft import LoraConfig, get_peft_model

    from fedlora.adapters import initial_adapter
    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots
    from tests.conftest import tiny_bert

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS"))
    for p in model.parameters():
        p.requires_grad_(False)
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, 4, 8.0, 0, head=slots.head())
    init = init.with_tensors({k: v + 0.1 for k, v in init.to_flat(frozenset({"lora_B"})).items()})
    roles = frozenset({"lora_B", "head"})
    plan = ClientPlan(0, init.to_flat(roles), train=roles, upload=roles)
    seen = []
    key = next(n for n, m in model.named_modules() if n.endswith("intermediate.dense"))
    hook = model.get_submodule(key).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ups = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        ups[precision] = train_client(
            model=model, slots=slots, initial=init, plan=plan, examples=_bert_examples(), loss_fn=ClassificationTask.loss,
            train_cfg=train_cfg(lr=0.5, batch_size=9, precision=precision), round_idx=1, seed=0, privacy=None).tensors
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    hook.remove()
    assert all(p.dtype == torch.float32 for p in slots.params.values())
    for k, v32 in ups["fp32"].items():
        v16, start = ups["bf16"][k], plan.download[k]
        assert v16.dtype == torch.float32
        step32, step16 = v32 - start, v16 - start
        assert step32.norm() > 0
        assert (step16 - step32).norm() <= 0.05 * step32.norm()  # bfloat16 keeps 8 bits of mantissa
    assert any(not torch.equal(ups["fp32"][k], ups["bf16"][k]) for k in ups["fp32"])


def test_bf16_is_refused_under_dp():
    from fedlora.config import load_config
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=\"bf16\"", "dp.enabled=true", "dp.epsilon=3"])
    assert load_config(None, ["train.precision=\"bf16\""]).train.precision == "bf16"


def test_fast_bf16_reads_the_cpu_and_trusts_gpus(monkeypatch):
    from fedlora.client import fast_bf16

    assert fast_bf16("cuda")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not fast_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fast_bf16("cpu")


def test_gradient_checkpointing_gives_the_same_update_with_dropout_on():
    """``train.gradient_checkpointing``: blocks recompute their activations in the backward pass with the dropout
    masks of the forward pass, so a client's update is the one it makes without checkpointing."""
    from peft import LoraConfig, get_peft_model

    from fedlora.adapters import initial_adapter
    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots
    from tests.conftest import tiny_bert

    base = tiny_bert().double()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())  # masks are drawn
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for p in model.parameters():
        p.requires_grad_(False)
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, 4, 8.0, 0, head={k: v.double() for k, v in slots.head().items()})
    init = init.with_tensors({k: v.double() for k, v in init.to_flat().items()})
    init = init.with_tensors({k: v + 0.1 for k, v in init.to_flat(frozenset({"lora_B"})).items()})
    roles = frozenset({"lora_A", "lora_B", "head"})
    plan = ClientPlan(0, init.to_flat(roles), train=roles, upload=roles)
    recomputed = []
    ups = []
    for checkpointing in (False, True):
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner = base.bert.encoder.layer[0].intermediate  # inside the checkpointed block: runs again when replayed
            inner.register_forward_hook(lambda *a: recomputed.append(1))
        ups.append(train_client(model=model, slots=slots, initial=init, plan=plan, examples=_bert_examples(),
                                loss_fn=ClassificationTask.loss, train_cfg=train_cfg(lr=0.5, batch_size=9, local_steps=3),
                                round_idx=1, seed=0, privacy=None).tensors)
    base.gradient_checkpointing_disable()
    assert len(recomputed) == 6  # 3 steps, each block run twice: the forward and its recomputation
    for k in ups[0]:
        torch.testing.assert_close(ups[1][k], ups[0][k], rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(ups[0][k], plan.download[k]) for k in ups[0])


def test_gradient_checkpointing_is_refused_with_memory_budget_methods():
    from fedlora.config import load_config
    from fedlora.engine.prepare import _check_method_options
    from fedlora.errors import ConfigError
    from fedlora.methods import get_method

    cfg = load_config("examples/pilot_tiny.toml", ["train.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _check_method_options(cfg, get_method(cfg.method))

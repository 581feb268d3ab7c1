"""The client's step (fedlora.dpsgd): FedProx's proximal gradient, plain and after DP-SGD's clipping and noise."""
import types

import pytest
import torch
from torch import nn

from fedlora.dpsgd import local_step


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    return model, x, y


def test_the_proximal_gradient_is_that_of_mu_half_squared_distance_in_the_loss():
    mu, lr = 0.7, 0.1
    model, x, y = _model_and_batch()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # away from the anchor, as after some local steps
    ref = nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())

    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    with local_step(model, opt) as stepper:
        nn.functional.cross_entropy(model(x), y).backward()
        stepper.step(params, len(x), extra_grad=lambda: [mu * (p.detach() - a) for p, a in zip(params, anchor)])

    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    loss = nn.functional.cross_entropy(ref(x), y)
    loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
    loss.backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_under_dp_sgd_the_proximal_gradient_is_neither_clipped_nor_noised():
    """With C tiny and σ = 0 the clipped data gradient is ~0: the step must be exactly -lr·μ(θ − θ_start) — a
    clipped proximal term would be at most C."""
    mu, lr, clip = 2.0, 0.5, 1e-9
    model, x, y = _model_and_batch()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    privacy = types.SimpleNamespace(noise_multiplier=0.0, clip=clip, sample_rate=1.0)
    opt = torch.optim.SGD(params, lr=lr)
    with local_step(model, opt, privacy, expected_batch_size=len(x), noise_seed=0) as stepper:
        nn.functional.cross_entropy(stepper.model(x), y).backward()
        stepper.step(params, len(x), extra_grad=lambda: [mu * (p.detach() - a) for p, a in zip(params, anchor)])
    for p, b, a in zip(model.parameters(), before, anchor):
        torch.testing.assert_close(p.detach(), b - lr * mu * (b - a), rtol=0, atol=1e-8)
    # and without the term the same step barely moves (the data gradient was clipped to C)
    model2, x, y = _model_and_batch()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    params2 = list(model2.parameters())
    opt2 = torch.optim.SGD(params2, lr=lr)
    with local_step(model2, opt2, privacy, expected_batch_size=len(x), noise_seed=0) as stepper:
        nn.functional.cross_entropy(stepper.model(x), y).backward()
        stepper.step(params2, len(x))
    for p, b in zip(model2.parameters(), before):
        assert (p.detach() - b).abs().max().item() < 1e-8


def test_prox_mu_is_validated_at_the_door():
    from fedlora.config import load_config
    from fedlora.errors import ConfigError

    assert load_config(None, ["train.prox_mu=0.01"]).train.prox_mu == 0.01
    with pytest.raises(ConfigError, match="train.prox_mu"):
        load_config(None, ["train.prox_mu=-1"])

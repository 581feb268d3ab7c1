"""Server optimisers (Reddi et al., ICLR 2021, Alg. 2; FedAvgM): hand-computed steps, state, and where they apply."""
import types

import pytest
import torch

from fedlora.adapters import Adapter, LoraModule
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.methods import get_method
from fedlora.methods.base import ServerState, Update
from fedlora.server_optimizer import ServerOptimizer, server_step

X = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}


def _avg(*values):
    return {"w": torch.tensor(values, dtype=torch.float64)}


def test_plain_fedavg_adopts_the_average_unchanged():
    avg = _avg(3.0, 4.0, 5.0)
    out, extra = server_step(ServerOptimizer("fedavg"), X, avg, {"kept": 1})
    assert out["w"] is avg["w"] and extra == {"kept": 1}


def test_fedavg_with_a_server_lr_steps_along_the_pseudo_gradient():
    out, _ = server_step(ServerOptimizer("fedavg", lr=0.5), X, _avg(3.0, 0.0, 0.5), {})
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))


def test_fedavgm_accumulates_momentum_over_rounds():
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    x1, extra = server_step(opt, X, _avg(2.0, -2.0, 0.5), {})        # Δ1 = (1, 0, 0): v1 = Δ1
    torch.testing.assert_close(x1["w"], torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64))
    x2, extra = server_step(opt, x1, _avg(2.0, -1.0, 0.5), extra)   # Δ2 = (0, 1, 0): v2 = 0.5·v1 + Δ2
    torch.testing.assert_close(x2["w"], torch.tensor([2.5, -1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(extra["server_opt/velocity/w"], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimisers_follow_reddi_algorithm_2(name):
    b1, b2, tau, eta = 0.9, 0.99, 1e-3, 0.1
    opt = ServerOptimizer(name, lr=eta, beta1=b1, beta2=b2, eps=tau)
    deltas = [torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64), torch.tensor([-0.4, 0.3, 0.05], dtype=torch.float64)]
    x, extra = dict(X), {}
    m, v, ref = torch.zeros(3, dtype=torch.float64), torch.full((3,), tau ** 2, dtype=torch.float64), X["w"].clone()
    for d in deltas:
        x, extra = server_step(opt, x, {"w": x["w"] + d}, extra)
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        elif name == "fedyogi":
            v = v - (1 - b2) * d * d * torch.sign(v - d * d)
        else:
            v = v + d * d
        ref = ref + eta * m / (v.sqrt() + tau)
        torch.testing.assert_close(x["w"], ref, rtol=1e-12, atol=1e-12)


def test_yogi_shrinks_v_when_the_update_gets_small_and_adagrad_uses_beta1():
    """Hand-computed: a large update, then a small one, so that v > Δ² and Yogi must lower v (sign +1), unlike Adam's
    decay and Adagrad's growth; one coordinate, β₁ = 0.5, β₂ = 0.75, τ = 0.1, η = 1."""
    x = {"w": torch.tensor([0.0], dtype=torch.float64)}
    opt = dict(lr=1.0, beta1=0.5, beta2=0.75, eps=0.1)
    expected_v = {"fedyogi": [0.26, 0.2575], "fedadam": [0.2575, 0.195625], "fedadagrad": [1.01, 1.02]}
    for name, (v1, v2) in expected_v.items():
        o = ServerOptimizer(name, **opt)
        # round 1: Δ = 1, v0 = τ² = 0.01 < Δ²: Yogi v1 = 0.01 + 0.25 = 0.26; Adam 0.75·0.01 + 0.25 = 0.2575
        x1, extra = server_step(o, x, {"w": x["w"] + 1.0}, {})
        assert float(extra["server_opt/v/w"]) == pytest.approx(v1)
        m1 = 0.5  # β₁·0 + (1 − β₁)·1: FedAdagrad keeps β₁ (Algorithm 2)
        assert float(x1["w"]) == pytest.approx(m1 / (v1 ** 0.5 + 0.1))
        # round 2: Δ = 0.1, Δ² = 0.01 < v1: Yogi v2 = v1 − 0.25·0.01·sign(v1 − 0.01) = v1 − 0.0025
        x2, extra = server_step(o, x1, {"w": x1["w"] + 0.1}, extra)
        assert float(extra["server_opt/v/w"]) == pytest.approx(v2)
        m2 = 0.5 * m1 + 0.5 * 0.1
        assert float(x2["w"]) == pytest.approx(float(x1["w"]) + m2 / (v2 ** 0.5 + 0.1))


def test_the_usual_step_when_server_lr_is_zero():
    assert ServerOptimizer("fedavgm").step_size == 1.0 and ServerOptimizer("fedadam").step_size == 1e-2
    assert ServerOptimizer("fedavg").is_identity and not ServerOptimizer("fedavg", lr=0.5).is_identity


def _state():
    return ServerState(Adapter({"m": LoraModule(torch.ones(2, 3, dtype=torch.float64),
                                                torch.zeros(4, 2, dtype=torch.float64), 4.0)}, {}))


def _method(name, server):
    cfg = types.SimpleNamespace(lora=types.SimpleNamespace(head="aggregate"), robust=None, server=server)
    return get_method(name)(cfg)


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_averaging_methods_step_with_the_server_optimizer_and_keep_its_state(method):
    server = types.SimpleNamespace(optimizer="fedavgm", lr=2.0, momentum=0.9, beta1=0.9, beta2=0.99, eps=1e-3)
    m, state = _method(method, server), _state()
    B = torch.full((4, 2), 0.25, dtype=torch.float64)
    ups = [Update(k, n, {"m.lora_B.weight": B * (k + 1)}) for k, n in enumerate([1, 3])]  # mean B = 0.4375
    new = m.aggregate(1, state, ups)
    torch.testing.assert_close(new.adapter.modules["m"].B, torch.full((4, 2), 0.875, dtype=torch.float64))
    torch.testing.assert_close(new.adapter.modules["m"].A, state.adapter.modules["m"].A)  # not uploaded: unchanged
    assert set(new.extra) == {"server_opt/velocity/m.lora_B.weight"}


def test_methods_with_their_own_server_rule_refuse_a_server_optimizer():
    from fedlora.engine.simulation import prepare

    for method, hint in [("flexlora", "fedit, fedsa, fedsb, ffa, rolora"), ("hetlora", "fedit, fedsa, fedsb, ffa, rolora"),
                         ("flora", "fedit, fedsa, fedsb, ffa, rolora"), ("fedex", "exact remainder"),
                         ("fedsvd", "SVD"), ("lorafair", "refinement"), ("pilot", "pilot.server_lr")]:
        cfg = load_config(None, [f"method={method}", "server.optimizer=fedadam", "memory.budgets=[0.5, 1.0]"])
        with pytest.raises(ConfigError, match=hint):
            prepare(cfg)


@pytest.mark.parametrize("override, key", [("server.optimizer=sgd", "server.optimizer"), ("server.lr=-1", "server.lr"),
                                           ("server.momentum=1", "server.momentum"), ("server.eps=0", "server.eps"),
                                           ("server.beta2=1.5", "server.beta2")])
def test_bad_server_settings_are_refused_at_the_door(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])

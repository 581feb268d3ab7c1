"""FedIT: data-weighted FedAvg of each factor (docs/methods.md §2) and its inexactness (oracle O3, docs/oracles.md)."""
import types

import pytest
import torch

from fedlora.adapters import Adapter, LoraModule
from fedlora.methods import get_method
from fedlora.methods.base import ServerState, Update, data_weights

torch.manual_seed(0)
D_OUT, D_IN, R = 12, 10, 4


def _cfg(head="aggregate"):
    return types.SimpleNamespace(lora=types.SimpleNamespace(head=head))


def _state():
    return ServerState(Adapter({"m": LoraModule(torch.randn(R, D_IN, dtype=torch.float64),
                                                torch.zeros(D_OUT, R, dtype=torch.float64), 8.0)},
                               {"classifier.weight": torch.zeros(2, D_OUT, dtype=torch.float64)}))


def _update(cid, n, A, B, head):
    return Update(cid, n, {"m.lora_A.weight": A, "m.lora_B.weight": B, "classifier.weight": head})


def test_configure_sends_and_trains_everything():
    method = get_method("fedit")(_cfg())
    plans = method.configure(1, _state(), [0, 2])
    assert [p.client_id for p in plans] == [0, 2]
    assert set(plans[0].download) == {"m.lora_A.weight", "m.lora_B.weight", "classifier.weight"}
    assert plans[0].train == plans[0].upload == frozenset({"lora_A", "lora_B", "head"})


def test_frozen_head_is_neither_sent_nor_trained():
    plan = get_method("fedit")(_cfg("frozen")).configure(1, _state(), [0])[0]
    assert "classifier.weight" not in plan.download and "head" not in plan.train


def test_aggregate_is_data_weighted_mean_of_each_factor():
    # Prepare
    method, state = get_method("fedit")(_cfg()), _state()
    ups = [_update(k, n, torch.randn(R, D_IN, dtype=torch.float64), torch.randn(D_OUT, R, dtype=torch.float64),
                   torch.randn(2, D_OUT, dtype=torch.float64)) for k, n in enumerate([10, 30, 60])]
    # Execute
    new = method.aggregate(1, state, ups).adapter
    # Assert: hand-computed weights 0.1, 0.3, 0.6
    exp_A = 0.1 * ups[0].tensors["m.lora_A.weight"] + 0.3 * ups[1].tensors["m.lora_A.weight"] + \
        0.6 * ups[2].tensors["m.lora_A.weight"]
    exp_B = sum(w * u.tensors["m.lora_B.weight"] for w, u in zip([0.1, 0.3, 0.6], ups))
    exp_h = sum(w * u.tensors["classifier.weight"] for w, u in zip([0.1, 0.3, 0.6], ups))
    torch.testing.assert_close(new.modules["m"].A, exp_A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.modules["m"].B, exp_B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.head["classifier.weight"], exp_h, rtol=1e-12, atol=1e-12)


def test_O3_fedit_is_inexact_unless_a_factor_is_shared():
    method, state = get_method("fedit")(_cfg()), _state()
    As = [torch.randn(R, D_IN, dtype=torch.float64) for _ in range(2)]
    Bs = [torch.randn(D_OUT, R, dtype=torch.float64) for _ in range(2)]
    head = torch.zeros(2, D_OUT, dtype=torch.float64)
    ups = [_update(k, n, As[k], Bs[k], head) for k, n in enumerate([1, 3])]
    p = data_weights(ups)
    ideal = sum(pk * B @ A for pk, A, B in zip(p, As, Bs))
    new = method.aggregate(1, state, ups).adapter.modules["m"]
    assert not torch.allclose(new.B @ new.A, ideal, rtol=1e-6, atol=1e-8)
    # Shared A -> exact
    ups = [_update(k, n, As[0], Bs[k], head) for k, n in enumerate([1, 3])]
    new = method.aggregate(1, state, ups).adapter.modules["m"]
    torch.testing.assert_close(new.B @ new.A, sum(pk * B @ As[0] for pk, B in zip(p, Bs)), rtol=1e-10, atol=1e-12)
    # Shared B -> exact
    ups = [_update(k, n, As[k], Bs[0], head) for k, n in enumerate([1, 3])]
    new = method.aggregate(1, state, ups).adapter.modules["m"]
    torch.testing.assert_close(new.B @ new.A, sum(pk * Bs[0] @ A for pk, A in zip(p, As)), rtol=1e-10, atol=1e-12)


def test_aggregate_without_updates_keeps_state():
    method, state = get_method("fedit")(_cfg()), _state()
    assert method.aggregate(1, state, []) is state


def test_weights_sum_to_one_and_reject_empty_data():
    ups = [Update(0, 5, {}), Update(1, 15, {})]
    assert data_weights(ups) == [0.25, 0.75]
    with pytest.raises(ValueError):
        data_weights([Update(0, 0, {})])

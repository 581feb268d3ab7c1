"""FFA-LoRA (docs/methods.md §3): only B travels, aggregation is exact (O4), half the parameters (O6); the oracles
are in docs/oracles.md."""
import types

import pytest
import torch

from fedlora.adapters import Adapter, LoraModule, initial_adapter
from fedlora.errors import UpdateError
from fedlora.methods import get_method
from fedlora.methods.base import ServerState, Update, data_weights
from fedlora.methods.ffa import a_checksum

D_OUT, D_IN, R = 12, 10, 4


def _cfg(head="aggregate"):
    return types.SimpleNamespace(lora=types.SimpleNamespace(head=head))


def _state():
    g = torch.Generator().manual_seed(1)
    return ServerState(Adapter({"m1": LoraModule(torch.randn(R, D_IN, generator=g, dtype=torch.float64),
                                                 torch.zeros(D_OUT, R, dtype=torch.float64), 8.0),
                                "m2": LoraModule(torch.randn(2, 6, generator=g, dtype=torch.float64),
                                                 torch.zeros(5, 2, dtype=torch.float64), 4.0)},
                               {"classifier.bias": torch.zeros(2, dtype=torch.float64)}))


def test_plan_sends_only_B_and_head_and_never_A():
    plan = get_method("ffa")(_cfg()).configure(1, _state(), [3])[0]
    assert set(plan.download) == {"m1.lora_B.weight", "m2.lora_B.weight", "classifier.bias"}
    assert "lora_A" not in plan.train and "lora_A" not in plan.upload
    assert plan.train == plan.upload == frozenset({"lora_B", "head"})


def test_O4_aggregation_reproduces_weighted_mean_of_client_products_exactly():
    # Prepare: 3 clients with different B and sizes, all sharing the server's A
    method, state = get_method("ffa")(_cfg()), _state()
    g = torch.Generator().manual_seed(2)
    ups = []
    for k, n in enumerate([7, 11, 2]):
        t = {f"{m}.lora_B.weight": torch.randn(*state.adapter.modules[m].B.shape, generator=g, dtype=torch.float64)
             for m in ("m1", "m2")}
        t["classifier.bias"] = torch.randn(2, generator=g, dtype=torch.float64)
        ups.append(Update(k, n, t, {"a_checksum": float(a_checksum(state.adapter))}))
    p = data_weights(ups)
    # Execute
    new = method.aggregate(1, state, ups).adapter
    # Assert: s·B_new·A == Σ p_k s·B_k·A, and A untouched bitwise
    for m in ("m1", "m2"):
        mod = state.adapter.modules[m]
        ideal = sum(pk * mod.scale * u.tensors[f"{m}.lora_B.weight"] @ mod.A for pk, u in zip(p, ups))
        torch.testing.assert_close(new.modules[m].delta(), ideal, rtol=1e-12, atol=1e-14)
        assert torch.equal(new.modules[m].A, mod.A)


def test_aggregate_refuses_clients_with_a_different_A():
    method, state = get_method("ffa")(_cfg()), _state()
    other = state.adapter.clone()
    other.modules["m1"].A[0, 0] += 1e-3
    ups = [Update(0, 1, {"m1.lora_B.weight": torch.zeros(D_OUT, R, dtype=torch.float64),
                         "m2.lora_B.weight": torch.zeros(5, 2, dtype=torch.float64),
                         "classifier.bias": torch.zeros(2, dtype=torch.float64)},
                  {"a_checksum": float(a_checksum(other))})]
    with pytest.raises(UpdateError, match="different A"):
        method.aggregate(1, state, ups)


def test_O6_parameter_count_is_half_of_fedit_for_square_modules():
    # RoBERTa-large q,v at r=8: 24 layers × 2 modules of 1024×1024 (the FFA-LoRA paper's GLUE model; O6)
    shapes = {f"layer.{i}.{m}": (1024, 1024) for i in range(24) for m in ("query", "value")}
    ad = initial_adapter(shapes, rank=8, alpha=16, seed=0)
    assert ad.num_parameters(("lora_B",)) == 393_216
    assert ad.num_parameters(("lora_A", "lora_B")) == 786_432


def test_O6_rectangular_modules_count_d_out_times_r():
    shapes = {"up": (64, 16), "down": (16, 64)}
    ad = initial_adapter(shapes, rank=4, alpha=8, seed=0)
    assert ad.num_parameters(("lora_B",)) == 64 * 4 + 16 * 4
    assert ad.num_parameters(("lora_A", "lora_B")) == 4 * (64 + 16) * 2

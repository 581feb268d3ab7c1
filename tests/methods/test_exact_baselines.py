"""Oracles of the exact-aggregation baselines (FedEx-LoRA, RoLoRA, FedSVD, LoRA-FAIR) in float64 against hand
computations.

The inputs are the ones a transcription of each method's official server code was run on (3 clients of 10, 20 and
30 examples, one 4×3 module at rank 2, alpha 4, tensors from ``torch.manual_seed(0)``); the expected numbers below
are that transcription's output (docs/methods.md §15 lists where our rules differ from the code, and why)."""
from __future__ import annotations

import types

import pytest
import torch

from fedlora.adapters import Adapter, LoraModule
from fedlora.methods import get_method
from fedlora.methods.base import FederationSpec, ServerState, Update

SIZES = [10, 20, 30]
P = [n / 60 for n in SIZES]


def _cfg(**sections):
    return types.SimpleNamespace(lora=types.SimpleNamespace(head="frozen"), server=None, **sections)


def _spec():
    return FederationSpec({"m": (4, 3)}, {k: {"m": 2} for k in range(3)}, 4.0, 0)


def _state(A, B):
    return ServerState(Adapter({"m": LoraModule(A.clone(), B.clone(), 4.0)}, {}))


def _updates(tensors):
    return [Update(k, n, t) for k, (n, t) in enumerate(zip(SIZES, tensors))]


def _fedex_inputs():
    torch.manual_seed(0)
    As, Bs = [], []
    for _ in range(3):
        As.append(torch.randn(2, 3, dtype=torch.float64))
        Bs.append(torch.randn(4, 2, dtype=torch.float64))
    return As, Bs


def test_fedex_folds_the_exact_residual_into_the_base():
    As, Bs = _fedex_inputs()
    assert As[0][0, 0].item() == pytest.approx(1.5409961082440433, abs=1e-15)  # the transcription's inputs
    method = get_method("fedex")(_cfg(fedex=types.SimpleNamespace(residual="factors")), _spec())
    state = method.init_state(_state(torch.zeros(2, 3, dtype=torch.float64),
                                     torch.zeros(4, 2, dtype=torch.float64)).adapter)
    ups = _updates([{"m.lora_A.weight": A, "m.lora_B.weight": B} for A, B in zip(As, Bs)])
    new = method.aggregate(1, state, ups)
    residual = torch.tensor([[0.313311899898713, 0.18377938106892527, -1.5675589460403316],
                             [-0.18427209851861984, 0.09725214429148649, -0.7365250561072088],
                             [0.5602854446485276, -0.5236635342307863, -0.6498495122875287],
                             [0.020209627914015385, -0.12587419659259955, 0.6199005348270006]], dtype=torch.float64)
    offset = method.base_delta(new)["m"]
    torch.testing.assert_close(offset, 2.0 * residual, rtol=0, atol=1e-14)
    m = new.adapter.modules["m"]
    torch.testing.assert_close(m.A[0], torch.tensor([-0.11066950616036236, -0.3672444257524044, -0.29258568092186016],
                                                    dtype=torch.float64), rtol=0, atol=1e-15)
    # exact: W0 + offset + s·B̄Ā = W0 + s·Σ p_k B_k A_k
    exact = sum(p * 2.0 * B @ A for p, A, B in zip(P, As, Bs))
    torch.testing.assert_close(offset + 2.0 * m.B @ m.A, exact, rtol=0, atol=1e-14)
    # the next round: a participant downloads the increment, a newcomer the whole offset
    plans = method.configure(2, new, [0, 2])
    assert set(plans[0].merge) == {"m.step"}  # "factors" on a 4×3 module: the dense increment is the smaller
    assert method.client_base(plans[0].merge, {"m": torch.zeros(4, 3, dtype=torch.float64)})["m"].equal(offset)
    new2 = method.aggregate(2, new, ups[:1])
    late = method.configure(3, new2, [1])[0]
    assert set(late.merge) == {"m.delta"} and late.merge["m.delta"].equal(method.base_delta(new2)["m"])
    # on a wide module the factors are smaller, and travel as the stack; the client's base is still the server's
    wide = ServerState(state.adapter, {"participants": [0], "stack_B/m": torch.randn(64, 8, dtype=torch.float64),
                                       "stack_A/m": torch.randn(8, 64, dtype=torch.float64)})
    merge = method.merge_for(wide, 0)
    assert set(merge) == {"m.stack_B", "m.stack_A"}
    assert method.client_base(merge, {"m": torch.zeros(64, 64, dtype=torch.float64)})["m"].equal(
        wide.extra["stack_B/m"] @ wide.extra["stack_A/m"])
    # an empty round (no accepted update) clears the increment: nobody applies a round's residual twice
    empty = method.aggregate(3, new, [])
    assert empty.extra["participants"] == [] and not any(k.startswith("stack_") for k in empty.extra)
    assert set(method.configure(4, empty, [0])[0].merge) == {"m.delta"}
    # the default ships the residual dense: only the aggregate is seen, and the client's base is the server's
    dense = get_method("fedex")(_cfg(fedex=types.SimpleNamespace(residual="dense")), _spec())
    plan = dense.configure(2, new, [0])[0]
    assert set(plan.merge) == {"m.step"}
    assert dense.client_base(plan.merge, {"m": torch.zeros(4, 3, dtype=torch.float64)})["m"].equal(offset)
    # the export holds the whole update as one adapter
    export = method.export_adapter(new).modules["m"]
    torch.testing.assert_close(export.scale * export.B @ export.A, exact, rtol=0, atol=1e-12)


def test_rolora_alternates_b_and_a_rounds_and_each_average_is_exact():
    torch.manual_seed(0)
    A0 = torch.randn(2, 3, dtype=torch.float64)
    Bs, As = [], []
    for _ in range(3):
        Bs.append(torch.randn(4, 2, dtype=torch.float64))
        As.append(torch.randn(2, 3, dtype=torch.float64))
    method = get_method("rolora")(_cfg(), _spec())
    state = _state(A0, torch.zeros(4, 2, dtype=torch.float64))
    plans = method.configure(1, state, [0, 1, 2])
    assert plans[0].train == {"lora_B"} and plans[0].upload == {"lora_B"}
    state = method.aggregate(1, state, _updates([{"m.lora_B.weight": B} for B in Bs]))
    B_bar = state.adapter.modules["m"].B
    torch.testing.assert_close(B_bar[0], torch.tensor([-0.9187006992355119, 0.75466419511283223],
                                                      dtype=torch.float64), rtol=0, atol=1e-15)
    assert state.adapter.modules["m"].A.equal(A0)
    plans = method.configure(2, state, [0, 1, 2])
    assert plans[0].train == {"lora_A"} and plans[0].upload == {"lora_A"}
    state = method.aggregate(2, state, _updates([{"m.lora_A.weight": A} for A in As]))
    m = state.adapter.modules["m"]
    torch.testing.assert_close(m.A[0], torch.tensor([-0.18925970549882107, -0.67629086716588827,
                                                     -0.4657991558888766], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(m.B @ m.A, sum(p * B_bar @ A for p, A in zip(P, As)), rtol=0, atol=1e-15)
    assert method.configure(3, state, [0])[0].train == {"lora_B"}


def test_fedsvd_averages_b_then_refits_a_orthonormal_and_keeps_the_product():
    torch.manual_seed(0)
    A0 = torch.randn(2, 3, dtype=torch.float64)
    Bs = []
    for _ in range(3):
        Bs.append(torch.randn(4, 2, dtype=torch.float64))
        torch.randn(2, 3, dtype=torch.float64)  # the transcription's A_k, unused: FedSVD clients train B only
    method = get_method("fedsvd")(_cfg(fedsvd=types.SimpleNamespace(period=1)), _spec())
    state = _state(A0, torch.zeros(4, 2, dtype=torch.float64))
    plan = method.configure(1, state, [0])[0]
    assert plan.train == {"lora_B"} and set(plan.download) == {"m.lora_A.weight", "m.lora_B.weight"}
    new = method.aggregate(1, state, _updates([{"m.lora_B.weight": B} for B in Bs]))
    m = new.adapter.modules["m"]
    product = torch.tensor([[-0.98673946981703087, -0.54887683972881463, 0.94618546046272844],
                            [-0.52908402885167249, 0.15865895760631826, 0.78335287797234043],
                            [0.15171818050604124, -0.021620344177991607, -0.21008244962009456],
                            [-0.87775711944030188, 0.10485950325062846, 1.2030969750772484]], dtype=torch.float64)
    torch.testing.assert_close(m.B @ m.A, product, rtol=0, atol=1e-14)
    torch.testing.assert_close(m.A @ m.A.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.linalg.norm(m.B, dim=0), torch.tensor([2.2463473954064899, 0.58255563328850424],
                                                                          dtype=torch.float64), rtol=0, atol=1e-14)
    # period 0: no re-factorisation (FFA-LoRA with the server's A)
    plain = get_method("fedsvd")(_cfg(fedsvd=types.SimpleNamespace(period=0)), _spec())
    assert plain.aggregate(1, state, _updates([{"m.lora_B.weight": B} for B in Bs])).adapter.modules["m"].A.equal(A0)


def test_lorafair_refines_b_as_the_derived_code_does_and_restarts_clients_from_it():
    """``refine_b`` against a transcription of the LoRA-FAIR-derived server code (SpecTraL ``server.py``) on the same
    input: with that code's Xavier start and λ = 1 it stops early after the same iterations with the same ΔB; from
    zero with the paper's λ = 0.01 (our default), 1000 steps give the transcription's ΔB."""
    from fedlora.methods.lorafair import refine_b

    As, Bs = _fedex_inputs()
    A_bar = sum(p * A for p, A in zip(P, As))
    B_bar = sum(p * B for p, B in zip(P, Bs))
    target = sum(p * (B @ A) for p, A, B in zip(P, As, Bs))  # the transcription's order of operations
    xavier = torch.tensor([[-0.7776616347697914, 0.6190519065332402], [0.5779703885969815, 0.5953087898486821],
                           [-0.186572021756465, 0.4472422134010447], [-0.9763707924006725, -0.48681598500163886]],
                          dtype=torch.float64)
    v1 = xavier + refine_b(target, B_bar, A_bar, 1.0, 0.01, 1000, start=xavier) - xavier
    torch.testing.assert_close(v1[0], torch.tensor([-0.001085855429410259, -0.023610971397902452],
                                                   dtype=torch.float64), rtol=0, atol=1e-12)
    # at λ = 0.01 the descent amplifies rounding (a relative 1e-15 change of the target moves ΔB by ~0.04 after
    # 1000 steps), so this comparison holds for the same arithmetic only
    v4 = refine_b(target, B_bar, A_bar, 0.01, 0.01, 1000, patience=10 ** 9)
    torch.testing.assert_close(v4[0], torch.tensor([0.6585300301525502, -0.48223410787323756], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity
    assert cos(target, (B_bar + v4) @ A_bar, dim=0).mean() > cos(target, B_bar @ A_bar, dim=0).mean() + 0.5
    # the method: A is the average, B the refined average; the next round starts every client there
    method = get_method("lorafair")(_cfg(lorafair=types.SimpleNamespace(lambda_reg=0.01, lr=0.01, steps=1000)), _spec())
    state = _state(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    new = method.aggregate(1, state, _updates([{"m.lora_A.weight": A, "m.lora_B.weight": B} for A, B in zip(As, Bs)]))
    m = new.adapter.modules["m"]
    torch.testing.assert_close(m.A, A_bar, rtol=0, atol=1e-15)
    assert cos(target, m.B @ m.A, dim=0).mean() > 0.85
    assert method.configure(2, new, [0])[0].download["m.lora_B.weight"].equal(m.B)

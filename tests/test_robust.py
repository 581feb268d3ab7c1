"""Robust aggregation rules and norm bounding (issue: nothing let in)."""
import math

import pytest
import torch

from fedlora.robust import bound_norm, combine


def _ts(*vals):
    return [torch.tensor([v], dtype=torch.float64) for v in vals]


def test_mean_is_the_weighted_average():
    assert combine(_ts(1.0, 3.0), [0.25, 0.75], "mean").item() == pytest.approx(2.5)


def test_median_ignores_one_huge_outlier():
    assert combine(_ts(1.0, 2.0, 1e9), [1 / 3] * 3, "median").item() == 2.0
    assert combine(_ts(1.0, 2.0, 3.0, 1e9), [0.25] * 4, "median").item() == 2.5  # mean of the middle two


def test_trimmed_mean_drops_both_ends_per_coordinate():
    t = [torch.tensor([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    out = combine(t, [0.2] * 5, "trimmed_mean", trim_fraction=0.2)
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0]))


def test_trimmed_mean_with_too_few_clients_keeps_the_middle():
    out = combine(_ts(1.0, 2.0), [0.5, 0.5], "trimmed_mean", trim_fraction=0.49)
    assert out.item() == 1.5


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        combine(_ts(1.0), [1.0], "krum")


def test_norm_bound_scales_the_delta_not_the_weights():
    ref = {"a": torch.ones(3), "b": torch.zeros(4)}
    up = {"a": torch.ones(3) + 3.0, "b": torch.full((4,), 4.0)}  # delta norm = sqrt(27 + 64)
    bounded, norm = bound_norm(up, ref, 1.0)
    assert norm == pytest.approx(math.sqrt(91))
    delta = torch.cat([(bounded["a"] - ref["a"]), bounded["b"] - ref["b"]])
    assert delta.norm().item() == pytest.approx(1.0, rel=1e-6)
    same, _ = bound_norm(up, ref, 100.0)
    assert same is up


def test_methods_use_the_configured_rule():
    import types

    from fedlora.adapters import initial_adapter
    from fedlora.methods import get_method
    from fedlora.methods.base import ServerState, Update

    cfg = types.SimpleNamespace(lora=types.SimpleNamespace(head="frozen"),
                                robust=types.SimpleNamespace(aggregation="median", trim_fraction=0.1))
    st = ServerState(initial_adapter({"m": (2, 2)}, 1, 1.0, 0))
    ups = [Update(k, n, {"m.lora_B.weight": torch.full((2, 1), v)}) for k, (n, v) in
           enumerate([(1, 1.0), (1, 2.0), (1000, 1e6)])]
    out = get_method("ffa")(cfg).aggregate(1, st, ups).adapter.modules["m"].B
    assert torch.equal(out, torch.full((2, 1), 2.0))

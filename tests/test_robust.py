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


def _cfg(**robust):
    import types

    r = {"aggregation": "mean", "trim_fraction": 0.1, "norm_bound": 0.0, **robust}
    return types.SimpleNamespace(lora=types.SimpleNamespace(head="frozen"), server=None,
                                 robust=types.SimpleNamespace(**r))


def test_the_robust_wrapper_makes_a_method_use_the_configured_rule():
    from fedlora.adapters import initial_adapter
    from fedlora.methods import get_method
    from fedlora.methods.base import ServerState, Update
    from fedlora.robust import RobustAggregation, with_robust

    cfg = _cfg(aggregation="median")
    st = ServerState(initial_adapter({"m": (2, 2)}, 1, 1.0, 0))
    ups = [Update(k, n, {"m.lora_B.weight": torch.full((2, 1), v)}) for k, (n, v) in
           enumerate([(1, 1.0), (1, 2.0), (1000, 1e6)])]
    wrapped = with_robust(get_method("ffa")(cfg), cfg.robust)
    assert isinstance(wrapped, RobustAggregation)
    assert torch.equal(wrapped.aggregate(1, st, ups).adapter.modules["m"].B, torch.full((2, 1), 2.0))
    # the method itself knows nothing of robust rules: unwrapped it is the data-weighted mean
    plain = get_method("ffa")(cfg).aggregate(1, st, ups).adapter.modules["m"].B
    assert plain[0, 0].item() == pytest.approx((1.0 + 2.0 + 1000 * 1e6) / 1002)


def test_plain_robust_settings_leave_the_method_unwrapped():
    from fedlora.methods import get_method
    from fedlora.robust import with_robust

    cfg = _cfg()
    method = get_method("fedit")(cfg)
    assert with_robust(method, cfg.robust) is method
    assert method.admit(None, {"x": torch.ones(1)}) == ({"x": torch.ones(1)}, None)


def test_the_wrapper_forwards_everything_else_to_the_method():
    from fedlora.methods import get_method
    from fedlora.robust import with_robust

    cfg = _cfg(aggregation="trimmed_mean")
    inner = get_method("ffa")(cfg)
    wrapped = with_robust(inner, cfg.robust)
    assert wrapped.name == "ffa" and wrapped.local_hooks == inner.local_hooks
    assert wrapped.configure.__self__ is inner


def test_methods_that_do_not_average_cannot_be_wrapped():
    from fedlora.methods import get_method
    from fedlora.methods.base import FederationSpec
    from fedlora.robust import RobustAggregation

    cfg = _cfg(aggregation="median")
    cfg.flexlora = None
    spec = FederationSpec({"m": (2, 2)}, {0: {"m": 1}}, 1.0, 0)
    with pytest.raises(ValueError, match="does not average tensors"):
        RobustAggregation(get_method("flexlora")(cfg, spec), cfg.robust)


def test_admit_bounds_the_update_against_what_the_client_started_from():
    """Tensors a plan does not send start from the shared-seed initial adapter, which is then the reference the
    update is measured against; tensors it sends are their own reference."""
    from fedlora.methods import get_method
    from fedlora.methods.base import ClientPlan, FederationSpec
    from fedlora.robust import with_robust

    cfg = _cfg(norm_bound=0.5)
    spec = FederationSpec({"m": (3, 4)}, {0: {"m": 2}}, 2.0, 7)
    wrapped = with_robust(get_method("fedit")(cfg, spec), cfg.robust)
    start = spec.initial(0)
    plan = ClientPlan(0, {}, frozenset({"lora_A", "lora_B"}), frozenset({"lora_A", "lora_B"}))
    sent = plan.uploaded(start)
    uploaded = {k: v + 1.0 for k, v in sent.items()}  # ||delta|| = sqrt(#elements)
    kept, norm = wrapped.admit(plan, uploaded)
    assert norm == pytest.approx(math.sqrt(sum(v.numel() for v in sent.values())))
    delta = torch.cat([(kept[k] - sent[k]).flatten() for k in sent])
    assert delta.norm().item() == pytest.approx(0.5, rel=1e-6)
    # with the tensors in the download, the reference is the download
    plan2 = ClientPlan(0, {k: v * 0 for k, v in sent.items()}, plan.train, plan.upload)
    _, norm2 = wrapped.admit(plan2, uploaded)
    assert norm2 == pytest.approx(math.sqrt(sum(float(((v + 1.0) ** 2).sum()) for v in sent.values())))

"""FlexLoRA, HetLoRA and FLoRA as server rules over client factors of different ranks (float64, tiny shapes).

Each test drives the method's public configure/aggregate with hand-made updates and checks an oracle of
docs/oracles.md (O11–O16, O18–O20, O30)."""
import math

import pytest
import torch

from fedlora.adapters import A_SUFFIX, B_SUFFIX, Adapter, LoraModule
from fedlora.config import load_config
from fedlora.lowrank import dense_svd, weighted_product_sum
from fedlora.methods import get_method
from fedlora.methods.base import FederationSpec, Update

SHAPES = {"m1": (12, 10), "m2": (9, 11)}
ALPHA = 16.0


def _spec(ranks_by_client):
    client_ranks = {k: {n: r for n in SHAPES} for k, r in enumerate(ranks_by_client)}
    return FederationSpec(dict(SHAPES), client_ranks, ALPHA, seed=0)


def _method(name, ranks_by_client, *overrides):
    cfg = load_config(None, [f"method={name}", *overrides])
    spec = _spec(ranks_by_client)
    m = get_method(name)(cfg, spec)
    state = m.init_state(spec.initial(ranks=spec.global_ranks()).clone())
    state.adapter = Adapter({n: LoraModule(mod.A.double(), mod.B.double(), mod.alpha)
                             for n, mod in state.adapter.modules.items()})
    return m, state


def _random_update(cid, ranks, n, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in SHAPES.items():
        tensors[name + B_SUFFIX] = torch.randn(d_out, ranks, generator=g, dtype=torch.float64)
        tensors[name + A_SUFFIX] = torch.randn(ranks, d_in, generator=g, dtype=torch.float64)
    return Update(cid, n, tensors)


def _product(state, name):
    return state.adapter.modules[name].delta()


def _target(updates, name):
    total = sum(u.num_examples for u in updates)
    Bs = [u.tensors[name + B_SUFFIX] for u in updates]
    As = [u.tensors[name + A_SUFFIX] for u in updates]
    coeffs = [u.num_examples / total * ALPHA / A.shape[0] for u, A in zip(updates, As)]
    return weighted_product_sum(Bs, As, coeffs)


# ---------------------------------------------------------------- FlexLoRA
def test_flexlora_global_is_the_exact_weighted_sum_of_products():
    ranks = [1, 2, 4]
    m, state = _method("flexlora", ranks)
    updates = [_random_update(k, r, n, seed=k) for k, (r, n) in enumerate(zip(ranks, [10, 30, 60]))]
    new = m.aggregate(1, state, updates)
    for name in SHAPES:
        torch.testing.assert_close(_product(new, name), _target(updates, name), rtol=1e-10, atol=1e-12)
    # O11: invariant to client order; a duplicated client == one client with twice the data
    rev = m.aggregate(1, state, list(reversed(updates)))
    dup = m.aggregate(1, state, [updates[0], updates[0], updates[1]])
    doubled = m.aggregate(1, state, [Update(0, 20, updates[0].tensors), updates[1]])
    for name in SHAPES:
        torch.testing.assert_close(_product(rev, name), _product(new, name), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_product(dup, name), _product(doubled, name), rtol=1e-10, atol=1e-12)


def test_flexlora_finishes_a_round_from_its_light_state_exactly():
    """``state_during_round`` (issue 18: the previous ΔW is not held while a round's sums grow): finishing a round
    from the light state gives the very tensors finishing from the full state gives."""
    from fedlora.methods.base import ClientPlan

    ranks = [1, 2, 4]
    m, state = _method("flexlora", ranks)
    state = m.aggregate(1, state, [_random_update(k, r, 10 * (k + 1), seed=k) for k, r in enumerate(ranks)])
    updates = [_random_update(k, r, 5 * (k + 2), seed=10 + k) for k, r in enumerate(ranks)]
    plans = [ClientPlan(k, {}, frozenset(), frozenset(), ranks=m.spec.client_ranks[k]) for k in range(3)]
    results = []
    for during in (state, m.state_during_round(state)):  # the engine begins with the full state, then lightens it
        acc = m.begin(2, state, plans)
        for u in updates:
            m.accumulate(acc, u)
        results.append(m.finish(2, during, acc))
    full, light = (r.adapter.to_flat() for r in results)
    assert full.keys() == light.keys() and all(torch.equal(full[k], light[k]) for k in full)
    assert not m.state_during_round(state).adapter.modules  # the light state holds no module
    empty = m.state_during_round(state)
    assert m.finish(2, empty, m.begin(2, state, plans)) is empty  # no upload: the engine reads the state back


def test_flexlora_clients_get_the_best_approximation_at_their_rank():
    ranks = [1, 2, 3]
    m, state = _method("flexlora", ranks)
    # round 1: nothing aggregated yet, clients start from their fresh init (nothing downloaded)
    assert all(p.download == {} for p in m.configure(1, state, [0, 1, 2]))
    updates = [_random_update(k, r, 10 * (k + 1), seed=10 + k) for k, r in enumerate(ranks)]
    state = m.aggregate(1, state, updates)
    plans = m.configure(2, state, [0, 1, 2])
    for plan, r in zip(plans, ranks):
        assert plan.ranks == {n: r for n in SHAPES}
        for name in SHAPES:
            B, A = plan.download[name + B_SUFFIX], plan.download[name + A_SUFFIX]
            assert B.shape[1] == A.shape[0] == r
            U, S, Vh = dense_svd(_target(updates, name))
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(ALPHA / r * B @ A, best, rtol=1e-9, atol=1e-11)  # O13
            torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)  # O14
            err = torch.linalg.norm(_target(updates, name) - ALPHA / r * B @ A) ** 2
            assert float(err) == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9)


def test_flexlora_single_client_round_trip_is_exact_O12():
    m, state = _method("flexlora", [3])
    u = _random_update(0, 3, 5, seed=3)
    state = m.aggregate(1, state, [u])
    plan = m.configure(2, state, [0])[0]
    for name in SHAPES:
        B, A = plan.download[name + B_SUFFIX], plan.download[name + A_SUFFIX]
        torch.testing.assert_close(ALPHA / 3 * B @ A, ALPHA / 3 * u.tensors[name + B_SUFFIX] @ u.tensors[name + A_SUFFIX],
                                   rtol=1e-9, atol=1e-11)


def test_flexlora_sqrt_split_gives_the_same_products():
    ranks = [2, 3]
    mb, sb = _method("flexlora", ranks)
    ms, ss = _method("flexlora", ranks, 'flexlora.svd_split="sqrt"')
    updates = [_random_update(k, r, 7, seed=20 + k) for k, r in enumerate(ranks)]
    pb = mb.configure(2, mb.aggregate(1, sb, updates), [0, 1])
    ps = ms.configure(2, ms.aggregate(1, ss, updates), [0, 1])
    for a, b in zip(pb, ps):
        for name in SHAPES:
            torch.testing.assert_close(a.download[name + B_SUFFIX] @ a.download[name + A_SUFFIX],
                                       b.download[name + B_SUFFIX] @ b.download[name + A_SUFFIX], rtol=1e-9, atol=1e-11)
        assert not torch.allclose(a.download["m1" + A_SUFFIX], b.download["m1" + A_SUFFIX])


def test_flexlora_homogeneous_is_best_approximation_of_exact_not_fedit_O16():
    m, state = _method("flexlora", [2, 2])
    updates = [_random_update(k, 2, 10, seed=30 + k) for k in range(2)]
    state = m.aggregate(1, state, updates)
    plan = m.configure(2, state, [0])[0]
    exact = _target(updates, "m1")
    U, S, Vh = dense_svd(exact)
    got = ALPHA / 2 * plan.download["m1" + B_SUFFIX] @ plan.download["m1" + A_SUFFIX]
    torch.testing.assert_close(got, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], rtol=1e-9, atol=1e-11)
    B_bar = sum(u.tensors["m1" + B_SUFFIX] for u in updates) / 2
    A_bar = sum(u.tensors["m1" + A_SUFFIX] for u in updates) / 2
    assert not torch.allclose(got, ALPHA / 2 * B_bar @ A_bar, rtol=1e-3)


# ---------------------------------------------------------------- HetLoRA
def test_hetlora_single_client_aggregate_then_distribute_is_identity_O18():
    m, state = _method("hetlora", [3, 5])
    u = _random_update(0, 3, 5, seed=40)
    state = m.aggregate(1, state, [u])
    assert state.adapter.modules["m1"].rank == 5  # r_max
    plan = m.configure(2, state, [0])[0]
    for name in SHAPES:
        torch.testing.assert_close(plan.download[name + B_SUFFIX], u.tensors[name + B_SUFFIX], rtol=1e-12, atol=0)
        torch.testing.assert_close(plan.download[name + A_SUFFIX], u.tensors[name + A_SUFFIX], rtol=1e-12, atol=0)


def test_hetlora_sparsity_weights_and_zero_padding_O19():
    m, state = _method("hetlora", [2, 4])
    small, large = _random_update(0, 2, 1, seed=41), _random_update(1, 4, 1000, seed=42)
    new = m.aggregate(1, state, [small, large])
    for name in SHAPES:
        s0, s1 = ALPHA / 2, ALPHA / 4
        n0 = torch.linalg.norm(s0 * small.tensors[name + B_SUFFIX] @ small.tensors[name + A_SUFFIX])
        n1 = torch.linalg.norm(s1 * large.tensors[name + B_SUFFIX] @ large.tensors[name + A_SUFFIX])
        p0, p1 = float(n0 / (n0 + n1)), float(n1 / (n0 + n1))  # data sizes (1 vs 1000) play no part
        B0 = torch.cat([small.tensors[name + B_SUFFIX] * math.sqrt(s0), torch.zeros(SHAPES[name][0], 2,
                                                                                  dtype=torch.float64)], 1)
        want_B = p0 * B0 + p1 * large.tensors[name + B_SUFFIX] * math.sqrt(s1)
        torch.testing.assert_close(new.adapter.modules[name].B, want_B, rtol=1e-10, atol=1e-12)
    # a zero update gets weight 0: the global equals the other client's (pre-scaled) factors
    zero = Update(0, 5, {k: torch.zeros_like(v) for k, v in small.tensors.items()})
    only = m.aggregate(1, state, [zero, large])
    torch.testing.assert_close(only.adapter.modules["m1"].A, large.tensors["m1" + A_SUFFIX] * math.sqrt(ALPHA / 4),
                               rtol=1e-12, atol=0)


def test_hetlora_prune_report_shrinks_the_clients_rank_next_round():
    m, state = _method("hetlora", [4, 4], "hetlora.gamma=0.5")
    u0 = _random_update(0, 4, 5, seed=43)
    u0.metrics["prune"] = 1.0
    u1 = _random_update(1, 4, 5, seed=44)
    state = m.aggregate(1, state, [u0, u1])
    plans = {p.client_id: p for p in m.configure(2, state, [0, 1])}
    assert plans[0].ranks == {"m1": 2, "m2": 2} and plans[0].download["m1" + A_SUFFIX].shape[0] == 2
    assert plans[1].ranks == {"m1": 4, "m2": 4}
    assert plans[0].config["rank_penalty"] == pytest.approx(1e-3)


# ---------------------------------------------------------------- FLoRA
def test_flora_stacks_exactly_merges_and_restarts_fresh_O20():
    ranks = [1, 2, 3]
    m, state = _method("flora", ranks, "flora.alpha_per_rank=0")  # s_k = alpha / r_k, as _target assumes
    updates = [_random_update(k, r, 10 * (k + 1), seed=50 + k) for k, r in enumerate(ranks)]
    state = m.aggregate(1, state, updates)
    delta = m.base_delta(state)
    for name in SHAPES:
        torch.testing.assert_close(delta[name], _target(updates, name), rtol=1e-10, atol=1e-12)
        assert state.extra[f"stack_B/{name}"].shape[1] == sum(ranks)
    plans = m.configure(2, state, [0, 1, 2])
    # fresh LoRA: nothing of the adapter is downloaded, the stack is merged; a new seed per round
    assert all(p.download == {} for p in plans)
    assert plans[0].config["init_seed"] != m.configure(3, state, [0])[0].config["init_seed"]
    assert len({p.config["init_seed"] for p in plans}) == 3  # each client its own fresh A, as FLoRA's code
    merge = plans[0].merge  # the round's stack, as FLoRA's paper sends it
    torch.testing.assert_close(merge["m1.stack_B"] @ merge["m1.stack_A"], delta["m1"], rtol=1e-10, atol=1e-12)
    # second round accumulates
    more = [_random_update(k, r, 5, seed=60 + k) for k, r in enumerate(ranks)]
    state2 = m.aggregate(2, state, more)
    torch.testing.assert_close(m.base_delta(state2)["m1"], delta["m1"] + _target(more, "m1"), rtol=1e-10,
                               atol=1e-12)
    exported = m.export_adapter(state2)
    torch.testing.assert_close(exported.modules["m1"].delta(), m.base_delta(state2)["m1"], rtol=1e-8, atol=1e-10)


def test_flora_downlink_grows_with_clients_and_out_of_sync_clients_get_the_dense_update_O30():
    from fedlora import wire

    sizes = []
    for K in (2, 4):
        m, state = _method("flora", [2] * (K + 1))
        state = m.aggregate(1, state, [_random_update(k, 2, 5, seed=k) for k in range(K)])
        in_sync = m.configure(2, state, [0])[0]
        sizes.append(len(wire.encode(in_sync.merge)))
        stale = m.configure(2, state, [K])[0]  # did not take part in round 1
        assert set(stale.merge) == {"m1.delta", "m2.delta"}
    per_client = 2 * sum(d_out + d_in for d_out, d_in in SHAPES.values()) * 8
    assert sizes[1] - sizes[0] == pytest.approx(2 * per_client, rel=0.05)


def test_flexlora_streaming_aggregation_equals_the_batch_rule():
    """The engine's incremental path (begin/accumulate/finish, dense or factored per module) gives the same global."""
    from fedlora.methods.base import ClientPlan

    for ranks in ([1, 2], [4, 4, 4]):  # Σr below min(d) (factored) and at/above it (dense accumulator)
        m, state = _method("flexlora", ranks)
        updates = [_random_update(k, r, 7 * (k + 1), seed=70 + k) for k, r in enumerate(ranks)]
        plans = [ClientPlan(k, {}, frozenset(), frozenset(), ranks={n: r for n in SHAPES}) for k, r in enumerate(ranks)]
        acc = m.begin(1, state, plans)
        assert all(acc["dense"][n] == (sum(ranks) >= min(SHAPES[n])) for n in SHAPES)
        for u in updates:
            m.accumulate(acc, u)
        streamed, batch = m.finish(1, state, acc), m.aggregate(1, state, updates)
        for name in SHAPES:
            torch.testing.assert_close(_product(streamed, name), _product(batch, name), rtol=1e-9, atol=1e-11)


def test_flora_default_scale_is_two_at_every_rank_as_flora_code():
    """FLoRA's code sets alpha_k = 2 r_k: the stack is Σ p_k · 2 · B_k A_k whatever the ranks (not Σ p_k α/r_k B_k A_k),
    and the engine's LoRA layers train with alpha = 2r (scale 2)."""
    ranks = [2, 5]
    m, state = _method("flora", ranks)
    updates = [_random_update(k, r, 3 + k, seed=90 + k) for k, r in enumerate(ranks)]
    state = m.aggregate(1, state, updates)
    total = sum(u.num_examples for u in updates)
    for name in SHAPES:
        want = sum(u.num_examples / total * 2.0 * u.tensors[name + B_SUFFIX] @ u.tensors[name + A_SUFFIX]
                   for u in updates)
        torch.testing.assert_close(m.base_delta(state)[name], want, rtol=1e-10, atol=1e-12)
    assert get_method("flora").alpha_per_rank(load_config(None, ["method=flora"])) == 2.0
    assert get_method("flexlora").alpha_per_rank(load_config(None, ["method=flexlora"])) == 0.0


def test_alpha_per_rank_gives_peft_layers_alpha_proportional_to_rank():
    from fedlora.models import AdapterPool, inject_lora
    from tests.conftest import lora_cfg, tiny_bert

    cfg = lora_cfg(rank=4, alpha=16.0, targets=("query", "value"))
    model = inject_lora(tiny_bert(), cfg, ranks=None, alpha_per_rank=2.0)
    pool = AdapterPool(model, cfg, "SEQ_CLS", alpha_per_rank=2.0)
    assert set(pool.slots({n: 4 for n in pool.shapes}).alphas.values()) == {8.0}
    names = sorted(pool.shapes)
    mixed = pool.slots({n: (3 if i % 2 else 6) for i, n in enumerate(names)})
    assert {n: mixed.alphas[n] for n in names} == {n: (6.0 if i % 2 else 12.0) for i, n in enumerate(names)}
    spec = FederationSpec({"m1": (4, 4)}, {0: {"m1": 3}}, 16.0, seed=0, alpha_per_rank=2.0)
    assert spec.initial(0).modules["m1"].alpha == 6.0 and spec.scale_of(3) == 2.0
    plain = AdapterPool(inject_lora(tiny_bert(), cfg), cfg, "SEQ_CLS")
    assert set(plain.slots({n: 2 for n in plain.shapes}).alphas.values()) == {16.0}


# ---------------------------------------------------------------- components that must stay trainable
def _hetlora_rounds(uncovered):
    """Round 1: clients of rank 2, 4, 8; round 2: only ranks 2 and 4.  Returns (method, state after round 1,
    state after round 2)."""
    m, state = _method("hetlora", [2, 4, 8], f"hetlora.uncovered={uncovered}", "hetlora.weighting=data")
    one = m.aggregate(1, state, [_random_update(k, r, 5, seed=100 + k) for k, r in enumerate([2, 4, 8])])
    two = m.aggregate(2, one, [_random_update(k, r, 5, seed=110 + k) for k, r in enumerate([2, 4])])
    return m, one, two


def test_hetlora_keeps_rank_indices_no_client_of_the_round_covers():
    m, one, two = _hetlora_rounds("keep")
    for name in SHAPES:
        torch.testing.assert_close(two.adapter.modules[name].A[4:], one.adapter.modules[name].A[4:], rtol=0, atol=0)
        torch.testing.assert_close(two.adapter.modules[name].B[:, 4:], one.adapter.modules[name].B[:, 4:], rtol=0,
                                   atol=0)
    plan = m.configure(3, two, [2])[0]  # the rank-8 client comes back: every component is alive
    for name in SHAPES:
        assert (plan.download[name + A_SUFFIX].norm(dim=1) > 0).all()
        assert (plan.download[name + B_SUFFIX].norm(dim=0) > 0).all()


def test_hetlora_zero_option_is_plain_zero_padding():
    m, one, two = _hetlora_rounds("zero")
    plan = m.configure(3, two, [2])[0]
    for name in SHAPES:
        assert not plan.download[name + A_SUFFIX][4:].any() and not plan.download[name + B_SUFFIX][:, 4:].any()
        assert (plan.download[name + A_SUFFIX][:4].norm(dim=1) > 0).all()


def test_hetlora_uncovered_before_the_first_aggregation_keeps_the_fresh_init():
    """Round 1 with only the rank-2 client: the rank-8 client later starts indices 2..7 from exactly its fresh init."""
    m, state = _method("hetlora", [2, 8])
    init = state.adapter.clone()
    state = m.aggregate(1, state, [_random_update(0, 2, 5, seed=120)])
    plan = m.configure(2, state, [1])[0]
    for name in SHAPES:
        torch.testing.assert_close(plan.download[name + A_SUFFIX][2:], init.modules[name].A[2:], rtol=1e-12, atol=0)
        assert not plan.download[name + B_SUFFIX][:, 2:].any()


@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_flexlora_client_above_the_stored_rank_trains_every_component_on_a_real_batch(split):
    """Round 1 aggregates a rank-2 client only (stored rank R = 2); the rank-16 client's round-2 download must let it
    train all 16 components: every column of B gets a gradient on a real SST-2 batch of the bundled MiniLM, and
    after one SGD step every row of A does.  (Zero rows of A, the old padding, give 14 dead components.)"""

    from fedlora.data.tasks import ClassificationTask
    from fedlora.models import LoraSlots, inject_lora, load_classifier, target_shapes

    cfg = load_config(None, ["method=flexlora", "lora.rank_distribution=explicit", "lora.client_ranks=[2, 16]",
                             "clients.num=2", f"flexlora.svd_split={split}", "data.max_train_examples=64",
                             "model.head_init=random"])  # a zero head would pass no gradient to any B column
    tokenizer, base = load_classifier(cfg.model, 2, 0)
    shapes = target_shapes(base, cfg.lora)
    model = inject_lora(base, cfg.lora, "SEQ_CLS", ranks={n: 16 for n in shapes})
    slots = LoraSlots.of(model)
    spec = FederationSpec(slots.shapes, {0: {n: 2 for n in shapes}, 1: {n: 16 for n in shapes}}, cfg.lora.alpha,
                          seed=0, head=slots.head())
    m = get_method("flexlora")(cfg, spec)
    state = m.init_state(spec.initial(ranks=spec.global_ranks()))
    g = torch.Generator().manual_seed(7)
    small = {}
    for name, (d_out, d_in) in slots.shapes.items():
        small[name + B_SUFFIX] = torch.randn(d_out, 2, generator=g) * 0.01
        small[name + A_SUFFIX] = torch.randn(2, d_in, generator=g) / d_in ** 0.5
    state = m.aggregate(1, state, [Update(0, 10, small)])
    plan = m.configure(2, state, [1])[0]
    slots.load(spec.initial(1).with_tensors(plan.download))
    params = slots.set_trainable(frozenset({"lora_A", "lora_B"}))
    task = ClassificationTask(cfg.data, seed=0)
    examples = task.tokenise(tokenizer, task.train_rows, task.train_labels, 32)
    batch = examples.batch(list(range(16)))
    model.train()
    task.loss(model, batch).backward()
    for name in slots.shapes:
        assert (slots.params[name + B_SUFFIX].grad.norm(dim=0) > 0).all(), name
    torch.optim.SGD(params, lr=0.5).step()
    for p in params:
        p.grad = None
    task.loss(model, batch).backward()
    for name in slots.shapes:
        assert (slots.params[name + A_SUFFIX].grad.norm(dim=1) > 0).all(), name

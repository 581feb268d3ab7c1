"""Heterogeneous-rank LoRA linear algebra (fedlora.lowrank): factored vs dense SVD, FlexLoRA redistribution,
HetLoRA padding and weights, FLoRA stacking (docs/methods.md §10–12; oracles O11–O15, O18–O20 of docs/oracles.md)."""
import pytest
import torch

from fedlora import lowrank
from fedlora.lowrank import (
    dense_svd,
    factored_svd,
    product_frobenius_norm,
    relative_error,
    sparsity_weights,
    stack_factors,
    svd_of_weighted_sum,
    truncate,
    weighted_product_sum,
    zero_pad,
)

D_OUT, D_IN = 12, 10
RTOL = 1e-10
F64 = torch.float64


def _clients(ranks, seed=0, d_out=D_OUT, d_in=D_IN):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=g, dtype=F64) for r in ranks]
    As = [torch.randn(r, d_in, generator=g, dtype=F64) for r in ranks]
    coeffs = [float(c) for c in torch.rand(len(ranks), generator=g, dtype=F64) + 0.1]
    return Bs, As, coeffs


def _close(X, Y, rtol=RTOL):
    assert X.shape == Y.shape
    assert relative_error(X, Y) < rtol, relative_error(X, Y)


def _product(U, S, Vh):
    return (U * S) @ Vh


def _reference(Bs, As, coeffs):
    return sum(c * (B @ A) for B, A, c in zip(Bs, As, coeffs))


# ------------------------------------------------------------------ sums, stacking (O20) and the factored SVD
@pytest.mark.parametrize("ranks", [(1, 2, 3), (4, 4), (2,), (1, 1, 1, 1), (1, 2, 3, 4)])
def test_weighted_sum_and_stacking_are_exact(ranks):
    Bs, As, coeffs = _clients(ranks)
    ref = _reference(Bs, As, coeffs)
    _close(weighted_product_sum(Bs, As, coeffs), ref)
    B_s, A_s = stack_factors(Bs, As, coeffs)
    assert B_s.shape == (D_OUT, sum(ranks)) and A_s.shape == (sum(ranks), D_IN)
    _close(B_s @ A_s, ref)
    assert int(torch.linalg.matrix_rank(B_s @ A_s)) == sum(ranks)  # O20: stacked rank Σ r_k (generic)
    # FLoRA weights A only; B is the plain concatenation
    assert torch.equal(B_s[:, : ranks[0]], Bs[0])


@pytest.mark.parametrize("ranks", [(1, 2, 3), (4, 4), (2,), (1, 1, 1, 1), (1, 2, 3, 4)])
def test_factored_svd_equals_dense_svd(ranks):
    Bs, As, coeffs = _clients(ranks, seed=1)
    k = sum(ranks)
    Uf, Sf, Vhf = svd_of_weighted_sum(Bs, As, coeffs, path="factored")
    Ud, Sd, Vhd = svd_of_weighted_sum(Bs, As, coeffs, path="dense")
    assert Uf.shape == Ud.shape == (D_OUT, k) and Sf.shape == Sd.shape == (k,) and Vhf.shape == Vhd.shape == (k, D_IN)
    assert torch.all(Sf[:-1] >= Sf[1:])
    _close(Sf, Sd)
    _close(_product(Uf, Sf, Vhf), _reference(Bs, As, coeffs))
    _close(_product(Uf, Sf, Vhf), _product(Ud, Sd, Vhd))
    for r in range(1, k):  # every truncation agrees too (distinct singular values, so sign-free products match)
        _close(_product(Uf[:, :r], Sf[:r], Vhf[:r]), _product(Ud[:, :r], Sd[:r], Vhd[:r]), rtol=1e-9)
    _close(Uf.T @ Uf, torch.eye(k, dtype=F64))
    _close(Vhf @ Vhf.T, torch.eye(k, dtype=F64))


def test_factored_svd_of_rank_deficient_product_has_zero_tail():
    B, A = _clients((2,), seed=2)[:2]
    B3 = torch.cat([B[0], B[0][:, :1]], dim=1)  # 3 columns, rank 2
    A3 = torch.cat([A[0], A[0][:1]], dim=0)
    U, S, Vh = factored_svd(B3, A3)
    _close(_product(U, S, Vh), B3 @ A3)
    _close(S[:2], dense_svd(B3 @ A3)[1][:2])
    assert S[2] < 1e-12 * S[0]


def test_factored_path_at_full_rank_matches_dense():
    Bs, As, coeffs = _clients((4, 3, 3), seed=3)  # Σr = 10 = min(d_out, d_in): still allowed
    Uf, Sf, Vhf = svd_of_weighted_sum(Bs, As, coeffs, path="factored")
    Ud, Sd, Vhd = svd_of_weighted_sum(Bs, As, coeffs, path="dense")
    _close(Sf, Sd)
    _close(_product(Uf, Sf, Vhf), _product(Ud, Sd, Vhd))


def test_dense_path_output_truncated_to_total_rank():
    Bs, As, coeffs = _clients((2, 1), seed=4)
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs, path="dense")
    assert U.shape == (D_OUT, 3) and S.shape == (3,) and Vh.shape == (3, D_IN)
    Bs, As, coeffs = _clients((4, 4, 4), seed=4)  # Σr = 12 > min = 10
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs, path="dense")
    assert U.shape == (D_OUT, 10) and S.shape == (10,) and Vh.shape == (10, D_IN)
    _close(_product(U, S, Vh), _reference(Bs, As, coeffs))


@pytest.mark.parametrize("ranks,expected", [((1, 2), "factored"), ((4, 5), "factored"), ((4, 6), "dense"),
                                            ((4, 4, 4), "dense")])
def test_auto_path_choice(monkeypatch, ranks, expected):
    calls = []
    real_f, real_d = lowrank.factored_svd, lowrank.dense_svd
    monkeypatch.setattr(lowrank, "factored_svd", lambda *a: calls.append("factored") or real_f(*a))
    monkeypatch.setattr(lowrank, "dense_svd", lambda *a: calls.append("dense") or real_d(*a))
    Bs, As, coeffs = _clients(ranks, seed=5)
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs)
    assert calls == [expected]
    assert S.shape == (min(sum(ranks), D_OUT, D_IN),)
    _close(_product(U, S, Vh), _reference(Bs, As, coeffs))


def test_float32_stays_float32():
    Bs, As, coeffs = _clients((2, 3), seed=6)
    Bs, As = [B.float() for B in Bs], [A.float() for A in As]
    for path in ("factored", "dense"):
        U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs, path=path)
        assert U.dtype == S.dtype == Vh.dtype == torch.float32
        assert relative_error(_product(U, S, Vh), weighted_product_sum(Bs, As, coeffs)) < 1e-5
    B, A = truncate(U, S, Vh, 2, 8.0)
    assert B.dtype == A.dtype == torch.float32


# ------------------------------------------------------------------ FlexLoRA (O11–O15)
def test_o11_order_and_duplication_invariance():
    Bs, As, coeffs = _clients((1, 3, 2), seed=7)
    ref = _product(*svd_of_weighted_sum(Bs, As, coeffs, path="factored"))
    perm = [2, 0, 1]
    _close(_product(*svd_of_weighted_sum([Bs[i] for i in perm], [As[i] for i in perm], [coeffs[i] for i in perm])),
           ref)
    half = coeffs[0] / 2  # one client with weight c == the same client twice with weight c/2
    dup = svd_of_weighted_sum([Bs[0]] + Bs, [As[0]] + As, [half, half] + coeffs[1:], path="dense")
    _close(_product(*dup), ref)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_o12_single_client_redistribution_is_exact(r, split):
    (B,), (A,), _ = _clients((r,), seed=8)
    s = 16 / r
    for path in ("factored", "dense"):
        B2, A2 = truncate(*svd_of_weighted_sum([B], [A], [s], path=path), r, s, split=split)
        assert B2.shape == (D_OUT, r) and A2.shape == (r, D_IN)
        _close(s * B2 @ A2, s * B @ A)


@pytest.mark.parametrize("ranks,r", [((1, 3), 4), ((1, 2), 4), ((2, 2, 1), 6)])
def test_o12_clients_with_total_rank_at_most_r_are_reproduced(ranks, r):
    Bs, As, p = _clients(ranks, seed=9)
    coeffs = [pk * 16 / rk for pk, rk in zip(p, ranks)]
    dW = _reference(Bs, As, coeffs)
    B2, A2 = truncate(*svd_of_weighted_sum(Bs, As, coeffs), r, 16 / r)
    assert B2.shape == (D_OUT, r) and A2.shape == (r, D_IN)
    _close(16 / r * B2 @ A2, dW)


def test_o13_truncation_is_the_best_rank_r_approximation():
    Bs, As, coeffs = _clients((2, 3, 3), seed=10)
    dW = _reference(Bs, As, coeffs)
    sigma = torch.linalg.svdvals(dW)
    g = torch.Generator().manual_seed(11)
    for r in (1, 3, 5):
        s = 16 / r
        B2, A2 = truncate(*svd_of_weighted_sum(Bs, As, coeffs, path="factored"), r, s)
        E = dW - s * B2 @ A2
        err2 = float((E ** 2).sum())
        assert err2 == pytest.approx(float((sigma[r:] ** 2).sum()), rel=RTOL)
        assert float(torch.linalg.matrix_norm(E, ord=2)) == pytest.approx(float(sigma[r]), rel=RTOL)
        for i in range(100):  # random candidates, half of them small perturbations of the optimum
            eps = 1e-3 if i % 2 else 1.0
            Bc = (B2 if i % 2 else 0) + eps * torch.randn(D_OUT, r, generator=g, dtype=F64)
            Ac = (A2 if i % 2 else 0) + eps * torch.randn(r, D_IN, generator=g, dtype=F64)
            assert float(((dW - s * Bc @ Ac) ** 2).sum()) > err2


def test_o14_factor_structure_of_the_code_split():
    Bs, As, coeffs = _clients((3, 4), seed=12)
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs)
    r, s = 4, 16 / 4
    B2, A2 = truncate(U, S, Vh, r, s, split="B")
    _close(A2 @ A2.T, torch.eye(r, dtype=F64))
    gram = B2.T @ B2
    assert float((gram - torch.diag(torch.diagonal(gram))).abs().max()) < 1e-12 * float(gram.abs().max())
    _close(torch.linalg.norm(B2, dim=0), S[:r] / s)
    Bq, Aq = truncate(U, S, Vh, r, s, split="sqrt")
    _close(s * Bq @ Aq, s * B2 @ A2)
    _close(s * Bq @ Aq, _product(U[:, :r], S[:r], Vh[:r]))
    _close(torch.linalg.norm(Bq, dim=0), torch.linalg.norm(Aq, dim=1))  # √S on both sides


def test_o15_nesting():
    Bs, As, coeffs = _clients((2, 4, 1), seed=13)
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs)
    r1, r2 = 2, 5
    B1, A1 = truncate(U, S, Vh, r1, 16 / r1)
    B2, A2 = truncate(U, S, Vh, r2, 16 / r2)
    _close(16 / r2 * B2[:, :r1] @ A2[:r1], 16 / r1 * B1 @ A1)
    _close(16 / r1 * B1 @ A1, _product(U[:, :r1], S[:r1], Vh[:r1]))


# ------------------------------------------------------------------ HetLoRA (O18, O19)
def test_o18_zero_padding_keeps_the_product_and_the_leading_factors():
    (B,), (A,), _ = _clients((3,), seed=14)
    Bp, Ap = zero_pad(B, A, 7)
    assert Bp.shape == (D_OUT, 7) and Ap.shape == (7, D_IN)
    _close(Bp @ Ap, B @ A, rtol=1e-14)
    assert torch.equal(Bp[:, :3], B) and torch.equal(Ap[:3], A)
    assert not Bp[:, 3:].any() and not Ap[3:].any()
    Bs, As = zero_pad(B, A, 3)
    assert torch.equal(Bs, B) and torch.equal(As, A)
    # one client: aggregate the padded factors (weight 1), give back its first r rows/columns: the identity
    assert torch.equal((1.0 * Bp)[:, :3], B) and torch.equal((1.0 * Ap)[:3], A)


@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_truncating_beyond_the_available_rank_completes_A_orthonormally(split):
    """A client rank above the stored rank R: B's extra columns are zero, A's extra rows are unit-norm, orthogonal to
    each other and to the kept rows (as the official code's full SVD gives), and the product is the truncated SVD.
    Zero rows of A (the old padding) would leave those components without a gradient in both factors."""
    Bs, As, coeffs = _clients((1, 2), seed=15)
    U, S, Vh = svd_of_weighted_sum(Bs, As, coeffs)  # R = 3
    B3, A3 = truncate(U, S, Vh, 3, 2.0, split=split)
    B6, A6 = truncate(U, S, Vh, 6, 2.0, split=split, seed=5)
    assert B6.shape == (D_OUT, 6) and A6.shape == (6, D_IN)
    assert torch.equal(B6[:, :3], B3) and torch.equal(A6[:3], A3)
    assert not B6[:, 3:].any()
    extra = A6[3:]
    torch.testing.assert_close(extra.norm(dim=1), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(extra @ extra.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-12)
    assert (extra @ Vh[:3].T).abs().max() < 1e-12
    _close(2.0 * B6 @ A6, _reference(Bs, As, coeffs))
    # seeded: the same seed gives the same completion, another seed another one
    assert torch.equal(truncate(U, S, Vh, 6, 2.0, split=split, seed=5)[1], A6)
    assert not torch.equal(truncate(U, S, Vh, 6, 2.0, split=split, seed=6)[1], A6)


def test_orthonormal_completion_fills_the_whole_space():
    from fedlora.lowrank import orthonormal_completion

    Vh = torch.linalg.qr(torch.randn(D_IN, 4, dtype=F64, generator=torch.Generator().manual_seed(3)))[0].T
    full = torch.cat([Vh, orthonormal_completion(Vh, D_IN - 4, seed=1)])
    torch.testing.assert_close(full @ full.T, torch.eye(D_IN, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        orthonormal_completion(Vh, D_IN - 3)
    assert orthonormal_completion(Vh.float(), 2).dtype == torch.float32


def test_product_frobenius_norm_matches_dense():
    for ranks, seed in (((1,), 16), ((4,), 17), ((3,), 18)):
        (B,), (A,), _ = _clients(ranks, seed=seed)
        assert product_frobenius_norm(B, A) == pytest.approx(float(torch.linalg.norm(B @ A)), rel=RTOL)
    assert product_frobenius_norm(torch.zeros(D_OUT, 2, dtype=F64), torch.randn(2, D_IN, dtype=F64)) == 0.0


def test_o19_sparsity_weights():
    Bs, As, _ = _clients((1, 3, 2, 4), seed=19)
    Bs[2] = torch.zeros_like(Bs[2])  # a client with a zero update
    w = sparsity_weights(Bs, As)
    assert sum(w) == pytest.approx(1.0, rel=1e-14)
    assert w[2] == 0.0
    dense = [float(torch.linalg.norm(B @ A)) for B, A in zip(Bs, As)]
    assert w == pytest.approx([n / sum(dense) for n in dense], rel=RTOL)
    zeros = [torch.zeros_like(B) for B in Bs[:3]]
    assert sparsity_weights(zeros, As[:3]) == [pytest.approx(1 / 3)] * 3


def test_relative_error():
    Y = torch.ones(2, 2, dtype=F64)
    assert relative_error(Y, Y) == 0.0
    assert relative_error(2 * Y, Y) == pytest.approx(1.0)
    assert relative_error(Y, torch.zeros_like(Y)) > 1e300  # floored denominator, no division by zero


# ------------------------------------------------------------------ errors
def test_value_errors():
    Bs, As, coeffs = _clients((4, 4, 4), seed=20)
    B_s, A_s = stack_factors(Bs, As, coeffs)
    with pytest.raises(ValueError, match="exceeds"):
        factored_svd(B_s, A_s)
    with pytest.raises(ValueError, match="exceeds"):
        svd_of_weighted_sum(Bs, As, coeffs, path="factored")
    with pytest.raises(ValueError, match="inner dimensions"):
        factored_svd(Bs[0], As[0][:3])
    with pytest.raises(ValueError, match="unknown path"):
        svd_of_weighted_sum(Bs, As, coeffs, path="randomized")
    U, S, Vh = svd_of_weighted_sum(Bs[:1], As[:1], coeffs[:1])
    with pytest.raises(ValueError, match="rank"):
        truncate(U, S, Vh, 0, 1.0)
    with pytest.raises(ValueError, match="unknown split"):
        truncate(U, S, Vh, 2, 1.0, split="A")
    with pytest.raises(ValueError, match="cannot pad"):
        zero_pad(Bs[0], As[0], 3)
    with pytest.raises(ValueError, match="same length"):
        stack_factors(Bs, As, coeffs[:2])

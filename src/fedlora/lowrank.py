"""Linear algebra for aggregating LoRA factors of heterogeneous rank (pure torch, no modules).

A client's update is the product ``B_k A_k`` (``B_k: d_out × r_k``, ``A_k: r_k × d_in``).  The servers of FlexLoRA
(docs/methods.md §10), HetLoRA (§11) and FLoRA (§12) all work with weighted sums ``Σ c_k B_k A_k``.  The helpers
here compute such sums, their SVD and the best rank-r factors of the sum, and they avoid the dense
``d_out × d_in`` matrix where the total rank is small.  :func:`factored_svd` takes QR decompositions of the two
thin factors and an SVD of an ``R × R`` core, so it costs ``O((d_out + d_in)·R²)`` instead of
``O(d_out·d_in·min(d_out, d_in))``.  Below, § numbers are sections of docs/methods.md and O numbers oracles of
docs/oracles.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PATHS = ("auto", "factored", "dense")
SPLITS = ("B", "sqrt")


def weighted_product_sum(Bs: list[Tensor], As: list[Tensor], coeffs: list[float]) -> Tensor:
    """Dense ``Σ_k c_k B_k A_k`` in the inputs' dtype; the ranks ``r_k`` may differ."""
    out = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=Bs[0].dtype, device=Bs[0].device)
    for B, A, c in zip(Bs, As, coeffs, strict=True):
        out.addmm_(B, A, alpha=c)
    return out


def stack_factors(Bs: list[Tensor], As: list[Tensor], coeffs: list[float]) -> tuple[Tensor, Tensor]:
    """FLoRA stacking (§12, O20): ``[B_1|…|B_K] @ [c_1A_1;…;c_KA_K] = Σ c_k B_k A_k``, of rank ``Σ r_k``."""
    if not (len(Bs) == len(As) == len(coeffs)):
        raise ValueError("Bs, As and coeffs must have the same length")
    return torch.cat(Bs, dim=1), torch.cat([c * A for A, c in zip(As, coeffs)], dim=0)


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` without forming it: ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, ``R_B R_Aᵀ = U_c S V_cᵀ``, so
    ``B A = (Q_B U_c) S (Q_A V_c)ᵀ``.  Returns ``U (d_out × R)``, ``S (R,)`` descending and ``Vh (R × d_in)``."""
    R = B.shape[1]
    if A.shape[0] != R:
        raise ValueError(f"inner dimensions differ: B is {tuple(B.shape)}, A is {tuple(A.shape)}")
    if R > min(B.shape[0], A.shape[1]):
        raise ValueError(f"rank {R} exceeds min(d_out, d_in) = {min(B.shape[0], A.shape[1])}; use the dense path")
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.T)
    return Q_B @ U_c, S, (Q_A @ Vh_c.T).T


def dense_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a dense matrix."""
    return torch.linalg.svd(M, full_matrices=False)


def svd_of_weighted_sum(Bs: list[Tensor], As: list[Tensor], coeffs: list[float],
                        path: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``Σ c_k B_k A_k`` with ``min(Σ r_k, d_out, d_in)`` components.  ``auto`` takes the factored path when
    ``Σ r_k < min(d_out, d_in)`` and the dense one otherwise."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; one of {', '.join(PATHS)}")
    total = sum(B.shape[1] for B in Bs)
    d_out, d_in = Bs[0].shape[0], As[0].shape[1]
    if path == "factored" or (path == "auto" and total < min(d_out, d_in)):
        return factored_svd(*stack_factors(Bs, As, coeffs))
    k = min(total, d_out, d_in)
    U, S, Vh = dense_svd(weighted_product_sum(Bs, As, coeffs))
    return U[:, :k], S[:k], Vh[:k]


def truncate(U: Tensor, S: Tensor, Vh: Tensor, rank: int, scale: float, split: str = "B",
             seed: int = 0) -> tuple[Tensor, Tensor]:
    """FlexLoRA redistribution (§10): ``(B, A)`` with ``scale·B@A = U_r diag(S_r) Vh_r``.
    ``split="B"``: ``B = U_r S_r / s``, ``A = Vh_r`` (the official code); ``"sqrt"``: ``√S_r`` on each side, each
    divided by ``√s``.

    A rank beyond ``len(S)`` (the client holds more components than the stored update has) gets zero columns of B
    and *orthonormal* rows of A that complete ``Vh_r`` (:func:`orthonormal_completion`, seeded by ``seed``), under
    both splits: the product is unchanged and every component can train (B's column receives a gradient through
    A's non-zero row; A's row once B's column has moved).  This is what the official code's full SVD does (its
    ``min(d_out, d_in)`` components carry null-space singular vectors with singular value ≈ 0); zero rows of A would
    leave those components without a gradient in either factor, forever."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if rank > Vh.shape[1]:
        raise ValueError(f"rank {rank} exceeds d_in = {Vh.shape[1]}")
    k = min(rank, S.shape[0])
    U_r, S_r, Vh_r = U[:, :k], S[:k], Vh[:k]
    if split == "B":
        B, A = U_r * (S_r / scale), Vh_r.clone()
    else:
        root = S_r.sqrt() / math.sqrt(scale)
        B, A = U_r * root, root[:, None] * Vh_r
    if rank == k:
        return B, A
    return (torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1),
            torch.cat([A, orthonormal_completion(Vh_r, rank - k, seed)], dim=0))


def orthonormal_completion(Vh: Tensor, extra: int, seed: int = 0) -> Tensor:
    """``extra`` unit-norm rows, orthogonal to each other and to the rows of ``Vh`` (assumed orthonormal): seeded
    Gaussian rows, projected off ``Vh`` twice (re-orthogonalisation) and orthonormalised by QR, in float64."""
    d_in = Vh.shape[1]
    if Vh.shape[0] + extra > d_in:
        raise ValueError(f"cannot complete {Vh.shape[0]} rows with {extra} more in dimension {d_in}")
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    X = torch.randn(extra, d_in, generator=g, dtype=torch.float64)
    V = Vh.detach().to(torch.float64)
    for _ in range(2):
        X = X - (X @ V.T) @ V
        Q, R = torch.linalg.qr(X.T)
        X = Q.T * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(())).unsqueeze(1)
    return X.to(Vh.dtype).contiguous()


def zero_pad(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """HetLoRA padding (§11, O18): zero columns of B and zero rows of A up to ``rank``; the product is unchanged."""
    r = B.shape[1]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    return (torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1),
            torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0))


def product_frobenius_norm(B: Tensor, A: Tensor) -> float:
    """``‖B A‖_F = √trace((BᵀB)(AAᵀ))`` from two symmetric ``r × r`` Gram matrices (an elementwise sum)."""
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def sparsity_weights(Bs: list[Tensor], As: list[Tensor]) -> list[float]:
    """HetLoRA weights (§11, O19): ``p_k ∝ ‖B_k A_k‖_F``, summing to 1; equal if every update is zero."""
    norms = [product_frobenius_norm(B, A) for B, A in zip(Bs, As, strict=True)]
    total = sum(norms)
    if total == 0.0:
        return [1.0 / len(norms)] * len(norms)
    return [n / total for n in norms]


def relative_error(X: Tensor, Y: Tensor) -> float:
    """``‖X − Y‖_F / ‖Y‖_F`` (the denominator floored at the dtype's smallest normal number)."""
    return float(torch.linalg.norm(X - Y)) / max(float(torch.linalg.norm(Y)), torch.finfo(Y.dtype).tiny)

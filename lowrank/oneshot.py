"""One-shot estimates: ``lowrank.svdvals`` and ``lowrank.svd``, built on the tracker's sketch pass.

A cold start has no warm bases, so the pass runs several times on the same matrix: each pass
advances two interleaved subspace-iteration chains (U <- orth(A V), V <- orth(A^T U)) by one
step. The last pass computes Z = A^T U = (U^T A)^T, so the singular values of Z are exactly those
of the randomised-SVD projection U^T A (a Rayleigh-Ritz estimate, each <= the true value).
With ``niter`` extra passes the chain has depth niter + 1; niter = 4 gives the depth of
``torch.svd_lowrank(niter=2)`` (five passes over A).
"""

from __future__ import annotations

import torch

from . import backends
from ._checks import check_matrix, check_rank, sketch_dtype
from .postprocess import postprocess_torch
from .sketch import init_bases

DEFAULT_NITER = 4
DEFAULT_OVERSAMPLE = 8


def _run_passes(A: torch.Tensor, k: int, niter: int, seed, oversample: int, backend: str):
    check_matrix(A)
    m, n = A.shape[-2], A.shape[-1]
    check_rank(k, m, n)
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be an int >= 0, got {niter!r}")
    backend = backends.resolve_backend(backend, A.device)
    batch_shape = A.shape[:-2]
    W = A.reshape(-1, m, n)
    b = W.shape[0]
    p = min(k + oversample, m, n)
    seed = 0 if seed is None else int(seed)
    cdt = sketch_dtype(A.dtype)
    U, V = init_bases(m, n, p, seed=seed, batch=b, device=A.device, dtype=cdt)
    for it in range(niter + 1):
        sk = backends.sketch(W, U, V, backend=backend)
        if it == niter:
            return sk, U, batch_shape, (m, n)
        post = postprocess_torch(sk.Y, sk.Z, U, V, seed=seed, step=it)
        U, V = post.U, post.V


def svdvals(A: torch.Tensor, k: int, *, niter: int = DEFAULT_NITER, seed: int | None = None,
            oversample: int = DEFAULT_OVERSAMPLE, backend: str = "auto") -> torch.Tensor:
    """Top-k singular values of A (..., m, n), descending, shape (..., k), float64.

    Randomised subspace iteration with ``k + oversample`` columns and ``niter + 1`` passes over A.
    Every value is a lower bound of the true one (up to rounding); exact (to ~1e-10 in float64)
    when rank(A) <= k. ``seed`` (default 0) fixes the random start.
    """
    sk, _, batch_shape, _ = _run_passes(A, k, niter, seed, oversample, backend)
    s = torch.linalg.svdvals(sk.Z.to(torch.float64))[..., :k]
    return s.reshape(*batch_shape, k)


def svd(A: torch.Tensor, k: int, *, niter: int = DEFAULT_NITER, seed: int | None = None,
        oversample: int = DEFAULT_OVERSAMPLE, backend: str = "auto"):
    """Rank-k truncated SVD of A (..., m, n), like ``torch.svd_lowrank``: returns (U, S, V).

    U (..., m, k), S (..., k) descending, V (..., n, k), with A ~= U diag(S) V^T; orthonormal
    columns. Float64 for float64 input, float32 otherwise.
    """
    sk, Ub, batch_shape, (m, n) = _run_passes(A, k, niter, seed, oversample, backend)
    # Z = A^T Ub (n x p) = B^T with B = Ub^T A. SVD of Z: Z = P S Q^T  =>  B = Q S P^T, so
    # A ~= Ub B = (Ub Q) S P^T.
    P, S, Qh = torch.linalg.svd(sk.Z.to(torch.float64), full_matrices=False)
    Q = Qh.transpose(-2, -1)
    U = (Ub.to(torch.float64) @ Q)[..., :k]
    V = P[..., :k]
    dt = sketch_dtype(A.dtype)
    return (U.to(dt).reshape(*batch_shape, m, k), S[..., :k].to(dt).reshape(*batch_shape, k),
            V.to(dt).reshape(*batch_shape, n, k))

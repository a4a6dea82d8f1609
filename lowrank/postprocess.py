"""Op ``postprocess``: the small float64 linear algebra that turns sketches into spectra and bases.

From the sketches Y = W V (b, m, k) and Z = W^T U (b, n, k) of one step:

    Gy = Y^T Y,  Gz = Z^T Z                  (k x k Gram matrices, float64)
    Gy = Qy diag(ly) Qy^T                    (symmetric eigendecomposition, descending)
    sigma_y = sqrt(ly),  sigma_z = sqrt(lz)  lower bounds of the true top-k singular values:
                                             sigma_i(W V) <= sigma_i(W) for orthonormal V
    sigma = max(sigma_y, sigma_z)            still a lower bound, the better of the two
    U_next = Y Qy diag(ly)^-1/2              Ritz vectors: orthonormal, column i estimates u_i
    V_next = Z Qz diag(lz)^-1/2

Rank deficiency (a zero matrix, rank < k, dead neurons, duplicated columns) makes some ly tiny:
those columns are refilled with seeded Gaussian vectors, projected off the good columns, and the
whole basis is re-orthonormalised by two rounds of Cholesky-QR (well conditioned by then, so
``cholesky_ex`` cannot fail). No data-dependent branch: the refill is computed for every column
and selected with ``torch.where``, so no NaN, no exception, no host synchronisation for the
branch. (``torch.linalg.eigh`` itself synchronises on CUDA; the CuPy kernel, and the Triton
backend's ``gram_eigh`` kernel, avoid that.)

The drift between consecutive bases is recorded as the k x k overlaps U_old^T U_next and
V_old^T V_next, whose singular values are the cosines of the principal angles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks

# Eigenvalues of a float64 Gram matrix below this fraction of the largest are rounding noise
# (sigma_i / sigma_1 < ~1e-7: the level of float32 sketch products); their directions are refilled.
GRAM_RELATIVE_FLOOR = 1e-14
# Below this absolute value the Gram matrix is treated as zero (a zero weight matrix). float64
# keeps 1e-30-scaled weights (Gram ~1e-60) well above it.
GRAM_ABSOLUTE_FLOOR = 1e-280
# lambda_k / lambda_1 above which the Ritz vectors S Q diag(lambda)^-1/2 are orthonormal to the
# rounding of the basis dtype without a Cholesky-QR round: their error is ~eps64 * lambda_1 /
# lambda_k, i.e. <= 1e-10 for float32 / bfloat16 / float16 bases past 1e-6 (sigma_k / sigma_1 >
# 1e-3). float64 bases always take the round (threshold above 1).
_WELL_CONDITIONED = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6,
                     torch.float64: 2.0}


class PostOut(NamedTuple):
    sigma: torch.Tensor  # (b, k) float64, descending: max(sigma_y, sigma_z)
    sigma_y: torch.Tensor  # (b, k) float64, singular values of Y = W V
    sigma_z: torch.Tensor  # (b, k) float64, singular values of Z = W^T U
    U: torch.Tensor  # (b, m, k) next left basis (dtype of the old one)
    V: torch.Tensor  # (b, n, k) next right basis
    overlap_u: torch.Tensor  # (b, k, k) float64, U_old^T U_next
    overlap_v: torch.Tensor  # (b, k, k) float64, V_old^T V_next


def gram_eigh_torch(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Op ``gram_eigh``: eigenvalues in descending order and eigenvectors of symmetric (b, k, k)
    matrices (the lower triangle is read), in float64. ``torch.linalg.eigh`` reads cuSOLVER's
    error flags on the host on CUDA; the Triton kernel
    (:func:`lowrank.kernels.triton.postprocess.gram_eigh_triton`) does not."""
    evals, evecs = torch.linalg.eigh(G.to(torch.float64))
    return evals.flip(-1), evecs.flip(-1)


def _cholesky_qr(X: torch.Tensor) -> torch.Tensor:
    """One Cholesky-QR round on a well-conditioned float64 batch (b, p, k)."""
    G = X.transpose(-2, -1) @ X
    L, _ = torch.linalg.cholesky_ex(G)
    # X = Q L^T  =>  Q = X L^-T, computed as a triangular solve on the right.
    return torch.linalg.solve_triangular(L.transpose(-2, -1), X, upper=True, left=False)


def ritz_basis(S: torch.Tensor, refill, *, basis_dtype: torch.dtype = torch.float64,
               eigh=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal Ritz basis of the sketch S (b, p, k) in float64, and its singular values.

    ``refill`` (b, p, k), or a function returning it, supplies candidate vectors for directions S
    does not span. On the CPU it is only drawn when some direction needs it (a branch is free
    there); on a GPU it is always drawn, so that no host synchronisation decides.
    ``basis_dtype`` is the dtype the caller stores the basis in: on the CPU, a float32 basis of
    a well-conditioned S skips the Cholesky-QR round that only float64 storage could see.
    ``eigh``: the ``gram_eigh`` implementation (default :func:`gram_eigh_torch`); another one
    (the Triton kernel) takes the device path, with no host read, wherever S is.
    Returns (Q (b, p, k), sigma (b, k) descending).
    """
    S = S.to(torch.float64)
    gram = S.transpose(-2, -1) @ S
    evals, evecs = (eigh or gram_eigh_torch)(gram)
    evals = evals.clamp_min(0.0)
    top, low = evals[..., :1], evals[..., -1:]
    if eigh is None and _checks.host_reads_are_free(S):
        # One host read decides the path (free on the CPU): every direction well above the
        # floors, and whether the Ritz vectors are orthonormal to the basis dtype's rounding.
        full, well = torch.stack([((low > GRAM_RELATIVE_FLOOR * top) & (low > GRAM_ABSOLUTE_FLOOR)).all(),
                                  (low > _WELL_CONDITIONED[basis_dtype] * top).all()]).tolist()
        if full:
            # Q^T Q = I up to ~eps64 * lambda_1 / lambda_k (eigh's residual): below 1e-10 when
            # well conditioned, under float32 rounding; else one Cholesky-QR round restores it.
            Q = S @ (evecs * evals.rsqrt().unsqueeze(-2))
            return (Q if well else _cholesky_qr(Q)), evals.sqrt()
    good = (evals > GRAM_RELATIVE_FLOOR * top) & (evals > GRAM_ABSOLUTE_FLOOR)  # (b, k)
    scale = torch.where(good, evals, torch.ones_like(evals)).rsqrt()
    # Zeroing the columns of rank-deficient directions inside the k x k factor is free.
    Q = S @ torch.where(good.unsqueeze(-2), evecs * scale.unsqueeze(-2), torch.zeros_like(evecs))
    # Refill: project the candidates off the good columns (twice, for float64 orthogonality).
    R = (refill() if callable(refill) else refill).to(torch.float64)
    for _ in range(2):
        R = R - Q @ (Q.transpose(-2, -1) @ R)
    Q = torch.where(good.unsqueeze(-2), Q, R)
    # Good columns come first (descending order), so the triangular factor leaves them in
    # place up to rounding while it orthonormalises the refilled ones; projected random
    # vectors can be ill-conditioned among themselves (p close to k), hence two rounds.
    Q = _cholesky_qr(_cholesky_qr(Q))
    sigma = torch.where(good, evals.sqrt(), torch.zeros_like(evals))
    return Q, sigma


def refill_candidates(shape, seed: int, step: int, device) -> torch.Tensor:
    """Gaussian candidates for null directions; deterministic in (seed, step), drawn on ``device``."""
    g = torch.Generator(device=device).manual_seed((int(seed) * 7919 + int(step)) % (2**63 - 1))
    return torch.randn(shape, generator=g, device=device, dtype=torch.float64)


def _align_signs(B_old: torch.Tensor, B_new: torch.Tensor):
    """Flip columns of B_new so that diag(B_old^T B_new) >= 0; returns (B_new, B_old^T B_new).

    Eigenvectors have no sign of their own; tying each to its predecessor keeps the tracked
    singular vectors continuous over steps and makes every backend agree column by column.
    """
    overlap = B_old.to(torch.float64).transpose(-2, -1) @ B_new
    sign = torch.where(torch.diagonal(overlap, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(B_new.dtype)
    return B_new * sign.unsqueeze(-2), overlap * sign.unsqueeze(-2)


def _fast_side(S: torch.Tensor, B_old: torch.Tensor):
    """CPU fast path of one side: the Ritz basis of S (b, p, k), sign-aligned to B_old.

    The projection of the old basis B_old^T S is taken before the basis is formed, the sign flips
    are folded into the k x k factor, and the basis is formed once: four p-sized float64
    operations where the general path takes about ten (the small ops dominate a CPU step).
    (One product [S B_old]^T S on a concatenation measured slower: its strided float64 view made
    the final S @ M 4x slower for a batch of four 2304 x 16 sketches.) Returns (Q in B_old's
    dtype, sigma, overlap), or None when some direction needs a refill or the Ritz vectors would
    need a Cholesky-QR round (the general path handles those). The fourth entry is the float64
    k x k factor T with Q = S T (the sequential schedule maps W^T S to W^T Q with it).
    """
    well_above = _WELL_CONDITIONED[B_old.dtype]
    if well_above > 1:  # float64 bases always take the Cholesky-QR round of the general path
        return None
    S64, B64 = S.to(torch.float64), B_old.to(torch.float64)
    # eigh of -G: its ascending order is G's descending one, without two flips.
    neg, evecs = torch.linalg.eigh(S64.transpose(-2, -1) @ S64 * -1.0)
    evals = -neg
    # One host read of each matrix's largest and smallest eigenvalue decides the path.
    for top, low in torch.stack([evals[..., 0], evals[..., -1]], -1).tolist():
        if not (low > GRAM_RELATIVE_FLOOR * top and low > GRAM_ABSOLUTE_FLOOR
                and low > well_above * top):
            return None
    M = evecs * evals.rsqrt().unsqueeze(-2)
    overlap = (B64.transpose(-2, -1) @ S64) @ M  # B_old^T (S M) = B_old^T Q
    sign = torch.where(torch.diagonal(overlap, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    T = M * sign
    return (S64 @ T).to(B_old.dtype), evals.sqrt(), overlap * sign, T


def _side(S: torch.Tensor, B_old: torch.Tensor, refill, eigh=None):
    """(next basis in B_old's dtype, sigma, overlap B_old^T B_next) of one side."""
    Q, sigma = ritz_basis(S, refill, basis_dtype=B_old.dtype, eigh=eigh)
    Q, overlap = _align_signs(B_old, Q)
    return Q.to(B_old.dtype), sigma, overlap


def postprocess_side_torch(S: torch.Tensor, B_old: torch.Tensor, refill, *,
                           with_factor: bool = False):
    """Post-processing of a one-sided sketch S = W V (b, m, k) or W^T U (b, n, k): the next basis
    of that side (in B_old's dtype), its sigma (b, k) and the overlap B_old^T B_next (b, k, k).
    ``refill``: candidates (b, p, k) or a function returning them (see :func:`ritz_basis`).
    ``with_factor``: also return the float64 (b, k, k) factor T with B_next = S T where the CPU
    fast path ran, else None (refilled or re-orthonormalised bases have no such factor)."""
    if _checks.host_reads_are_free(S):
        fast = _fast_side(S, B_old)
        if fast is not None:
            return fast if with_factor else fast[:3]
    out = _side(S, B_old, refill)
    return (*out, None) if with_factor else out


def postprocess_torch(Y: torch.Tensor, Z: torch.Tensor, U_old: torch.Tensor, V_old: torch.Tensor,
                      *, seed: int = 0, step: int = 0, refill=None, eigh=None) -> PostOut:
    """Reference post-processing of one step's sketches (see the module docstring).

    Y (b, m, k), Z (b, n, k), U_old (b, m, k), V_old (b, n, k). ``seed`` and ``step`` make
    the refill of rank-deficient directions reproducible; ``refill`` = (Ry, Rz), tensors
    (b, m, k), (b, n, k) or functions returning them, gives the candidates instead (a batch of
    matrices with seeds of their own). ``eigh``: another ``gram_eigh`` than
    :func:`gram_eigh_torch` (see :func:`ritz_basis`); it skips the CPU fast paths, which read
    the eigenvalues on the host.
    """
    b, m, k = Y.shape
    n = Z.shape[-2]
    if refill is None:
        refill = (lambda: refill_candidates((b, m, k), seed, 2 * step, Y.device),
                  lambda: refill_candidates((b, n, k), seed, 2 * step + 1, Z.device))
    same_batch = U_old.shape[0] == b and V_old.shape[0] == b  # not broadcast (1, m, k) bases
    if eigh is not None:
        Uq, sigma_y, overlap_u = _side(Y, U_old, refill[0], eigh)
        Vq, sigma_z, overlap_v = _side(Z, V_old, refill[1], eigh)
    elif m == n and U_old.dtype == V_old.dtype and same_batch and _checks.host_reads_are_free(Y):
        # Square on the CPU: both sides in one batch of the fast path.
        both = _fast_side(torch.cat([Y, Z]), torch.cat([U_old, V_old]))
        if both is not None:
            (Uq, Vq), (sigma_y, sigma_z), (overlap_u, overlap_v) = ((x[:b], x[b:]) for x in both[:3])
        else:
            Uq, sigma_y, overlap_u = _side(Y, U_old, refill[0])
            Vq, sigma_z, overlap_v = _side(Z, V_old, refill[1])
    else:
        Uq, sigma_y, overlap_u = postprocess_side_torch(Y, U_old, refill[0])
        Vq, sigma_z, overlap_v = postprocess_side_torch(Z, V_old, refill[1])
    sigma = torch.maximum(sigma_y, sigma_z)
    return PostOut(sigma, sigma_y, sigma_z, Uq, Vq, overlap_u, overlap_v)

"""Op ``postprocess`` (torch reference): sketches -> singular values, next bases, overlaps.

Every case, including the rank-deficient ones Cholesky-QR is known to break on (zero, exact low
rank, duplicated columns, dead rows, identity with repeated singular values), must give finite
values, orthonormal bases, descending sigma equal to the singular values of the sketches, and
Ritz bases that span the sketches.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.postprocess import GRAM_RELATIVE_FLOOR, postprocess_torch
from lowrank.sketch import init_bases, sketch_torch

F64 = torch.float64

# --- tolerance table ---------------------------------------------------------------------------
# Orthonormality of the next bases: two rounds of Cholesky-QR in float64 reach ~1e-15; the bases
# are then rounded to their dtype (float32: ~6e-8 per entry, a few of those in U^T U).
ORTHO_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# Singular values from the k x k Gram matrix: eigenvalue error <= ~k eps sigma_1^2, so a value
# sigma_i is off by ~eps (sigma_1 / sigma_i)^2 relative (tight for well-conditioned sketches),
# and values below sqrt(GRAM_RELATIVE_FLOOR) sigma_1 = 1e-7 sigma_1 are reported as exactly 0 by
# design (rank-deficient directions are refilled). Hence the absolute part: twice that floor.
SIGMA_RTOL = 1e-12
SIGMA_ATOL_REL_TO_S1 = 2.0 * math.sqrt(GRAM_RELATIVE_FLOOR)
# Span: the Ritz basis reproduces the sketch, ||(I - U U^T) Y||_F / ||Y||_F, same precision story
# as orthonormality (basis rounded to its dtype).
SPAN_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# Overlap U_old^T U_new is computed from the float64 basis before the rounding to the basis dtype.
OVERLAP_ATOL = {torch.float64: 1e-15, torch.float32: 1e-6}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _weight(kind: str, m: int, n: int) -> torch.Tensor:
    """Float64 test matrices, including the rank-deficient ones."""
    if kind == "random":
        return _randn(m, n, seed=1)
    if kind == "lowrank2":
        return _randn(m, 2, seed=2) @ _randn(2, n, seed=3)
    if kind == "zero":
        return torch.zeros(m, n, dtype=F64)
    if kind == "identity":
        return torch.eye(m, n, dtype=F64)
    if kind == "dupcols":
        half = _randn(m, (n + 1) // 2, seed=4)
        return torch.cat([half, half], dim=1)[:, :n]
    if kind == "deadrows":
        W = _randn(m, n, seed=5)
        W[: (2 * m) // 3] = 0.0
        return W
    if kind == "graded":  # singular values 1 .. 1e-12: straddles the refill floor
        s = torch.logspace(0, -12, min(m, n), dtype=F64)
        Q1, _ = torch.linalg.qr(_randn(m, min(m, n), seed=6))
        Q2, _ = torch.linalg.qr(_randn(n, min(m, n), seed=7))
        return (Q1 * s) @ Q2.T
    if kind == "tiny":
        return _randn(m, n, seed=8) * 1e-30
    if kind == "huge":
        return _randn(m, n, seed=9) * 1e30
    raise ValueError(kind)


KINDS = ["random", "lowrank2", "zero", "identity", "dupcols", "deadrows", "graded", "tiny", "huge"]
SHAPES = [
    pytest.param(40, 30, 8, id="40x30-k8"),
    pytest.param(9, 30, 9, id="9x30-k9-square-U"),
    pytest.param(30, 9, 9, id="30x9-k9-square-V"),
    pytest.param(7, 7, 7, id="7x7-k7"),
    pytest.param(1, 7, 1, id="1x7-k1"),
]
BASIS_DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def _check_post(Y, Z, U_old, V_old, out):
    b, m, k = Y.shape
    n = Z.shape[-2]
    bdt = U_old.dtype
    for t in out:
        assert bool(torch.isfinite(t).all())
    assert out.U.shape == (b, m, k) and out.V.shape == (b, n, k)
    assert out.U.dtype == bdt and out.V.dtype == V_old.dtype
    eye = torch.eye(k, dtype=F64)
    for B in (out.U, out.V):
        B64 = B.to(F64)
        assert float((B64.transpose(-2, -1) @ B64 - eye).abs().max()) <= ORTHO_ATOL[bdt]
    # sigma: descending, >= 0, the larger of the two estimates, equal to svdvals of the sketches.
    assert bool((out.sigma[..., :-1] >= out.sigma[..., 1:]).all())
    assert bool((out.sigma >= 0).all())
    assert torch.equal(out.sigma, torch.maximum(out.sigma_y, out.sigma_z))
    for est, S in ((out.sigma_y, Y), (out.sigma_z, Z)):
        exact = torch.linalg.svdvals(S.to(F64))
        atol = SIGMA_ATOL_REL_TO_S1 * exact[..., :1]
        assert bool(((est - exact).abs() <= SIGMA_RTOL * exact + atol).all()), (est, exact)
    # The Ritz bases span the sketches, except the directions below the refill floor (replaced
    # by random ones by design): the residual is at most the energy of those directions.
    for B, S in ((out.U, Y), (out.V, Z)):
        B64, S64 = B.to(F64), S.to(F64)
        resid = S64 - B64 @ (B64.transpose(-2, -1) @ S64)
        norm = S64.flatten(1).norm(dim=-1)
        sv = torch.linalg.svdvals(S64)
        below = torch.where(sv <= SIGMA_ATOL_REL_TO_S1 * sv[..., :1], sv, torch.zeros_like(sv))
        allowed = SPAN_RTOL[bdt] * norm + below.norm(dim=-1)
        assert bool((resid.flatten(1).norm(dim=-1) <= allowed).all())
    # Overlaps are U_old^T U_new.
    for ov, old, new in ((out.overlap_u, U_old, out.U), (out.overlap_v, V_old, out.V)):
        assert ov.dtype == F64 and ov.shape == (b, k, k)
        torch.testing.assert_close(ov, old.to(F64).transpose(-2, -1) @ new.to(F64),
                                   rtol=0, atol=OVERLAP_ATOL[bdt])


@pytest.mark.parametrize("bdt", BASIS_DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_postprocess_invariants(kind, m, n, k, bdt):
    W = _weight(kind, m, n).to(bdt)
    U_old, V_old = init_bases(m, n, k, seed=11, dtype=bdt)
    sk = sketch_torch(W, U_old, V_old)
    out = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=3, step=5)
    _check_post(sk.Y, sk.Z, U_old, V_old, out)
    if kind == "zero":
        assert bool((out.sigma == 0).all())


@pytest.mark.parametrize("bdt", BASIS_DTYPES)
def test_postprocess_exact_values_and_ritz_vectors_on_a_well_conditioned_sketch(bdt):
    m, n, k = 50, 40, 6
    W = _weight("random", m, n).to(bdt)
    U_old, V_old = init_bases(m, n, k, seed=12, dtype=bdt)
    sk = sketch_torch(W, U_old, V_old)
    out = postprocess_torch(sk.Y, sk.Z, U_old, V_old)
    for est, S, B in ((out.sigma_y, sk.Y, out.U), (out.sigma_z, sk.Z, out.V)):
        exact = torch.linalg.svdvals(S.to(F64))
        torch.testing.assert_close(est, exact, rtol=SIGMA_RTOL, atol=0)
        # Column i is the i-th left singular vector of the sketch: B^T S S^T B = diag(sigma^2).
        P = B.to(F64).transpose(-2, -1) @ S.to(F64)
        gram = P @ P.transpose(-2, -1)
        off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
        assert float(off.abs().max()) <= SPAN_RTOL[bdt] * float(exact[..., 0] ** 2)
        torch.testing.assert_close(torch.diagonal(gram, dim1=-2, dim2=-1).sqrt(), exact,
                                   rtol=SPAN_RTOL[bdt], atol=0)


def test_postprocess_exact_low_rank_keeps_range_first():
    """rank(Y) = 2 < k: the first two columns span range(Y), the rest are refilled orthonormally."""
    m, n, k = 40, 30, 8
    W = _weight("lowrank2", m, n)
    U_old, V_old = init_bases(m, n, k, seed=13, dtype=F64)
    sk = sketch_torch(W, U_old, V_old)
    out = postprocess_torch(sk.Y, sk.Z, U_old, V_old)
    assert bool((out.sigma_y[0, 2:] == 0).all()) and bool((out.sigma_y[0, :2] > 0).all())
    Q, _ = torch.linalg.qr(sk.Y[0])
    head = out.U[0, :, :2]
    torch.testing.assert_close(Q[:, :2] @ (Q[:, :2].T @ head), head, rtol=0, atol=1e-12)
    # The refilled columns are orthogonal to range(Y).
    assert float((sk.Y[0].T @ out.U[0, :, 2:]).abs().max()) <= 1e-12 * float(sk.Y[0].norm())


def test_postprocess_zero_and_duplicated_columns_given_directly():
    m, n, k = 12, 10, 5
    U_old, V_old = init_bases(m, n, k, seed=14, dtype=F64)
    Y0 = torch.zeros(1, m, k, dtype=F64)
    Z0 = torch.zeros(1, n, k, dtype=F64)
    _check_post(Y0, Z0, U_old, V_old, postprocess_torch(Y0, Z0, U_old, V_old))
    col = _randn(1, m, 1, seed=15)
    Ydup = col.expand(1, m, k).clone()  # k identical columns: rank 1
    Zdup = _randn(1, n, 1, seed=16).expand(1, n, k).clone()
    out = postprocess_torch(Ydup, Zdup, U_old, V_old)
    _check_post(Ydup, Zdup, U_old, V_old, out)
    assert bool((out.sigma_y[0, 1:] == 0).all())


def test_postprocess_batched_equals_each_and_is_deterministic():
    m, n, k, b = 20, 15, 4, 3
    W = torch.stack([_weight("random", m, n), _weight("lowrank2", m, n), _weight("zero", m, n)])
    U_old, V_old = init_bases(m, n, k, seed=17, batch=b, dtype=F64)
    sk = sketch_torch(W, U_old, V_old)
    out = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=1, step=2)
    again = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=1, step=2)
    for a, c in zip(out, again):
        assert torch.equal(a, c)
    _check_post(sk.Y, sk.Z, U_old, V_old, out)
    for i in range(b):
        one = postprocess_torch(sk.Y[i:i + 1], sk.Z[i:i + 1], U_old[i:i + 1], V_old[i:i + 1],
                                seed=1, step=2)
        torch.testing.assert_close(one.sigma[0], out.sigma[i], rtol=1e-12, atol=1e-300)
    # Another (seed, step) refills the null directions differently, but not the range.
    other = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=1, step=3)
    assert not torch.equal(other.U[2], out.U[2])
    torch.testing.assert_close(other.sigma, out.sigma, rtol=0, atol=0)


@pytest.mark.parametrize("m,n", [(64, 64), (64, 48), (48, 64)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("bdt", BASIS_DTYPES)
def test_cpu_fast_path_matches_the_device_path(monkeypatch, m, n, bdt):
    """On the CPU a well-conditioned full-rank step takes ``_fast_side`` (one float64 product for
    Gram + old-basis projection, sign flips folded into the k x k factor, square matrices
    batched over both sides). It must agree with the general path a GPU takes (forced here by
    pretending host reads are not free) and with float64 svdvals."""
    from lowrank import _checks, postprocess as pp

    k, b = 8, 2
    W = torch.stack([_weight("random", m, n), _weight("random", m, n) * 1e-3]).to(bdt)
    U_old, V_old = init_bases(m, n, k, seed=21, batch=b, dtype=bdt)
    sk = sketch_torch(W, U_old, V_old)
    taken = []
    real_fast = pp._fast_side
    monkeypatch.setattr(pp, "_fast_side", lambda S, B: taken.append(real_fast(S, B)) or taken[-1])
    fast = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=1, step=2)
    # float64 bases always need the Cholesky-QR round, so the fast path declines them.
    assert taken and all((t is None) == (bdt == F64) for t in taken)
    _check_post(sk.Y, sk.Z, U_old, V_old, fast)
    monkeypatch.setattr(_checks, "host_reads_are_free", lambda t: False)
    slow = postprocess_torch(sk.Y, sk.Z, U_old, V_old, seed=1, step=2)
    torch.testing.assert_close(fast.sigma, slow.sigma, rtol=SIGMA_RTOL, atol=0)
    for a, c in ((fast.U, slow.U), (fast.V, slow.V), (fast.overlap_u, slow.overlap_u),
                 (fast.overlap_v, slow.overlap_v)):
        torch.testing.assert_close(a.to(F64), c.to(F64), rtol=0, atol=ORTHO_ATOL[bdt])


def test_cpu_fast_path_declines_an_ill_conditioned_sketch():
    """sigma_k / sigma_1 = 1e-5 < 1e-3: the Ritz vectors could be off orthonormality by ~1e-6,
    so the step goes through Cholesky-QR (the general path), and stays orthonormal."""
    from lowrank import postprocess as pp

    m, n, k = 40, 30, 6
    s = torch.logspace(0, -5, k, dtype=F64)
    Q1, _ = torch.linalg.qr(_randn(m, k, seed=22))
    Q2, _ = torch.linalg.qr(_randn(n, k, seed=23))
    W = ((Q1 * s) @ Q2.T).float()
    U_old, V_old = init_bases(m, n, k, seed=24)
    sk = sketch_torch(W, U_old, V_old)
    assert pp._fast_side(sk.Z, V_old) is None
    _check_post(sk.Y, sk.Z, U_old, V_old, postprocess_torch(sk.Y, sk.Z, U_old, V_old))


def test_square_batch_with_broadcast_bases():
    """Bases of batch 1 for sketches of batch b (broadcast): the CPU fast path, which stacks the
    two sides of a square batch, must not pair them wrongly; the result equals per-matrix calls."""
    m, k, b = 24, 4, 3
    W = torch.stack([_weight("random", m, m) * (i + 1) for i in range(b)]).float()
    U_old, V_old = init_bases(m, m, k, seed=31)
    sk = sketch_torch(W, U_old.expand(b, -1, -1), V_old.expand(b, -1, -1))
    out = postprocess_torch(sk.Y, sk.Z, U_old, V_old)
    assert out.U.shape == (b, m, k) and out.V.shape == (b, m, k)
    for i in range(b):
        one = postprocess_torch(sk.Y[i:i + 1], sk.Z[i:i + 1], U_old, V_old)
        torch.testing.assert_close(out.sigma[i], one.sigma[0], rtol=1e-12, atol=0)

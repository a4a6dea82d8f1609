"""Triton post-processing kernels (``gram_eigh``, ``refill_candidates``) and the Triton backend's
sync-free ``postprocess``, against float64 ``torch.linalg`` and the torch reference.

Runs on CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, as in CI; the
interpreter runs each program in numpy, so the matrices are small). The GPU-only properties (no
host synchronisation, CUDA graph capture) are in tests/test_triton_post_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from test_postprocess import KINDS, _check_post, _weight

from lowrank import backends
from lowrank.backends import kernel_module
from lowrank.postprocess import gram_eigh_torch, postprocess_torch, refill_candidates
from lowrank.sketch import init_bases, sketch_torch

PP = kernel_module("triton", "postprocess")
DEVICE = "cpu" if INTERPRET else "cuda"
F64 = torch.float64
U64 = 2.0**-53

# --- tolerance table ---------------------------------------------------------------------------
# Cyclic Jacobi is backward stable: the computed pairs are exact for A + E with
# ||E|| <= c * sweeps * K * u * ||A|| (each of a sweep's K - 1 rounds touches every entry once
# with a rotation of rounding ~u); LAPACK's eigh, the reference, has its own ~k u ||A||, and
# eigenvalues move by at most ||E||. Measured: 4e-15 ||A|| at k = 32 (7 sweeps), so c = 2 holds
# with room; a wrong rotation, pairing or sort is off by O(||A||).
def _backward_bound(A, sweeps, K):
    k = A.shape[-1]
    norm = float(torch.linalg.matrix_norm(A, 2).max())
    return 2 * (float(sweeps.max().clamp_min(1)) * K + k) * U64 * norm


def _gram(kind: str, b: int, k: int, seed: int) -> torch.Tensor:
    """Symmetric (b, k, k) float64 test matrices."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gram":  # what the post-processing passes: S^T S of a random sketch
        S = torch.randn(b, 3 * k, k, generator=g, dtype=F64)
        return S.mT @ S
    if kind == "indefinite":
        A = torch.randn(b, k, k, generator=g, dtype=F64)
        return A + A.mT
    Q = torch.linalg.qr(torch.randn(b, k, k, generator=g, dtype=F64))[0]
    if kind == "graded":  # eigenvalues 1 .. 1e-12
        lam = torch.logspace(0, -12, k, dtype=F64).expand(b, k)
    elif kind == "clustered":  # pairs of equal eigenvalues and a zero block
        lam = torch.arange(k, dtype=F64).div(2, rounding_mode="floor").flip(0).expand(b, k)
    elif kind == "lowrank":  # rank 2: the rest exactly zero before rounding
        lam = torch.zeros(b, k, dtype=F64)
        lam[:, :2] = torch.tensor([3.0, 1.0], dtype=F64)[:k]
    else:
        raise ValueError(kind)
    return (Q * lam.unsqueeze(-2)) @ Q.mT


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("kind", ["gram", "indefinite", "graded", "clustered", "lowrank"])
def test_gram_eigh_matches_float64_eigh(kind, k):
    """Eigenvalues in descending order equal eigh's to the backward bound, the eigenvectors are
    orthonormal and A E = E diag(l) to that bound, whatever the spectrum (k = 1 and 2 are the
    degenerate pairings, 3 and 5 leave padded indices in every round)."""
    A = _gram(kind, 3, k, seed=10 * k + len(kind))
    lam, E, sweeps = PP.gram_eigh_triton(A.to(DEVICE), return_sweeps=True)
    lam, E, sweeps = lam.cpu(), E.cpu(), sweeps.cpu()
    ref, _ = gram_eigh_torch(A)
    K = max(2, 1 << (k - 1).bit_length())
    bound = _backward_bound(A, sweeps, K)
    assert lam.dtype == F64 and E.dtype == F64 and lam.shape == (3, k) and E.shape == (3, k, k)
    assert bool((lam[:, :-1] >= lam[:, 1:]).all()), lam
    assert float((lam - ref).abs().max()) <= bound, (lam, ref)
    eye = torch.eye(k, dtype=F64)
    assert float((E.mT @ E - eye).abs().max()) <= K * float(sweeps.max().clamp_min(1)) * 4 * U64
    assert float((A @ E - E * lam.unsqueeze(-2)).abs().max()) <= bound
    assert bool((sweeps < PP.MAX_SWEEPS).all()), sweeps


def test_gram_eigh_vectors_match_the_reference_up_to_sign():
    """Well-separated eigenvalues: each column is the reference's, up to its sign."""
    k = 8
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(2, k, k, generator=g, dtype=F64))[0]
    A = (Q * torch.arange(k, 0, -1, dtype=F64).unsqueeze(-2)) @ Q.mT
    _, E = PP.gram_eigh_triton(A.to(DEVICE))
    _, E0 = gram_eigh_torch(A)
    cos = (E.cpu() * E0).sum(-2).abs()
    assert float((cos - 1).abs().max()) <= 1e-13


def test_gram_eigh_reads_the_lower_triangle_and_stops_at_once_on_a_diagonal():
    k = 5
    A = _gram("gram", 2, k, seed=4)
    garbage = torch.triu(torch.full((k, k), 1e6, dtype=F64), diagonal=1)
    lam, _, _ = PP.gram_eigh_triton((A.tril() + garbage).to(DEVICE), return_sweeps=True)
    torch.testing.assert_close(lam.cpu(), gram_eigh_torch(A)[0], rtol=0, atol=1e-12 * float(A.abs().max()))
    D = torch.diag_embed(torch.tensor([[1.0, 4.0, 2.0, 0.0, 3.0]], dtype=F64))
    lam, E, sweeps = PP.gram_eigh_triton(D.to(DEVICE), return_sweeps=True)
    assert int(sweeps[0]) == 0
    assert torch.equal(lam.cpu(), torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]], dtype=F64))
    assert torch.equal(E.cpu().abs(), torch.eye(k, dtype=F64)[:, [1, 4, 2, 0, 3]].unsqueeze(0))


@pytest.mark.parametrize("exponent", [-565, -900, 531, 996])
def test_gram_eigh_extreme_scales(exponent):
    """Entries whose squares under- or overflow float64 (2^-565 ~ 1e-170 .. 2^996 ~ 1e300):
    the kernel scales by a power of two first, so a matrix times 2^e gives exactly the results
    at scale 1 (eigenvalues times 2^e), not an unrotated diagonal (underflow) or NaN (overflow)."""
    scale = 2.0**exponent
    A = _gram("graded", 2, 6, seed=8) + torch.eye(6, dtype=F64)
    lam1, E1 = PP.gram_eigh_triton(A.to(DEVICE))
    lam, E, sweeps = PP.gram_eigh_triton((A * scale).to(DEVICE), return_sweeps=True)
    assert int(sweeps.min()) > 0
    assert torch.equal(lam.cpu() / scale, lam1.cpu())
    assert torch.equal(E.cpu(), E1.cpu())


def test_gram_eigh_zero_and_non_finite():
    """A zero matrix: zero eigenvalues, an orthonormal basis. A NaN or Inf anywhere: every output
    of that matrix NaN (and only of that one), never a plausible spectrum."""
    k = 4
    A = torch.stack([torch.zeros(k, k, dtype=F64), _gram("gram", 1, k, seed=5)[0],
                     _gram("gram", 1, k, seed=6)[0], _gram("gram", 1, k, seed=7)[0]])
    A[2, 1, 0] = float("nan")
    A[3, 2, 2] = float("inf")
    lam, E, sweeps = PP.gram_eigh_triton(A.to(DEVICE), return_sweeps=True)
    lam, E = lam.cpu(), E.cpu()
    assert torch.equal(lam[0], torch.zeros(k, dtype=F64)) and torch.equal(E[0].abs(), torch.eye(k, dtype=F64))
    assert bool(torch.isfinite(lam[1]).all()) and bool(torch.isfinite(E[1]).all())
    for i in (2, 3):
        assert bool(lam[i].isnan().all()) and bool(E[i].isnan().all())
    assert int(sweeps[2]) == 0 and int(sweeps[3]) == 0  # NaN fails the loop test: no sweep


def test_gram_eigh_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(b, k, k\)"):
        PP.gram_eigh_triton(torch.zeros(3, 4, dtype=F64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(b, k, k\)"):
        PP.gram_eigh_triton(torch.zeros(1, 3, 4, dtype=F64, device=DEVICE))
    with pytest.raises(ValueError, match="exceeds"):
        PP.gram_eigh_triton(torch.zeros(1, PP.MAX_K + 1, PP.MAX_K + 1, dtype=F64, device=DEVICE))
    with pytest.raises(TypeError, match="floating"):
        PP.gram_eigh_triton(torch.zeros(1, 2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        PP.gram_eigh_triton([[1.0]])
    lam, E = PP.gram_eigh_triton(torch.zeros(0, 3, 3, dtype=F64, device=DEVICE))
    assert lam.shape == (0, 3) and E.shape == (0, 3, 3)


def test_router_width_is_the_kernels():
    assert backends.TRITON_POST_MAX_K == PP.MAX_K


def test_refill_candidates_are_keyed_normals():
    """Deterministic in (seed, step, side, index); a device step gives the int step's numbers;
    every key gives other numbers; the numbers look standard normal (mean and variance within
    6 standard errors over 16K draws)."""
    shape = (3, 64, 16)
    R = PP.refill_candidates_triton(shape, 7, 5, 0, DEVICE).cpu()
    assert R.shape == shape and R.dtype == F64
    assert torch.equal(R, PP.refill_candidates_triton(shape, 7, 5, 0, DEVICE).cpu())
    for dtype in (torch.int64, torch.int32):  # (an int32 step is widened on the device)
        step_t = torch.tensor([5], dtype=dtype, device=DEVICE)
        assert torch.equal(R, PP.refill_candidates_triton(shape, 7, step_t, 0, DEVICE).cpu())
    others = [PP.refill_candidates_triton(shape, 8, 5, 0, DEVICE), PP.refill_candidates_triton(shape, 7, 6, 0, DEVICE),
              PP.refill_candidates_triton(shape, 7, 5, 1, DEVICE)]
    for other in others:  # independent normals: E|x - y| = 2 / sqrt(pi) = 1.13
        assert float((other.cpu() - R).abs().mean()) > 0.5
    assert float((R[0] - R[1]).abs().mean()) > 0.5  # each matrix of a batch draws its own
    # A large seed (name_seed hashes to 63 bits) wraps, it does not overflow into an error.
    big = PP.refill_candidates_triton(shape, 2**63 - 1, 2**40, 1, DEVICE).cpu()
    assert bool(torch.isfinite(big).all())
    x = R.flatten()
    se = 1.0 / x.numel() ** 0.5
    assert abs(float(x.mean())) <= 6 * se
    assert abs(float(x.var()) - 1.0) <= 6 * 2**0.5 * se
    with pytest.raises(ValueError, match="one integer"):
        PP.refill_candidates_triton(shape, 7, torch.tensor([1.0], device=DEVICE), 0, DEVICE)


def _sketches(kind, m, n, k, bdt, seed=11):
    W = _weight(kind, m, n).to(bdt)
    U_old, V_old = init_bases(m, n, k, seed=seed, dtype=bdt)
    sk = sketch_torch(W, U_old, V_old)
    return sk.Y, sk.Z, U_old, V_old


@pytest.mark.parametrize("bdt", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_postprocess_triton_invariants(kind, bdt):
    """The reference's invariants (finite, orthonormal, descending sigma = svdvals of the
    sketches in float64, Ritz bases spanning them, overlaps) with the Triton eigensolver and
    refill, on every test matrix, including the rank-deficient ones that take the refill."""
    m, n, k = 24, 18, 6
    Y, Z, U_old, V_old = _sketches(kind, m, n, k, bdt)
    dev = [t.to(DEVICE) for t in (Y, Z, U_old, V_old)]
    out = PP.postprocess_triton(*dev, seed=3, step=5)
    _check_post(Y, Z, U_old, V_old, type(out)(*(t.cpu() for t in out)))
    if kind == "zero":
        assert bool((out.sigma == 0).all())


@pytest.mark.parametrize("kind", ["random", "lowrank2", "graded"])
def test_postprocess_triton_equals_the_reference_given_its_candidates(kind):
    """With the reference's refill candidates, the results are the reference's up to the
    eigensolvers' rounding: sigma, and the bases column by column (both sign-aligned to the
    old bases), also where some columns are refilled."""
    m, n, k = 30, 20, 5
    Y, Z, U_old, V_old = _sketches(kind, m, n, k, F64, seed=12)
    Ry = refill_candidates((1, m, k), 1, 4, "cpu")
    Rz = refill_candidates((1, n, k), 1, 5, "cpu")
    ref = postprocess_torch(Y, Z, U_old, V_old, refill=(Ry, Rz))
    dev = [t.to(DEVICE) for t in (Y, Z, U_old, V_old)]
    out = PP.postprocess_triton(*dev, refill=(Ry.to(DEVICE), Rz.to(DEVICE)))
    s1 = float(ref.sigma[0, 0])
    torch.testing.assert_close(out.sigma.cpu(), ref.sigma, rtol=0, atol=1e-12 * s1)
    # A column's direction is as accurate as its eigenvalue's gap allows: at least 1e-3 of
    # lambda_1 here (graded: sigma 1 .. 1e-12 has the gaps of a geometric sequence).
    for a, r in ((out.U, ref.U), (out.V, ref.V), (out.overlap_u, ref.overlap_u)):
        torch.testing.assert_close(a.cpu(), r, rtol=0, atol=1e-9)


def test_postprocess_triton_device_step_and_batch():
    """A batch of matrices with a device step: the same numbers as the int step, and each
    matrix as in its own call where no refill is drawn (full rank)."""
    m, n, k, b = 20, 16, 4, 3
    W = torch.stack([_weight("random", m, n) * (i + 1) for i in range(b)])
    U_old, V_old = init_bases(m, n, k, seed=17, batch=b, dtype=F64)
    sk = sketch_torch(W, U_old, V_old)
    dev = [t.to(DEVICE) for t in (sk.Y, sk.Z, U_old, V_old)]
    out = PP.postprocess_triton(*dev, seed=2, step=9)
    again = PP.postprocess_triton(*dev, seed=2, step=torch.tensor([9], device=DEVICE))
    for a, c in zip(out, again):
        assert torch.equal(a, c)
    for i in range(b):
        one = PP.postprocess_triton(*(t[i:i + 1] for t in dev), seed=2, step=9)
        torch.testing.assert_close(one.sigma[0], out.sigma[i], rtol=1e-13, atol=0)

"""Spectral metrics against their exact values from float64 torch.linalg.svdvals.

The metrics take converged estimates (the top-k singular values) and the exact ||W||_F^2. With
k = min(m, n) every metric is exact; with k < min(m, n) the ones that depend on the unseen tail
must bound the truth: numerical_rank <= true rank <= numerical_rank_upper (censored flag set
whenever the truth may exceed what k sees) and effective_rank_lower <= true <= effective_rank_upper.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowrank import metrics
from lowrank.sketch import sketch_torch
from lowrank.tracking import MatrixTracker

F64 = torch.float64

# --- tolerance table ---------------------------------------------------------------------------
# Exact metrics from exact inputs: float64 sums of <= 300 terms, ~1e-14 relative.
EXACT_RTOL = 1e-12
# Entropy bounds: the tail energy T = ||W||_F^2 - sum sigma_i^2 is a difference of float64 sums
# (absolute error ~1e-16 ||W||_F^2), and a tail value sqrt(T) enters the entropy through
# p log p, whose slope is unbounded near 0: rounding can move the bounds by ~1e-8 relative when
# T is at rounding level. The bounds are checked with that slack, no more.
ERANK_RTOL = 1e-6
# A tracker on a fixed float64 matrix with a spectral gap converges to rounding level.
TRACKER_RTOL = 1e-9


def _erank(s: torch.Tensor) -> float:
    """Roy & Vetterli effective rank exp(H(p)), p = s / sum(s), of a float64 spectrum."""
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def _random_spectrum(kind: str, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(N, generator=g, dtype=F64)
    if kind == "uniform":
        s = u
    elif kind == "heavy-head":
        s = u ** 6
    elif kind == "log-uniform":
        s = torch.exp(-20 * u)
    elif kind == "flat-tail":
        s = u.clone()
        s[N // 3:] = 0.01 * float(u[0])
    elif kind == "zeros-in-tail":
        s = u.clone()
        s[N - N // 2:] = 0.0
    elif kind == "exact-low-rank":  # rank 3 < k: sigma_k = 0, the tail is empty
        s = torch.zeros(N, dtype=F64)
        s[:3] = u[:3] + 0.1
    else:
        raise ValueError(kind)
    return s.sort(descending=True).values


KINDS = ["uniform", "heavy-head", "log-uniform", "flat-tail", "zeros-in-tail", "exact-low-rank"]


def _state(s: torch.Tensor, k: int):
    """Converged estimates (the exact top k) and the exact fro2, batched as (1, ...)."""
    return s[:k].unsqueeze(0).clone(), s.square().sum().reshape(1)


def _with_spectrum(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64))
    return (U * s) @ V.T


# --- exact when k = min(m, n) ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_all_metrics_exact_when_k_is_full(kind):
    m, n = 40, 25
    s = _random_spectrum(kind, n, seed=1)
    sigma, fro2 = _state(s, n)
    r, tol = 4, 1e-2
    out = metrics.summarize(sigma, sigma, sigma, sigma, fro2, None, None, (m, n), r, tol)
    torch.testing.assert_close(out["sigma"][0], s[:r], rtol=0, atol=0)
    assert float(out["spectral_norm"][0]) == float(s[0])
    assert float(out["fro_norm"][0]) == pytest.approx(float(s.norm()), rel=EXACT_RTOL)
    assert float(out["stable_rank"][0]) == pytest.approx(float(s.square().sum() / s[0] ** 2),
                                                         rel=EXACT_RTOL)
    assert float(out["energy_fraction"][0]) == pytest.approx(
        float(s[:r].square().sum() / s.square().sum()), rel=EXACT_RTOL)
    true_rank = int((s > tol * s[0]).sum())
    assert int(out["numerical_rank"][0]) == true_rank
    assert int(out["numerical_rank_upper"][0]) == true_rank
    assert not bool(out["rank_censored"][0])
    for key in ("effective_rank", "effective_rank_lower", "effective_rank_upper"):
        assert float(out[key][0]) == pytest.approx(_erank(s), rel=EXACT_RTOL), key
    assert float(metrics.tail_energy(sigma, fro2)[0]) <= 1e-14 * float(fro2[0])
    assert float(out["convergence"][0]) == 0.0


def test_metrics_from_a_converged_tracker():
    m, n, k, r = 60, 45, 12, 4
    i = torch.arange(1, n + 1, dtype=F64)
    s = torch.where(i <= r, 2.0 - 0.2 * i, 0.3 * 0.9 ** i)  # gap after r
    W = _with_spectrum(m, n, s, seed=2)
    tr = MatrixTracker("w", (m, n), k, seed=0, basis_dtype=F64)
    for _ in range(60):
        tr.absorb(sketch_torch(W, tr.U, tr.V))
    res = tr.result(r, tol=1e-2)
    exact = torch.linalg.svdvals(W)
    torch.testing.assert_close(res.sigma, exact[:r], rtol=TRACKER_RTOL, atol=0)
    assert float(res.stable_rank) == pytest.approx(float(W.square().sum() / exact[0] ** 2),
                                                   rel=TRACKER_RTOL)
    assert float(res.energy_fraction) == pytest.approx(
        float(exact[:r].square().sum() / W.square().sum()), rel=TRACKER_RTOL)
    true_rank = int((exact > 1e-2 * exact[0]).sum())
    assert int(res.numerical_rank) <= true_rank <= int(res.numerical_rank_upper)
    assert float(res.effective_rank_lower) <= _erank(exact) * (1 + ERANK_RTOL)
    assert _erank(exact) <= float(res.effective_rank_upper) * (1 + ERANK_RTOL)
    assert float(res.convergence) < 1e-9
    assert float(res.subspace_drift) < 1e-6


# --- bounds when k < min(m, n) -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10, 29])
def test_rank_and_effective_rank_bound_the_truth(kind, k):
    N = 30
    for seed in range(20):
        s = _random_spectrum(kind, N, seed=seed)
        sigma, fro2 = _state(s, k)
        for tol in (1e-3, 1e-1):
            rank, upper, censored = metrics.numerical_rank(sigma, fro2, (N, N + 7), tol)
            true_rank = int((s > tol * s[0]).sum())
            assert int(rank[0]) <= true_rank <= int(upper[0]), (seed, tol)
            assert int(upper[0]) <= N
            assert bool(censored[0]) == (int(upper[0]) > int(rank[0]))
            if true_rank > int(rank[0]):
                assert bool(censored[0])
            if not bool(censored[0]):
                assert int(rank[0]) == true_rank
        est, lo, hi = metrics.effective_rank(sigma, fro2, (N + 7, N))
        t = _erank(s)
        assert float(lo[0]) <= t * (1 + ERANK_RTOL) and t <= float(hi[0]) * (1 + ERANK_RTOL), seed
        assert float(lo[0]) <= float(est[0]) <= float(hi[0])
        for v in (est, lo, hi):
            assert math.isfinite(float(v[0]))


def test_effective_rank_bounds_are_attained_by_the_extreme_tails():
    """The lower bound is the entropy of the concentrated tail and the upper that of the spread
    tail, so each is the exact answer for some matrix, and any other tail of the same energy
    (here every two-level tail on a grid) lies between them."""
    head = torch.tensor([1.0, 0.6, 0.3], dtype=F64)
    rest = 6
    sk = float(head[-1])
    for T in (0.0, 0.01, 0.09, 0.2, 0.5):
        fro2 = (head.square().sum() + T).reshape(1)
        _, lo, hi = metrics.effective_rank(head.unsqueeze(0), fro2, (3 + rest, 20))
        c = math.floor(T / sk ** 2)
        concentrated = [sk] * c + [math.sqrt(max(T - c * sk ** 2, 0.0))]
        spread = [math.sqrt(T / rest)] * rest
        for tail, bound in ((concentrated, lo), (spread, hi)):
            s = torch.cat([head, torch.tensor(tail, dtype=F64)])
            # ERANK_RTOL: T = 0.09 comes out as 0.09 + 8e-17, a remainder value of 9e-9.
            assert float(bound[0]) == pytest.approx(_erank(s), rel=ERANK_RTOL)
        for a, b in itertools.product(range(rest + 1), repeat=2):
            if a + b == 0 or a + b > rest:
                continue
            for frac in torch.linspace(0, 1, 11).tolist():
                Ea, Eb = frac * T, (1 - frac) * T
                if (a == 0 and Ea > 0) or (b == 0 and Eb > 0):
                    continue
                u = math.sqrt(Ea / a) if a else 0.0
                v = math.sqrt(Eb / b) if b else 0.0
                if max(u, v) > sk:
                    continue
                t = _erank(torch.cat([head, torch.tensor([u] * a + [v] * b, dtype=F64)]))
                assert float(lo[0]) <= t * (1 + ERANK_RTOL) and t <= float(hi[0]) * (1 + ERANK_RTOL)


def test_effective_rank_of_exact_low_rank_has_no_tail():
    # Regression: sigma_k = 0 made the concentrated-tail count 0/0 = NaN, which came out as a
    # lower bound of 1 and a wrong estimate for every matrix of rank < k.
    sigma = torch.tensor([[1.0, 0.5, 0.0, 0.0]], dtype=F64)
    fro2 = sigma.square().sum(-1)
    est, lo, hi = metrics.effective_rank(sigma, fro2, (10, 12))
    expect = _erank(sigma[0])
    for v in (est, lo, hi):
        assert float(v[0]) == pytest.approx(expect, rel=EXACT_RTOL)


# --- the other metrics -------------------------------------------------------------------------

def test_stable_rank_and_energy_fraction_with_partial_window():
    s = _random_spectrum("uniform", 50, seed=3)
    sigma, fro2 = _state(s, 8)
    assert float(metrics.stable_rank(sigma, fro2)[0]) == pytest.approx(
        float(s.square().sum() / s[0] ** 2), rel=EXACT_RTOL)
    for r in (1, 5, 8):
        assert float(metrics.energy_fraction(sigma, fro2, r)[0]) == pytest.approx(
            float(s[:r].square().sum() / s.square().sum()), rel=EXACT_RTOL)
    # Lower-bound estimates (not yet converged) give an upper bound of the stable rank and a lower
    # bound of the energy fraction.
    low = sigma * 0.9
    assert float(metrics.stable_rank(low, fro2)[0]) >= float(s.square().sum() / s[0] ** 2)
    assert float(metrics.energy_fraction(low, fro2, 5)[0]) <= float(
        s[:5].square().sum() / s.square().sum())


def _orth(p, k, seed):
    Q, _ = torch.linalg.qr(torch.randn(p, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=F64))
    return Q


@pytest.mark.parametrize("r", [1, 3, 6])
def test_subspace_drift(r):
    p, k = 30, 6
    U = _orth(p, k, 1)
    same = (U.T @ U).unsqueeze(0)
    assert float(metrics.subspace_drift(same, r)[0]) <= 1e-7  # sqrt of a rounding-level 1 - cos^2
    # Same subspace, other basis (rotated inside the top r): still 0.
    R = _orth(r, r, 2)
    U_rot = U.clone()
    U_rot[:, :r] = U[:, :r] @ R
    assert float(metrics.subspace_drift((U.T @ U_rot).unsqueeze(0), r)[0]) <= 1e-7
    # Orthogonal subspaces: 1.
    Q = _orth(p, 2 * k, 3)
    ortho = (Q[:, :k].T @ Q[:, k:]).unsqueeze(0)
    assert float(metrics.subspace_drift(ortho, r)[0]) == pytest.approx(1.0, abs=1e-12)
    # General: sqrt(mean sin^2) of the principal angles between the top-r subspaces.
    V = _orth(p, k, 4)
    cos = torch.linalg.svdvals(U[:, :r].T @ V[:, :r]).clamp(max=1.0)
    expect = math.sqrt(float((1 - cos.square()).mean()))
    got = float(metrics.subspace_drift((U.T @ V).unsqueeze(0), r)[0])
    assert got == pytest.approx(expect, rel=1e-12)


def test_subspace_drift_rejects_r_beyond_k():
    with pytest.raises(ValueError, match="1 <= r <= k"):
        metrics.subspace_drift(torch.eye(4, dtype=F64).unsqueeze(0), 5)


def test_convergence():
    sy = torch.tensor([[2.0, 1.0, 0.5]], dtype=F64)
    assert float(metrics.convergence(sy, sy, None, 3)[0]) == 0.0
    sz = torch.tensor([[2.0, 0.99, 0.1]], dtype=F64)
    # Top 2 disagree by 0.01 (relative to sigma_1 = 2); the third is outside r.
    assert float(metrics.convergence(sy, sz, None, 2)[0]) == pytest.approx(0.005, rel=1e-12)
    prev = torch.tensor([[1.9, 1.0, 0.5]], dtype=F64)
    assert float(metrics.convergence(sy, sy, prev, 2)[0]) == pytest.approx(0.05, rel=1e-12)
    zero = torch.zeros(1, 3, dtype=F64)
    assert float(metrics.convergence(zero, zero, zero, 2)[0]) == 1.0


def test_near_zero_rows():
    row_sq = torch.tensor([[4.0, 0.0, 1e-14, 1e-10, 9.0]], dtype=F64)
    # Row norms 2, 0, 1e-7, 1e-5, 3: at tol 1e-6 of the largest (3), rows 0 and 1e-7 vanish.
    assert int(metrics.near_zero_rows(row_sq)[0]) == 2
    assert int(metrics.near_zero_rows(row_sq, tol=1e-4)[0]) == 3
    W = torch.randn(12, 7, generator=torch.Generator().manual_seed(5), dtype=F64)
    W[[2, 5, 6]] = 0.0
    assert int(metrics.near_zero_rows(W.square().sum(-1, keepdim=False).unsqueeze(0))[0]) == 3


def test_zero_matrix_gives_no_nan():
    m, n, k, r = 10, 8, 4, 2
    sk = sketch_torch(torch.zeros(m, n, dtype=F64), torch.zeros(1, m, k, dtype=F64),
                      torch.zeros(1, n, k, dtype=F64))
    z = torch.zeros(1, k, dtype=F64)
    out = metrics.summarize(z, z, z, z, sk.fro2, sk.row_sq, torch.eye(k, dtype=F64).unsqueeze(0),
                            (m, n), r)
    for key, value in out.items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), key
    assert int(out["numerical_rank"][0]) == 0 and int(out["numerical_rank_upper"][0]) == 0
    assert not bool(out["rank_censored"][0])
    assert float(out["stable_rank"][0]) == 0.0 and float(out["energy_fraction"][0]) == 0.0
    for key in ("effective_rank", "effective_rank_lower", "effective_rank_upper"):
        assert float(out[key][0]) == 0.0, key
    assert float(out["convergence"][0]) == 1.0
    assert int(out["near_zero_rows"][0]) == m  # every row of a zero matrix vanishes


def test_metrics_are_batched():
    N, k = 20, 5
    kinds = ("uniform", "log-uniform", "zeros-in-tail")
    spectra = [_random_spectrum(kind, N, seed=7) for kind in kinds]
    sigma = torch.stack([s[:k] for s in spectra])
    fro2 = torch.stack([s.square().sum() for s in spectra])
    out = metrics.summarize(sigma, sigma, sigma, None, fro2, None, None, (N, N), 3)
    for i, s in enumerate(spectra):
        one = metrics.summarize(sigma[i:i + 1], sigma[i:i + 1], sigma[i:i + 1], None,
                                fro2[i:i + 1], None, None, (N, N), 3)
        for key in out:
            torch.testing.assert_close(out[key][i], one[key][0], rtol=1e-15, atol=0, msg=key)


def test_metrics_take_a_shape_per_row():
    """Shapes given as (b,) tensors (the run log's batches of matrices of several shapes) give
    each row exactly what its own shape gives: rows with and without a tail beyond k, exact
    low rank and a zero matrix among them."""
    k = 5
    shapes = [(20, 30), (5, 9), (40, 5), (7, 7), (12, 6), (9, 50)]
    rows = []
    for i, (m, n) in enumerate(shapes):
        s = _random_spectrum(KINDS[i % len(KINDS)], min(m, n), seed=i)
        rows.append((s[:k], s.square().sum()))
    rows.append((torch.zeros(k, dtype=F64), torch.zeros((), dtype=F64)))  # a zero matrix
    shapes.append((8, 11))
    sigma = torch.stack([s for s, _ in rows])
    fro2 = torch.stack([f for _, f in rows])
    prev = sigma * 0.99
    overlap = torch.eye(k, dtype=F64).expand(len(rows), k, k).contiguous()
    per_row = (torch.tensor([float(m) for m, _ in shapes], dtype=F64),
               torch.tensor([float(n) for _, n in shapes], dtype=F64))
    out = metrics.summarize(sigma, sigma, prev, prev, fro2, None, overlap, per_row, 3)
    assert bool((out["effective_rank_upper"] > out["effective_rank_lower"]).any())  # tails seen
    for i, shape in enumerate(shapes):
        one = metrics.summarize(sigma[i:i + 1], sigma[i:i + 1], prev[i:i + 1], prev[i:i + 1],
                                fro2[i:i + 1], None, overlap[i:i + 1], shape, 3)
        assert out.keys() == one.keys()
        for key in out:
            torch.testing.assert_close(out[key][i], one[key][0], rtol=0, atol=0, msg=key)

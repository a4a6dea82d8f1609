"""MatrixTracker: the block power iteration spread over steps converges on a fixed matrix, follows
a moving one, survives non-finite weights, and resumes identically from its state_dict.
"""

from __future__ import annotations

import io

import pytest
import torch

from lowrank.sketch import sketch_torch
from lowrank.tracking import STATE_KEYS, MatrixTracker

F64 = torch.float64

# --- tolerance table ---------------------------------------------------------------------------
# Fixed float64 matrix, spectral gap sigma_{k+1} / sigma_r <= 0.25: the iteration reaches rounding
# level; float32 bases round the iterate to ~6e-8 per entry, which caps the accuracy at ~1e-8
# relative (measured 1e-8), so they get the 1e-6 the design promises.
FIXED_RTOL = {F64: 1e-12, torch.float32: 1e-6}
# Lower-bound invariant: Rayleigh-Ritz values never exceed the truth beyond rounding.
UPPER_RTOL = {F64: 1e-12, torch.float32: 1e-6}
# Moving float32 matrix (1-5% Frobenius change per step): top-r error after warm-up. Measured
# worst over steps 30-60: random rank-k drift 2e-6 (1%), 4e-5 (3%), 1.1e-4 (5%); steadily
# rotating subspace 2.7e-5 (1%), 6.6e-4 (5%).
MOVING_RTOL = 1e-3
WARMUP = 30

M, N, K, R = 96, 80, 12, 4


def _with_spectrum(m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64))
    return (U * s) @ V.T


def _gapped(seed=0):
    """Top R values in [1.2, 2]; the rest <= 0.3: sigma_{k+1} / sigma_r <= 0.25."""
    i = torch.arange(1, min(M, N) + 1, dtype=F64)
    s = torch.where(i <= R, 2.0 - 0.2 * (i - 1), 0.3 * 0.95 ** (i - R - 1))
    return _with_spectrum(M, N, s, seed)


def _rel_err(tr: MatrixTracker, W: torch.Tensor) -> float:
    exact = torch.linalg.svdvals(W.to(F64))[:R]
    return float(((tr.sigma[0, :R] - exact).abs() / exact).max())


@pytest.mark.parametrize("bdt", [pytest.param(F64, id="fp64-bases"),
                                 pytest.param(torch.float32, id="fp32-bases")])
def test_converges_on_a_fixed_matrix(bdt):
    W = _gapped()
    exact = torch.linalg.svdvals(W)
    tr = MatrixTracker("fixed", (M, N), K, seed=0, basis_dtype=bdt)
    conv = []
    for _ in range(25):
        tr.absorb(sketch_torch(W, tr.U, tr.V))
        res = tr.result(R)
        conv.append(float(res.convergence))
        assert bool((tr.sigma[0] <= exact[:K] * (1 + UPPER_RTOL[bdt])).all())
        assert not bool(res.nonfinite)
    assert _rel_err(tr, W) < FIXED_RTOL[bdt]
    assert conv[-1] < 1e-3 and conv[-1] < conv[1] / 100
    assert max(conv[10:]) < 1e-3  # once converged it stays converged
    assert float(tr.result(R).subspace_drift) < 1e-3
    assert tr.step == 25


@pytest.mark.parametrize("rate", [pytest.param(0.01, id="1pct"), pytest.param(0.03, id="3pct"),
                                  pytest.param(0.05, id="5pct")])
def test_tracks_a_moving_matrix(rate):
    g = torch.Generator().manual_seed(7)
    W = _gapped(seed=1).to(torch.float32)
    tr = MatrixTracker("moving", (M, N), K, seed=3)  # float32 bases, as for float32 weights
    errs = []
    for step in range(2 * WARMUP):
        D = torch.randn(M, K, generator=g) @ torch.randn(K, N, generator=g)  # rank-k drift
        W = W + (rate * W.norm() / D.norm()) * D
        tr.absorb(sketch_torch(W, tr.U, tr.V))
        if step >= WARMUP:
            errs.append(_rel_err(tr, W))
        exact = torch.linalg.svdvals(W.to(F64))
        assert bool((tr.sigma[0] <= exact[:K] * (1 + UPPER_RTOL[torch.float32])).all())
    assert max(errs) < MOVING_RTOL, max(errs)
    # The drift really moved the top-r subspace (measured max sin: 0.023, 0.069, 0.118).
    assert _max_sin(_gapped(seed=1), W) > 2 * rate


def _max_sin(A, B):
    """Sine of the largest principal angle between the top-R left singular subspaces."""
    Ua = torch.linalg.svd(A.to(F64))[0][:, :R]
    Ub = torch.linalg.svd(B.to(F64))[0][:, :R]
    cos_min = torch.linalg.svdvals(Ua.T @ Ub).min().clamp(max=1.0)
    return float((1 - cos_min ** 2).sqrt())


def _skew(p, g):
    X = torch.randn(p, K // 2, generator=g, dtype=F64)
    Y = torch.randn(p, K // 2, generator=g, dtype=F64)
    S = X @ Y.T - Y @ X.T
    return S / torch.linalg.matrix_norm(S, 2)


@pytest.mark.parametrize("rate", [pytest.param(0.01, id="1pct"), pytest.param(0.05, id="5pct")])
def test_tracks_a_rotating_subspace_with_changing_values(rate):
    """A harder motion than random drift: a fixed rotation turns the top singular subspaces
    steadily (W <- Q_L W Q_R^T, each step `rate` of ||W||_F), while the top values grow and then
    shrink by 1% per step (W <- W +- 0.01 U_r U_r^T W)."""
    g = torch.Generator().manual_seed(7)
    W0 = _gapped(seed=1)
    OL, OR = _skew(M, g), _skew(N, g)
    # Calibrate the angle so one rotation step changes W by `rate` of its Frobenius norm.
    QL, QR = torch.linalg.matrix_exp(rate * OL), torch.linalg.matrix_exp(rate * OR)
    theta = rate * rate / float((QL @ W0 @ QR.T - W0).norm() / W0.norm())
    QL, QR = torch.linalg.matrix_exp(theta * OL), torch.linalg.matrix_exp(theta * OR)
    tr = MatrixTracker("rotating", (M, N), K, seed=3)
    W, errs, top = W0, [], []
    for step in range(2 * WARMUP):
        W = QL @ W @ QR.T
        Ur = torch.linalg.svd(W)[0][:, :R]
        W = W + (0.01 if (step // 15) % 2 == 0 else -0.01) * (Ur @ (Ur.T @ W))
        Wf = W.to(torch.float32)
        tr.absorb(sketch_torch(Wf, tr.U, tr.V))
        top.append(float(torch.linalg.svdvals(W)[0]))
        if step >= WARMUP:
            errs.append(_rel_err(tr, Wf))
    assert max(errs) < MOVING_RTOL, max(errs)  # measured 2.7e-5 (1%), 6.6e-4 (5%)
    assert max(top) / min(top) > 1.1  # the values moved by >10% ...
    assert _max_sin(W0, W) > 0.3  # ... and the subspace turned a long way (measured 0.47, 0.57)


@pytest.mark.parametrize("bad", [pytest.param(float("nan"), id="nan"),
                                 pytest.param(float("inf"), id="inf")])
def test_nonfinite_step_keeps_state_and_next_step_continues(bad):
    W = _gapped().to(torch.float32)
    Wbad = W.clone()
    Wbad[3, 5] = bad
    clean = MatrixTracker("w", (M, N), K, seed=0)
    hit = MatrixTracker("w", (M, N), K, seed=0)
    for _ in range(5):
        clean.absorb(sketch_torch(W, clean.U, clean.V))
        hit.absorb(sketch_torch(W, hit.U, hit.V))
    before = {key: value.clone() for key, value in hit.state_dict().items() if key != "step"}
    hit.absorb(sketch_torch(Wbad, hit.U, hit.V))
    res = hit.result(R)
    assert bool(res.nonfinite)
    for key, value in before.items():
        if key in ("nonfinite", "sigma_prev"):
            continue
        assert torch.equal(getattr(hit, key), value), key
    for key, value in hit.metrics(R).items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), key
    # The next finite step continues as if the bad one had not happened (no refill is needed on
    # this full-rank matrix, so the step counter does not change the numbers).
    for _ in range(3):
        clean.absorb(sketch_torch(W, clean.U, clean.V))
        hit.absorb(sketch_torch(W, hit.U, hit.V))
    assert not bool(hit.result(R).nonfinite)
    for key in ("U", "V", "sigma", "sigma_y", "sigma_z", "fro2", "row_sq"):
        assert torch.equal(getattr(hit, key), getattr(clean, key)), key
    assert hit.step == clean.step + 1


def test_nonfinite_first_step_and_zero_matrix_give_no_nan():
    tr = MatrixTracker("w", (M, N), K, seed=0)
    tr.absorb(sketch_torch(torch.full((M, N), float("nan")), tr.U, tr.V))
    tr.absorb(sketch_torch(torch.zeros(M, N), tr.U, tr.V))
    tr.absorb(sketch_torch(torch.zeros(M, N), tr.U, tr.V))
    out = tr.metrics(R)
    for key, value in out.items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), key
    assert int(out["numerical_rank"][0]) == 0
    eye = torch.eye(K, dtype=F64)
    for B in (tr.U[0].to(F64), tr.V[0].to(F64)):
        assert float((B.T @ B - eye).abs().max()) < 1e-6


def test_state_dict_round_trip_continues_identically():
    W = _gapped().to(torch.float32)
    g = torch.Generator().manual_seed(11)
    steps = [W + 0.01 * torch.randn(M, N, generator=g) for _ in range(20)]
    a = MatrixTracker("layer.weight", (M, N), K, seed=5)
    for Wt in steps[:10]:
        a.absorb(sketch_torch(Wt, a.U, a.V))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # tensors and ints only
    b = MatrixTracker("layer.weight", (M, N), K, seed=5)
    b.load_state_dict(state)
    assert b.step == a.step == 10
    for Wt in steps[10:]:
        a.absorb(sketch_torch(Wt, a.U, a.V))
        b.absorb(sketch_torch(Wt, b.U, b.V))
    for key in STATE_KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for key, value in a.metrics(R).items():
        assert torch.equal(value, b.metrics(R)[key]), key


def test_load_state_dict_rejects_wrong_shapes():
    a = MatrixTracker("w", (M, N), K)
    b = MatrixTracker("w", (M, N), K - 1)
    with pytest.raises(ValueError, match="tracker state 'U' of 'w' has shape"):
        b.load_state_dict(a.state_dict())


def test_constructor_and_metrics_validate_k_and_r():
    with pytest.raises(ValueError, match=r"k=9 exceeds min\(m, n\) = 8"):
        MatrixTracker("w", (8, 20), 9)
    with pytest.raises(ValueError, match="k must be >= 1"):
        MatrixTracker("w", (8, 20), 0)
    tr = MatrixTracker("w", (8, 20), 4)
    with pytest.raises(ValueError, match="r=5 exceeds the sketch width k=4"):
        tr.metrics(5)
    with pytest.raises(ValueError, match="r must be >= 1"):
        tr.result(0)


def test_trackers_with_different_names_start_differently():
    a = MatrixTracker("a", (M, N), K, seed=0)
    b = MatrixTracker("b", (M, N), K, seed=0)
    a2 = MatrixTracker("a", (M, N), K, seed=0)
    assert not torch.equal(a.U, b.U)
    assert torch.equal(a.U, a2.U) and torch.equal(a.V, a2.V)


@pytest.mark.parametrize("batched", [False, True], ids=["sketch_each", "batched_sketch"])
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_absorb_group_equals_one_matrix_at_a_time(monkeypatch, path, batched):
    # One batched post-processing call for same-shape matrices (what SpectralSGD does per step)
    # must give what each tracker gets alone, with each matrix's own seed, including a
    # non-finite and a rank-deficient member of the batch. "device": the path a GPU takes (no
    # host read of the finite flags: each state field is selected for the whole group);
    # "batched_sketch": the group's sketches come as one (b, ...) SketchOut (a batched pass).
    from lowrank import _checks
    from lowrank.sketch import SketchOut
    from lowrank.tracking import absorb_group

    if path == "device":
        monkeypatch.setattr(_checks, "host_reads_are_free", lambda t: False)

    gen = torch.Generator().manual_seed(5)
    Ws = [torch.randn(30, 20, generator=gen, dtype=torch.float64) for _ in range(3)]
    Ws[1][:, 3:] = 0.0  # rank 3 < k: refill directions from this tracker's own seed
    alone = [MatrixTracker(f"w{i}", (30, 20), 6, seed=1, basis_dtype=torch.float64) for i in range(3)]
    grouped = [MatrixTracker(f"w{i}", (30, 20), 6, seed=1, basis_dtype=torch.float64) for i in range(3)]
    for step in range(4):
        mats = [W.clone() for W in Ws]
        if step == 2:
            mats[2][0, 0] = float("nan")
        for tr, W in zip(alone, mats):
            tr.absorb(sketch_torch(W, tr.U, tr.V))
        sketches = [sketch_torch(W, tr.U, tr.V) for tr, W in zip(grouped, mats)]
        if batched:
            absorb_group(grouped, None, batched=SketchOut(
                *(torch.cat([getattr(s, f) for s in sketches]) for f in ("Y", "Z", "fro2", "row_sq"))))
        else:
            absorb_group(grouped, sketches)
        for a, g in zip(alone, grouped):
            assert a.step == g.step == step + 1
            for key in ("U", "V", "sigma", "sigma_y", "sigma_z", "sigma_prev", "fro2", "row_sq",
                        "overlap_u"):
                torch.testing.assert_close(getattr(g, key), getattr(a, key), rtol=1e-10,
                                           atol=1e-12, msg=f"{a.name}.{key}")
                assert getattr(g, key).shape == getattr(a, key).shape
            assert bool(g.nonfinite) == bool(a.nonfinite) == (step == 2 and a.name == "w2")


def test_step_hands_every_shape_of_one_width_to_one_postprocess_call(monkeypatch):
    """Under the "both" schedule a step's groups (here three shapes, one of them two matrices,
    and a matrix of another width) reach the post-processing as one call per width, which the
    CuPy kernel runs as one launch sequence (tests/test_cupy_kernels.py)."""
    from torch import nn

    from lowrank import SpectralSGD, backends

    calls = []
    real = backends.postprocess_many

    def spy(groups, **kw):
        calls.append(sorted(tuple(g[0].shape) for g in groups))
        return real(groups, **kw)

    monkeypatch.setattr(backends, "postprocess_many", spy)
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(12, 18)), "b": nn.Parameter(torch.randn(12, 18)),
              "c": nn.Parameter(torch.randn(20, 9)), "d": nn.Parameter(torch.randn(9, 30)),
              "e": nn.Parameter(torch.randn(3, 40))}  # k = min(8, 3) = 3
    opt = SpectralSGD(list(params.items()), lr=0.1, rank=2, sketch_rank=8, backend="torch",
                      schedule="both")
    for step in range(2):
        for p in params.values():
            p.grad = torch.randn_like(p)
        calls.clear()
        opt.step()
        assert sorted(calls) == [[(1, 3, 3)], [(1, 9, 8), (1, 20, 8), (2, 12, 8)]]
    assert all(t.step == 2 for t in opt.tracked.trackers.values())


def test_pending_group_of_a_pack_is_post_processed_with_the_packs_own_bases(monkeypatch):
    """A pack whose matrices take the per-matrix pass (here a gradient that is not contiguous)
    reaches the post-processing with the pack's own U and V, not a new concatenation: their
    addresses are in the CuPy kernel's problem table, which must not change from step to step
    (a CUDA graph capture cannot upload a new one)."""
    from torch import nn

    from lowrank import SpectralSGD, tracking

    seen = []
    real = tracking.absorb_groups

    def spy(specs):
        seen.extend(specs)
        return real(specs)

    monkeypatch.setattr(tracking, "absorb_groups", spy)
    monkeypatch.setattr("lowrank.trackset.absorb_groups", spy)
    torch.manual_seed(1)
    params = {"a": nn.Parameter(torch.randn(12, 18)), "b": nn.Parameter(torch.randn(12, 18))}
    opt = SpectralSGD(list(params.items()), lr=0.1, rank=2, sketch_rank=4, backend="torch",
                      schedule="both")
    (packed,) = opt.tracked._packs.values()
    for p in params.values():
        p.grad = torch.randn(18, 12).T  # not contiguous: the per-matrix path
    opt.step()
    (spec,) = seen
    trackers, sketches, batched, bases, pack, _ = spec
    assert sketches is not None and batched is None  # the pending (per-matrix) path
    assert pack is packed and bases[0] is packed["U"] and bases[1] is packed["V"]
    assert all(t.step == 1 for t in trackers)

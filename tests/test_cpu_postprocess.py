"""The CPU post-processing kernel (kernels/cpu/postprocess.c) against the torch reference's fast
path and float64 truth: sigma, bases, overlaps and the factor T over widths, batches, chunked
rows and strided inputs; every case it must hand back to the reference; determinism; and that
tracking on the cpu backend runs it."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank import backends
from lowrank.postprocess import _fast_side, postprocess_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

if not backends.cpu_kernel_available():
    pytest.skip("the CPU kernel does not build here", allow_module_level=True)

PP = backends.kernel_module("cpu", "postprocess")
SQ = backends.kernel_module("cpu", "sequential_step")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sketch_of(b, p, k, *, seed, decay=0.9, dtype=torch.float32):
    """S (b, p, k) = A V with A of geometric singular values (well conditioned at these k)."""
    g = gen(seed)
    left = torch.linalg.qr(torch.randn(b, p, k, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(b, k, k, generator=g, dtype=torch.float64)).Q
    sig = decay ** torch.arange(k, dtype=torch.float64)
    return (left * sig @ right).to(dtype), sig


def basis(b, p, k, seed):
    return torch.linalg.qr(torch.randn(b, p, k, generator=gen(seed))).Q


# widths around the 8-column specialisations up to KMAX = 32, rows past several 256-row chunks, batches
CASES = [(1, 37, 1), (1, 37, 3), (2, 300, 8), (1, 1500, 16), (3, 200, 20), (1, 2049, 31),
         (1, 130, 32)]


@pytest.mark.parametrize("b,p,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_side_matches_float64_truth_and_the_torch_fast_path(b, p, k, dtype):
    S, _ = sketch_of(b, p, k, seed=p + k, dtype=dtype)
    B = basis(b, p, k, seed=k)
    P = torch.randn(b, 50, k, generator=gen(3))
    out = PP.postprocess_side_cpu(S, B, P=P)
    assert out is not None
    Q, sigma, overlap, T, PT = out
    S64 = S.double()
    # sigma: the singular values of S, to float64 accuracy
    truth = torch.linalg.svdvals(S64)
    assert float(((sigma - truth).abs() / truth[..., :1]).max()) < 1e-13
    # Q orthonormal (float32 storage), spanning S, equal to S T; overlap = B^T Q; PT = P T
    eye = torch.eye(k, dtype=torch.float64)
    assert float((Q.double().mT @ Q.double() - eye).abs().max()) < 1e-6
    assert float((Q.double() - S64 @ T).abs().max()) < 1e-6
    assert float((overlap - B.double().mT @ (S64 @ T)).abs().max()) < 1e-12
    assert float((PT - P.double() @ T).abs().max()) < 1e-12
    assert bool((torch.diagonal(overlap, dim1=-2, dim2=-1) >= 0).all())  # signs tied to B
    # the torch fast path: same numbers up to float64 rounding (distinct singular values)
    ref = _fast_side(S, B)
    assert float((sigma - ref[1]).abs().max() / ref[1].max()) < 1e-13
    assert float((overlap - ref[2]).abs().max()) < 1e-9
    assert float((T - ref[3]).abs().max() / ref[3].abs().max()) < 1e-9
    assert float((Q - ref[0]).abs().max()) < 1e-6


def test_strided_sketches_are_read_through_their_row_stride():
    S, _ = sketch_of(2, 100, 16, seed=5)
    padded = torch.nn.functional.pad(S, (0, 8))  # a (2, 100, 24) buffer; S is a view of it
    view = padded[..., :16]
    assert not view.is_contiguous()
    B = basis(2, 100, 16, 6)
    got, want = PP.postprocess_side_cpu(view, B), PP.postprocess_side_cpu(S, B)
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)


def test_repeated_singular_values_give_the_same_subspaces():
    """Within a cluster the eigenvectors are any rotation: compare projectors, not columns."""
    k = 6
    left = torch.linalg.qr(torch.randn(1, 80, k, generator=gen(1), dtype=torch.float64)).Q
    S = (left * torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5], dtype=torch.float64)).float()
    B = basis(1, 80, k, 2)
    Q, sigma, *_ = PP.postprocess_side_cpu(S, B)
    ref = _fast_side(S, B)
    assert float((sigma - ref[1]).abs().max()) < 1e-13
    for cols in (slice(0, 1), slice(1, 4), slice(4, 6)):
        a, r = Q[0, :, cols].double(), ref[0][0, :, cols].double()
        assert float((a @ a.T - r @ r.T).abs().max()) < 1e-6


@pytest.mark.parametrize("case", ["zero column", "duplicate column", "ill conditioned", "nan",
                                  "inf", "float64 overflow", "all zero"])
def test_cases_for_the_reference_return_none(case):
    S, _ = sketch_of(2, 64, 8, seed=9)
    S64 = S.double()
    if case == "zero column":
        S[1, :, 3] = 0
    elif case == "duplicate column":
        S[0, :, 5] = S[0, :, 2]
    elif case == "ill conditioned":  # sigma_k / sigma_1 = 1e-4: lambda ratio 1e-8 < 1e-6
        S, _ = sketch_of(2, 64, 8, seed=9, decay=0.27)
    elif case == "nan":
        S[1, 7, 2] = float("nan")
    elif case == "inf":
        S[0, 0, 0] = float("inf")
    elif case == "all zero":
        S = torch.zeros_like(S)
    if case == "float64 overflow":  # finite entries whose squares overflow float64
        S64[0] *= 1e160
        assert PP.postprocess_side_cpu(S64, basis(2, 64, 8, 1)) is None
        return
    assert PP.postprocess_side_cpu(S, basis(2, 64, 8, 1)) is None


def test_supported_operands():
    S, _ = sketch_of(1, 100, 8, seed=1)
    B = basis(1, 100, 8, 2)
    assert PP.supported(S, B)
    assert not PP.supported(S.to(torch.bfloat16), B)  # sketch dtype
    assert not PP.supported(S.double(), B.double())  # float64 bases take Cholesky-QR rounds
    assert not PP.supported(S[0], B[0])  # needs (b, p, k)
    assert not PP.supported(S, B[:, :50])  # shapes differ
    wide = torch.randn(1, 200, PP.KMAX + 1)
    assert not PP.supported(wide, wide)


def test_results_do_not_depend_on_the_thread_count():
    S, _ = sketch_of(3, 3000, 16, seed=4)  # several 256-row chunks per matrix
    B = basis(3, 3000, 16, 5)
    P = torch.randn(3, 2500, 16, generator=gen(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = PP.postprocess_side_cpu(S, B, P=P)
        torch.set_num_threads(2)
        two = PP.postprocess_side_cpu(S, B, P=P)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_both_sides_op_matches_the_reference():
    Y, _ = sketch_of(2, 120, 10, seed=1)
    Z, _ = sketch_of(2, 90, 10, seed=2)
    U, V = basis(2, 120, 10, 3), basis(2, 90, 10, 4)
    got = backends.postprocess(Y, Z, U, V, seed=0, step=0, backend="cpu")
    ref = postprocess_torch(Y, Z, U, V, seed=0, step=0)
    for name in ("sigma", "sigma_y", "sigma_z", "overlap_u", "overlap_v"):
        assert float((getattr(got, name) - getattr(ref, name)).abs().max()) < 1e-9, name
    for name in ("U", "V"):
        assert float((getattr(got, name) - getattr(ref, name)).abs().max()) < 1e-6, name
    # a rank-deficient batch goes to the reference whole: same refill, same result
    Y[1, :, 4] = 0
    got = backends.postprocess(Y, Z, U, V, seed=0, step=0, backend="cpu")
    ref = postprocess_torch(Y, Z, U, V, seed=0, step=0)
    assert torch.equal(got.U, ref.U) and torch.equal(got.sigma, ref.sigma)


@pytest.mark.parametrize("schedule", ["sequential", "alternate", "both"])
def test_tracking_on_the_cpu_backend_runs_the_kernel(schedule, monkeypatch):
    """After the first steps, every post-processing of a well-conditioned matrix is the kernel's:
    the torch fast path and general path are not called, and the estimates match float64
    svdvals."""
    torch.manual_seed(0)
    sig = 0.8 ** torch.arange(48, dtype=torch.float32)
    W0 = torch.linalg.qr(torch.randn(96, 48)).Q * sig @ torch.linalg.qr(torch.randn(48, 48)).Q
    p = torch.nn.Parameter(W0.clone())
    opt = lowrank.SpectralSGD([("w", p)], rank=4, sketch_rank=8, lr=1e-3, backend="cpu",
                              schedule=schedule)
    calls = []
    import lowrank.postprocess as post
    monkeypatch.setattr(post, "_fast_side", lambda *a: calls.append("fast"))
    monkeypatch.setattr(post, "ritz_basis", lambda *a, **k: calls.append("general"))
    for step in range(30):
        p.grad = torch.randn(p.shape, generator=gen(step)) * 1e-3
        opt.step()
    assert calls == []
    exact = torch.linalg.svdvals(p.detach().double())[:4]
    got = opt.spectra()["w"].sigma
    assert float(((got - exact).abs() / exact[0]).max()) < 1e-6


def test_rank_deficient_matrix_on_the_cpu_backend_falls_back():
    """A rank-2 matrix tracked with k = 8: the kernel hands every step to the reference, whose
    refill keeps the bases orthonormal; the estimates are the exact values (zeros beyond 2)."""
    torch.manual_seed(1)
    W0 = torch.randn(40, 2) @ torch.randn(2, 30)
    p = torch.nn.Parameter(W0.clone())
    opt = lowrank.SpectralSGD([("w", p)], rank=4, sketch_rank=8, lr=0.0, backend="cpu")
    for _ in range(6):
        p.grad = torch.zeros_like(p)
        opt.step()
    exact = torch.linalg.svdvals(p.detach().double())[:4]
    got = opt.spectra()["w"].sigma
    assert float(((got - exact).abs() / exact[0]).max()) < 1e-6
    U = opt.tracked.trackers["w"].U[0].double()
    assert float((U.T @ U - torch.eye(8, dtype=torch.float64)).abs().max()) < 1e-5


# -- both sides of a sequential step in one call -------------------------------------------------

def sequential_operands(b, m, n, k, seed):
    """Y = W V and P = W^T Y for a batch of m x n matrices W with geometric spectra."""
    g = gen(seed)
    left = torch.linalg.qr(torch.randn(b, m, k + 4, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(b, n, k + 4, generator=g, dtype=torch.float64)).Q
    sig = 0.9 ** torch.arange(k + 4, dtype=torch.float64)
    W = (left * sig @ right.mT).float()
    U, V = basis(b, m, k, seed + 1), basis(b, n, k, seed + 2)
    Y = W @ V
    return W, Y, U, W.mT @ Y, V


@pytest.mark.parametrize("b,m,n,k", [(1, 300, 200, 8), (2, 1500, 1100, 16), (1, 90, 2100, 13),
                                     (3, 64, 64, 32)])
def test_sequential_step_equals_its_two_sides(b, m, n, k):
    """One call = the Y side (with P T), then the Z side on P T: the same kernel stages, so the
    same numbers bit for bit; and sigma is the larger of the two sides' estimates."""
    W, Y, U, P, V = sequential_operands(b, m, n, k, seed=m + n)
    got = PP.postprocess_sequential_cpu(Y, U, P, V, (W.double() ** 2).sum((-2, -1)))
    assert got is not None
    Uq, sigma_y, overlap_u, T, Z = PP.postprocess_side_cpu(Y, U, P=P)
    Vq, sigma_z, overlap_v, _, _ = PP.postprocess_side_cpu(Z, V)
    for name, want in (("U", Uq), ("V", Vq), ("sigma_y", sigma_y), ("sigma_z", sigma_z),
                       ("overlap_u", overlap_u), ("overlap_v", overlap_v),
                       ("sigma", torch.maximum(sigma_y, sigma_z))):
        assert torch.equal(getattr(got, name), want), name
    # float64 truth: sigma_z are the singular values of Z = P T_y...
    truth = torch.linalg.svdvals(P.double() @ T)
    assert float(((got.sigma_z - truth).abs() / truth[..., :1]).max()) < 1e-13
    # ...which is W^T U_next up to float32 roundings (of P = W^T Y and of U_next)
    truth = torch.linalg.svdvals(W.double().mT @ Uq.double())
    assert float(((got.sigma_z - truth).abs() / truth[..., :1]).max()) < 1e-5


@pytest.mark.parametrize("case", ["nonfinite fro2", "nan in P", "zero column of Y",
                                  "rank-deficient Z"])
def test_sequential_step_hands_back_what_needs_the_reference(case):
    W, Y, U, P, V = sequential_operands(2, 200, 150, 8, seed=7)
    fro2 = (W.double() ** 2).sum((-2, -1))
    if case == "nonfinite fro2":
        fro2[1] = float("inf")
    elif case == "nan in P":
        P[0, 3, 1] = float("nan")
    elif case == "zero column of Y":
        Y[1, :, 2] = 0
    else:  # P of rank 4 < k: Z = P T is rank-deficient while Y is fine
        P[1] = P[1, :, :4] @ torch.randn(4, 8, generator=gen(2))
    assert PP.postprocess_sequential_cpu(Y, U, P, V, fro2) is None


def test_sequential_step_does_not_depend_on_the_thread_count():
    W, Y, U, P, V = sequential_operands(2, 2500, 2100, 16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = PP.postprocess_sequential_cpu(Y, U, P, V)
        torch.set_num_threads(2)
        two = PP.postprocess_sequential_cpu(Y, U, P, V)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_sequential_many_shapes_in_one_call_equal_each_matrix_alone():
    """One call for groups of several shapes and widths (a padded k = 13 sketch read through its
    row stride, as the pass hands it over): every matrix gets the bits it gets alone; a matrix
    that needs the reference is flagged by itself, its group's others still done; the sigmas
    match float64 svdvals of P T_y's side and of Y."""
    specs = [(2, 300, 200, 8), (1, 90, 2100, 13), (3, 64, 64, 32), (1, 1500, 40, 16)]
    groups, operands = [], []
    for b, m, n, k in specs:
        W, Y, U, P, V = sequential_operands(b, m, n, k, seed=m + 3 * n)
        if k % 8:  # the pass's layout: (1, m, kp)[..., :k]
            kp = -(-k // 8) * 8
            Y = torch.nn.functional.pad(Y, (0, kp - k))[..., :k]
            P = torch.nn.functional.pad(P, (0, kp - k))[..., :k]
            assert not Y.is_contiguous()
        fro2 = (W.double() ** 2).sum((-2, -1))
        if b == 2:
            fro2[1] = float("nan")  # the second matrix of this group needs the reference
        operands.append((W, Y, U, P, V, fro2))
        groups.append(tuple([t[i:i + 1] for i in range(b)] for t in (Y, U, P, V, fro2)))
    done = PP.postprocess_sequential_cpu_many(groups)
    assert [ok for _, ok in done] == [[True, False], [True], [True] * 3, [True]]
    for (post, ok), (W, Y, U, P, V, fro2) in zip(done, operands):
        for i in range(len(ok)):
            if not ok[i]:
                continue
            alone = PP.postprocess_sequential_cpu(Y[i:i + 1].contiguous(), U[i:i + 1],
                                                  P[i:i + 1].contiguous(), V[i:i + 1],
                                                  fro2[i:i + 1])
            for name in post._fields:
                assert torch.equal(getattr(post, name)[i:i + 1], getattr(alone, name)), name
            truth = torch.linalg.svdvals(Y[i].double())
            assert float(((post.sigma_y[i] - truth).abs() / truth[0]).max()) < 1e-13
            truth = torch.linalg.svdvals(W[i].double().mT @ post.U[i].double())
            assert float(((post.sigma_z[i] - truth).abs() / truth[0]).max()) < 1e-5


@pytest.mark.parametrize("who", ["SpectralSGD", "SpectrumTracker"])
def test_sequential_tracking_post_processes_in_few_calls(who, monkeypatch):
    """Three matrices of two shapes on the cpu backend, after the update (SpectralSGD) or
    sketch-only (SpectrumTracker): the whole step of all three in one kernel step per step
    (sequential_step: pass, post-processing and commit), no other post-processing call; the
    estimates match float64 svdvals, and what a matrix gets does not depend on what else is
    tracked."""
    torch.manual_seed(2)
    sig = 0.8 ** torch.arange(40, dtype=torch.float32)

    def weight(m, n):
        return (torch.linalg.qr(torch.randn(m, 40)).Q * sig @ torch.linalg.qr(torch.randn(n, 40)).Q.T)

    shapes = {"a": (80, 60), "b": (80, 60), "c": (70, 50)}
    W0 = {name: weight(*shape) for name, shape in shapes.items()}
    calls = []  # (step, kind, batch)
    step_now = [0]
    real_seq, real_side = PP.postprocess_sequential_cpu_many, PP.postprocess_side_cpu
    monkeypatch.setattr(PP, "postprocess_sequential_cpu_many", lambda groups: calls.append(
        (step_now[0], "sequential", tuple(sorted(len(g[0]) for g in groups))))
        or real_seq(groups))
    monkeypatch.setattr(PP, "postprocess_side_cpu", lambda S, *a, **k: calls.append(
        (step_now[0], "side", S.shape[0])) or real_side(S, *a, **k))
    real_step = SQ.fused_sequential_step_cpu_list
    monkeypatch.setattr(SQ, "fused_sequential_step_cpu_list", lambda Ws, *a, **k: calls.append(
        (step_now[0], "step", tuple(W.shape for W in Ws))) or real_step(Ws, *a, **k))

    def run(names):
        params = [(n, torch.nn.Parameter(W0[n].clone())) for n in names]
        if who == "SpectralSGD":
            opt = lowrank.SpectralSGD(params, rank=4, sketch_rank=8, lr=1e-3, backend="cpu")
        else:
            opt = lowrank.SpectrumTracker(params, rank=4, sketch_rank=8, backend="cpu")
        for step in range(25):
            step_now[0] = step
            for name, p in params:  # each matrix's own weights, whatever else is tracked
                if who == "SpectralSGD":
                    p.grad = torch.randn(p.shape, generator=gen(100 * ord(name) + step)) * 1e-3
                else:
                    p.data += torch.randn(p.shape, generator=gen(100 * ord(name) + step)) * 1e-5
            opt.step()
        return opt, dict(params)

    opt, params = run(["a", "b", "c"])
    # (on the first step the random start bases need the reference's Cholesky-QR round)
    later = [c for c in calls if c[0] > 0]
    assert later == [(s, "step", ((80, 60), (80, 60), (70, 50))) for s in range(1, 25)]
    for name, p in params.items():
        exact = torch.linalg.svdvals(p.detach().double())[:4]
        got = opt.spectra()[name].sigma
        assert float(((got - exact).abs() / exact[0]).max()) < 1e-6, name
    alone, _ = run(["b"])
    assert torch.equal(alone.spectra()["b"].sigma, opt.spectra()["b"].sigma)

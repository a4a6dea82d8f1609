"""CuPy kernels on a GPU: torch references, the Triton kernel, host syncs, CUDA graph capture.

Skipped without CUDA or CuPy. The comparison helpers and the tolerance table are those of
tests/test_cupy_kernels.py (which runs the same kernels under a CPU emulation), so a case that
passes there and fails here points at what the emulation cannot see: concurrency between blocks,
NVRTC, DLPack, streams.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)
pytest.importorskip("cupy")

from lowrank.backends import kernel_module  # noqa: E402
from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch, sgd_update_torch  # noqa: E402
from lowrank.postprocess import postprocess_torch, refill_candidates  # noqa: E402
from test_cupy_kernels import (  # noqa: E402
    HYPERS, PP_CASES, UNIT, _assert_post_close, _many_groups, _orth, _postprocess_case,
    check_postprocess, check_sketch, gamma)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32_matmul")]
DEV = torch.device("cuda")
F64 = torch.float64
FS = kernel_module("cupy", "fused_sgd_sketch")
SK = kernel_module("cupy", "sketch")
PP = kernel_module("cupy", "postprocess")


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _step_without_sync(opt):
    """One optimizer step under torch's sync debug mode "error": a host sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 4097, 123, 16), (3, 257, 1031, 64), (1, 64, 4096, 128)],
                         ids=["4097x123_k16", "b3_257x1031_k64", "64x4096_k128"])
def test_sketch_matches_reference(dtype, shape):
    b, m, n, k = shape
    W = torch.randn(b, m, n, generator=_gen(1), device=DEV, dtype=F64).to(dtype)
    U = torch.randn(b, m, k, generator=_gen(2), device=DEV)
    V = torch.randn(b, n, k, generator=_gen(3), device=DEV)
    check_sketch(SK.sketch_cupy(W, U, V), W, U, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("hyper", list(HYPERS) + ["lr_cuda_tensor"])
def test_fused_step_matches_torch_sgd(dtype, hyper):
    cfg = dict(HYPERS.get(hyper, dict(momentum=0.9, nesterov=True)))
    if hyper == "lr_cuda_tensor":
        cfg["lr"] = torch.tensor(0.07, device=DEV)  # read by the kernel
    m, n, k = 300, 517, 32
    W0 = torch.randn(m, n, generator=_gen(7), device=DEV, dtype=F64)
    Gs = [torch.randn(m, n, generator=_gen(8 + s), device=DEV, dtype=F64) for s in range(3)]
    U = torch.randn(1, m, k, generator=_gen(11), device=DEV)
    V = torch.randn(1, n, k, generator=_gen(12), device=DEV)
    Wk, Wt, W64 = W0.to(dtype).clone(), W0.to(dtype).clone(), W0.clone()
    bk = bt = b64 = None
    for G in Gs:
        out, bk = FS.fused_sgd_sketch_cupy(Wk, G.to(dtype), bk, U, V, **cfg)
        _, bt = fused_sgd_sketch_torch(Wt, G.to(dtype), bt, U, V, **cfg)
        b64 = sgd_update_torch(W64, G, b64, **cfg)
        check_sketch(out, Wk.unsqueeze(0), U, V)
    for got, mine, exact in ((Wk, Wt, W64), (bk, bt, b64)):
        if exact is None:
            assert got is None and mine is None
            continue
        err = (got.double() - exact).abs().max()
        err_torch = (mine.double() - exact).abs().max()
        # One ulp per step for the fused multiply-add (see test_cupy_kernels).
        assert err <= 2 * err_torch + len(Gs) * 2 * UNIT[dtype] * exact.abs().max(), (err, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_step_agrees_with_triton(dtype):
    try:
        triton_fs = kernel_module("triton", "fused_sgd_sketch")
        fn = triton_fs.fused_sgd_sketch_triton
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"Triton fused kernel unavailable: {exc}")
    m, n, k = 1000, 777, 32
    W0 = torch.randn(m, n, generator=_gen(20), device=DEV).to(dtype)
    G = torch.randn(m, n, generator=_gen(21), device=DEV).to(dtype)
    U = torch.randn(1, m, k, generator=_gen(22), device=DEV)
    V = torch.randn(1, n, k, generator=_gen(23), device=DEV)
    hyper = dict(lr=0.05, weight_decay=1e-2, momentum=0.9, nesterov=True)
    Wc, Wt = W0.clone(), W0.clone()
    oc, bc = FS.fused_sgd_sketch_cupy(Wc, G, None, U, V, **hyper)
    ot, bt = fn(Wt, G, None, U, V, **hyper)
    # Same fp32 formula, rounded once to the dtype: at most one ulp apart (FMA contraction).
    ulp = 2 * UNIT[dtype] * W0.double().abs().max()
    assert (Wc.double() - Wt.double()).abs().max() <= ulp
    assert torch.equal(bc, bt)  # first step: buf = g, no rounding choice
    Wb = Wc.unsqueeze(0).double()
    by = 2 * gamma(n) * (Wb.abs() @ V.double().abs()) + 2 * gamma(n) * ulp * V.double().abs().sum(-2, keepdim=True)
    assert ((oc.Y.double() - ot.Y.double()).abs() <= 2 * by).all()
    torch.testing.assert_close(oc.fro2, ot.fro2, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", PP_CASES)
def test_postprocess_matches_reference(case):
    Y, Z, U, V = (t.to(DEV) for t in _postprocess_case(case))
    b, m, k = Y.shape
    n = Z.shape[1]
    ref = postprocess_torch(Y, Z, U, V, seed=3, step=5)
    refill = (refill_candidates((b, m, k), 3, 10, DEV), refill_candidates((b, n, k), 3, 11, DEV))
    out = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=5, refill=refill)
    check_postprocess(out, ref, U, V, same_refill=True)
    own = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=5)
    check_postprocess(own, ref, U, V, same_refill=False)


def test_postprocess_many_matches_one_call_per_group():
    """Groups of several shapes in one launch sequence, on the GPU: each group's own result."""
    groups = [tuple(t.to(DEV) for t in g[:4]) + (g[4],) for g in _many_groups()]
    gen = _gen(80)
    groups.append((torch.randn(3, 2048, 6, generator=gen, device=DEV),
                   torch.randn(3, 768, 6, generator=gen, device=DEV),
                   torch.linalg.qr(torch.randn(3, 2048, 6, generator=gen, device=DEV))[0].contiguous(),
                   torch.linalg.qr(torch.randn(3, 768, 6, generator=gen, device=DEV))[0].contiguous(), 9))
    outs = PP.postprocess_cupy_many(groups, step=4)
    for g, ((Y, Z, U, V, seed), out) in enumerate(zip(groups, outs)):
        _assert_post_close(out, PP.postprocess_cupy(Y, Z, U, V, seed=seed, step=4), f"group {g}")


@pytest.mark.parametrize("b,m,n,k", [(8, 512, 384, 64), (2, 1024, 1024, 128), (33, 129, 4097, 16)])
def test_postprocess_batched_sizes(b, m, n, k):
    """Larger k (several tiles, V of the Jacobi solver in global memory at k = 128) and b."""
    Y = torch.randn(b, m, k, generator=_gen(30), device=DEV)
    Z = torch.randn(b, n, k, generator=_gen(31), device=DEV)
    Y[0, :, k // 2:] = 0  # a rank-deficient member of the batch
    U = torch.stack([_orth(m, k, 40 + i) for i in range(b)]).float().to(DEV)
    V = torch.stack([_orth(n, k, 90 + i) for i in range(b)]).float().to(DEV)
    ref = postprocess_torch(Y, Z, U, V, seed=1, step=2)
    refill = (refill_candidates((b, m, k), 1, 4, DEV), refill_candidates((b, n, k), 1, 5, DEV))
    out = PP.postprocess_cupy(Y, Z, U, V, seed=1, step=2, refill=refill)
    check_postprocess(out, ref, U, V, same_refill=True)


def test_postprocess_and_fused_step_do_not_sync():
    """torch's sync debug mode sees no synchronisation in the CuPy path (after a warm-up)."""
    m, n, k = 256, 200, 16
    W = torch.randn(m, n, device=DEV)
    G = torch.randn(m, n, device=DEV)
    U = _orth(m, k, 1).float().to(DEV)[None]
    V = _orth(n, k, 2).float().to(DEV)[None]
    lr = torch.tensor(0.1, device=DEV)

    def step():
        sk, _ = FS.fused_sgd_sketch_cupy(W, G, None, U, V, lr=lr)
        return PP.postprocess_cupy(sk.Y, sk.Z, U, V, seed=0, step=1)

    step()  # compile and load outside the checked region
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(old)


def test_graph_captured_tracked_step_replays_like_eager():
    """Fused step + post-processing captured in a CUDA graph, replayed from the same state.

    W and buf are elementwise, hence bitwise reproducible. Y, Z are fp32 sums reduced with
    atomics in whatever order blocks finish, so they (and what follows) agree to rounding: the
    sketch within its rounding bound, the float64 post-processing to ~1e-5 relative (fp32
    rounding of the sketch, propagated through well-conditioned k x k algebra).
    """
    m, n, k = 1024, 768, 32
    W0 = torch.randn(m, n, generator=_gen(50), device=DEV)
    G = torch.randn(m, n, generator=_gen(51), device=DEV)
    buf0 = torch.randn(m, n, generator=_gen(52), device=DEV)
    U = _orth(m, k, 53).float().to(DEV)[None]
    V = _orth(n, k, 54).float().to(DEV)[None]
    lr = torch.tensor(0.01, device=DEV)
    W, buf = W0.clone(), buf0.clone()

    def tracked_step():
        sk, _ = FS.fused_sgd_sketch_cupy(W, G, buf, U, V, lr=lr, momentum=0.9, weight_decay=1e-4)
        return sk, PP.postprocess_cupy(sk.Y, sk.Z, U, V, seed=7, step=3)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, loads modules, sizes torch's pool
        for _ in range(2):
            tracked_step()
    torch.cuda.current_stream().wait_stream(side)

    W.copy_(W0)
    buf.copy_(buf0)
    eager_sk, eager_post = tracked_step()
    eager_W, eager_buf = W.clone(), buf.clone()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_sk, graph_post = tracked_step()
    W.copy_(W0)
    buf.copy_(buf0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(W, eager_W) and torch.equal(buf, eager_buf)
    bound = 2 * gamma(n) * (eager_W.abs().double() @ V[0].double().abs())
    assert ((graph_sk.Y[0].double() - eager_sk.Y[0].double()).abs() <= bound).all()
    torch.testing.assert_close(graph_sk.fro2, eager_sk.fro2, rtol=1e-12, atol=0)
    for name in ("sigma", "sigma_y", "sigma_z", "overlap_u", "overlap_v"):
        torch.testing.assert_close(getattr(graph_post, name), getattr(eager_post, name),
                                   rtol=1e-5, atol=1e-5 * float(eager_post.sigma.max()), msg=name)
    # Replaying again with a new lr value (read on the device) moves W further.
    lr.fill_(0.0)
    W_before = W.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(W, W_before)  # lr = 0 and the buffer term scaled by it: W unchanged
    assert torch.isfinite(graph_post.U).all()



def test_triton_backend_post_processes_with_the_cupy_kernel():
    """backend="triton" hands the post-processing to the CuPy kernel on a GPU where CuPy runs
    (the same function, so the same result to the bit), and its SpectralSGD step then makes no
    host synchronisation; widths the kernel cannot take go to the Triton backend's own
    post-processing (tests/test_triton_post_gpu.py)."""
    from lowrank import SpectralSGD, backends

    b, m, n, k = 2, 300, 200, 16
    Y = torch.randn(b, m, k, generator=_gen(60), device=DEV)
    Z = torch.randn(b, n, k, generator=_gen(61), device=DEV)
    U = _orth(m, k, 62).float().to(DEV)[None].expand(b, m, k).contiguous()
    V = _orth(n, k, 63).float().to(DEV)[None].expand(b, n, k).contiguous()
    via_triton = backends.postprocess(Y, Z, U, V, seed=3, step=5, backend="triton")
    direct = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=5)
    for name, x, y in zip(via_triton._fields, via_triton, direct):
        assert torch.equal(x, y), name
    assert not PP.supports(4096, DEV)  # far beyond shared memory (and the Triton solver's 128)

    w = torch.nn.Parameter(torch.randn(512, 384, generator=_gen(64), device=DEV))
    opt = SpectralSGD([w], lr=1e-2, rank=4, sketch_rank=8, backend="triton")
    for _ in range(2):  # compiles and loads the kernels
        w.grad = torch.randn_like(w)
        opt.step()
    w.grad = torch.randn_like(w)
    _step_without_sync(opt)
    torch.cuda.synchronize()
    assert torch.isfinite(opt.tracked.trackers["param0"].sigma).all()


def test_spectral_sgd_batches_same_shape_matrices_in_one_launch(monkeypatch):
    """SpectralSGD on CuPy updates and sketches the tracked matrices of one shape and param
    group in one launch (the kernel reads each matrix's addresses from a table). Against one
    launch per matrix: weights and momentum buffers bit for bit (elementwise), the spectra to
    the atomics' rounding; the batched step makes no host synchronisation, also when the
    gradients are new tensors (a new address table is uploaded without a sync)."""
    from lowrank import SpectralSGD

    launches = []
    real = FS.fused_sgd_sketch_cupy_many
    monkeypatch.setattr(FS, "fused_sgd_sketch_cupy_many",
                        lambda Ws, *a, **kw: launches.append(len(Ws)) or real(Ws, *a, **kw))

    def run(batched):
        torch.manual_seed(5)
        shapes = [(384, 256)] * 3 + [(256, 384), (64, 8, 3, 3)]
        params = [torch.nn.Parameter(torch.randn(s, device=DEV) / 16) for s in shapes]
        opt = SpectralSGD(params, lr=0.02, momentum=0.9, rank=4, sketch_rank=8, backend="cupy")
        if not batched:
            opt._batch_key = lambda *args: None
        gen = _gen(70)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device=DEV)
            if step == 3 and batched:
                _step_without_sync(opt)
            else:
                opt.step()
        torch.cuda.synchronize()
        return params, opt

    pb, ob = run(True)
    assert max(launches) == 3 and len(launches) == 4 * 3  # the three 384 x 256 in one launch
    po, oo = run(False)
    for a, b in zip(pb, po):
        assert torch.equal(a, b)
        assert torch.equal(ob.state[a]["momentum_buffer"], oo.state[b]["momentum_buffer"])
    for name, res in ob.spectra().items():
        other = oo.spectra()[name]
        torch.testing.assert_close(res.sigma, other.sigma, rtol=1e-4, atol=0, msg=name)
        assert not bool(res.nonfinite)


def _capture_params(seed):
    """Three same-shape matrices (one pack), a rank-1 matrix that never moves (its sketch needs
    refill directions every step, drawn on the device from the step count), another shape and
    a bias."""
    g = _gen(seed)
    u, v = torch.randn(96, 1, generator=g, device=DEV), torch.randn(1, 64, generator=g, device=DEV)
    params = {f"w{i}": torch.randn(256, 384, generator=g, device=DEV) for i in range(3)}
    params.update(low=u @ v, other=torch.randn(200, 150, generator=g, device=DEV),
                  bias=torch.randn(256, generator=g, device=DEV))
    return {n: torch.nn.Parameter(p) for n, p in params.items()}


@pytest.mark.parametrize("entry", ["SpectralSGD", "AdamW+SpectrumTracker"])
def test_tracked_step_captured_in_a_cuda_graph_replays_like_eager_steps(entry):
    """The whole tracked step (SpectralSGD, or AdamW with a SpectrumTracker) captured once with
    torch.cuda.graph after eager warm-up steps, then replayed with new gradients copied into
    static ones, against the same steps run eagerly: the weights (and momentum buffers) bit for
    bit (elementwise updates); the spectra to the rounding of the sketches' atomics, the
    rank-1 matrix's refilled bases included (a replay that re-used the captured step's refill
    directions would differ there at O(1)); the step counts read from the device."""
    from lowrank import SpectralSGD, SpectrumTracker

    warm, replays = 3, 5
    total = warm + replays
    gen = _gen(70)
    names = list(_capture_params(0))
    grads = [{n: torch.zeros_like(p) if n == "low" else torch.randn(p.shape, generator=gen, device=DEV)
              for n, p in _capture_params(0).items()} for _ in range(total)]

    def build():
        params = _capture_params(0)
        if entry == "SpectralSGD":
            opt = SpectralSGD(list(params.items()), lr=0.02, momentum=0.9, weight_decay=1e-4,
                              rank=4, sketch_rank=8, backend="cupy")
            return params, opt, opt, opt.step
        opt = torch.optim.AdamW(list(params.values()), lr=1e-3, capturable=True)
        tracker = SpectrumTracker(list(params.items()), rank=4, sketch_rank=8, backend="cupy")
        return params, opt, tracker, lambda: (opt.step(), tracker.step())

    params_e, _, owner_e, step_e = build()
    for s in range(total):
        for n in names:
            params_e[n].grad = grads[s][n].clone()
        step_e()

    params, opt, owner, step_fn = build()
    static = {n: torch.zeros_like(p) for n, p in params.items()}
    for n in names:
        params[n].grad = static[n]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: buffers, kernels compiled and loaded
        for s in range(warm):
            for n in names:
                static[n].copy_(grads[s][n])
            step_fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn()
    for s in range(warm, total):
        for n in names:
            static[n].copy_(grads[s][n])
        graph.replay()
    torch.cuda.synchronize()

    for n in names:
        assert torch.equal(params[n], params_e[n]), n
        if entry == "SpectralSGD":
            assert torch.equal(opt.state[params[n]]["momentum_buffer"],
                               owner_e.state[params_e[n]]["momentum_buffer"]), n
    spectra, spectra_e = owner.spectra(), owner_e.spectra()
    for n in spectra_e:
        assert spectra[n].step == spectra_e[n].step == total, n
        torch.testing.assert_close(spectra[n].sigma, spectra_e[n].sigma, rtol=1e-5,
                                   atol=1e-6 * float(spectra_e[n].sigma[0]), msg=n)
    # The rank-1 matrix's basis beyond its first column comes from the refill directions,
    # drawn from the step count: equal up to the rounding of the atomics unless a replay
    # re-used the captured step's count. (The other matrices' bases may rotate within close
    # singular values by more than rounding: their sigmas are compared above.)
    t, te = owner.tracked.trackers["low"], owner_e.tracked.trackers["low"]
    torch.testing.assert_close(t.U.double(), te.U.double(), rtol=0, atol=1e-4)
    assert (owner.steps if entry == "SpectralSGD" else owner.calls) == total


def test_capture_refuses_a_backend_that_synchronises():
    """backend="torch" post-processes with cuSOLVER (host syncs): refused with a clear error
    before the capture records anything."""
    from lowrank import SpectralSGD

    w = torch.nn.Parameter(torch.randn(128, 96, device=DEV))
    opt = SpectralSGD([w], lr=1e-2, momentum=0.9, rank=4, backend="torch")
    w.grad = torch.randn_like(w)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with pytest.raises(RuntimeError, match="post-processing synchronises"):
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            opt.step()

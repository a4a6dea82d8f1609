"""The Triton backend's own post-processing on a GPU (no CuPy): GPU-size agreement with the
torch reference, no host synchronisation, CUDA graph capture, and SpectralSGD steps with CuPy
switched off, eager (post-processing replayed by lowrank/post_graphs.py) and captured by the
user. Small-shape numerics and the refill's keys run on the CPU in
tests/test_triton_postprocess.py.

Marked ``gpu``; skipped without CUDA or Triton, and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32_matmul")]
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("GPU tests do not run under the Triton interpreter", allow_module_level=True)

from test_postprocess import _check_post

from lowrank import SpectralSGD, backends
from lowrank.backends import kernel_module
from lowrank.post_graphs import WARMUP
from lowrank.postprocess import postprocess_torch

PP = kernel_module("triton", "postprocess")
DEV = torch.device("cuda")
F64 = torch.float64


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _sketches(b, m, n, k, seed, rank=None):
    """Sketches of weights with a decaying spectrum (and exact rank ``rank`` when given, so
    that the refill runs), with orthonormal float32 bases."""
    g = _gen(seed)
    r = min(m, n) if rank is None else rank
    A = torch.randn(b, m, r, generator=g, device=DEV, dtype=F64)
    B = torch.randn(b, r, n, generator=g, device=DEV, dtype=F64)
    W = (A * torch.logspace(0, -3, r, device=DEV, dtype=F64)) @ B / n**0.5
    U = torch.linalg.qr(torch.randn(b, m, k, generator=g, device=DEV, dtype=F64))[0].float()
    V = torch.linalg.qr(torch.randn(b, n, k, generator=g, device=DEV, dtype=F64))[0].float()
    return (W @ V.double()).float(), (W.mT @ U.double()).float(), U, V


@pytest.mark.parametrize("b,m,n,k,rank", [(4, 1024, 768, 16, None), (2, 4096, 1024, 32, None),
                                          (1, 768, 3072, 64, None), (1, 300, 200, 128, None),
                                          (3, 512, 512, 32, 5)],
                         ids=["b4_1024x768_k16", "b2_4096x1024_k32", "768x3072_k64",
                              "300x200_k128", "b3_512_k32_rank5"])
def test_postprocess_triton_matches_the_reference(b, m, n, k, rank):
    """The reference's invariants at GPU sizes (sigma = float64 svdvals of the sketches,
    orthonormal bases spanning them, overlaps), and sigma equal to the reference's."""
    Y, Z, U, V = _sketches(b, m, n, k, seed=k + b, rank=rank)
    out = PP.postprocess_triton(Y, Z, U, V, seed=3, step=7)
    ref = postprocess_torch(Y, Z, U, V, seed=3, step=7)
    _check_post(Y.cpu(), Z.cpu(), U.cpu(), V.cpu(), type(out)(*(t.cpu() for t in out)))
    torch.testing.assert_close(out.sigma, ref.sigma, rtol=0, atol=1e-12 * float(ref.sigma.max()))


def test_gram_eigh_sweeps_on_gpu_grams():
    """Recorded: the Jacobi sweeps a GPU takes on random and warm (nearly diagonal) Grams."""
    Y, _, _, _ = _sketches(8, 2048, 2048, 32, seed=1)
    G = Y.double().mT @ Y.double()
    lam, E, sweeps = PP.gram_eigh_triton(G, return_sweeps=True)
    warm = E.mT @ G @ E  # the next step's Gram in the Ritz basis is nearly diagonal
    _, _, warm_sweeps = PP.gram_eigh_triton(warm, return_sweeps=True)
    print(f"sweeps: random {sweeps.tolist()}, warm {warm_sweeps.tolist()}")
    assert int(sweeps.max()) < PP.MAX_SWEEPS and int(warm_sweeps.max()) <= int(sweeps.min())
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(G).flip(-1), rtol=0,
                               atol=1e-13 * float(lam.max()))


def _without_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_postprocess_triton_makes_no_host_sync():
    """Under torch's sync debug mode "error" the Triton post-processing runs (after a first call
    that compiles the kernels) where the torch reference raises (its eigh reads cuSOLVER's
    flags): the check can fail."""
    Y, Z, U, V = _sketches(2, 512, 384, 16, seed=5, rank=3)
    step = torch.tensor([4], device=DEV)
    PP.postprocess_triton(Y, Z, U, V, seed=1, step=step)
    out = _without_sync(lambda: PP.postprocess_triton(Y, Z, U, V, seed=1, step=step))
    assert bool(torch.isfinite(out.U).all())
    with pytest.raises(RuntimeError):
        _without_sync(lambda: postprocess_torch(Y, Z, U, V, seed=1, step=4))


def test_postprocess_triton_captured_in_a_graph_replays_like_eager():
    """Warmed up with an int step (as an eager training step is), captured with a device step
    (as PostGraphs and a user's capture are: the capture must not meet a kernel variant it
    would have to load), replayed on new sketches and a new step: the eager call's results bit
    for bit (the refill columns of the rank-3 matrices included, which depend on the step)."""
    Y, Z, U, V = _sketches(2, 512, 384, 16, seed=6, rank=3)
    sY, sZ = Y.clone(), Z.clone()
    step = torch.tensor([1], device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        PP.postprocess_triton(sY, sZ, U, V, seed=2, step=1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = PP.postprocess_triton(sY, sZ, U, V, seed=2, step=step)
    Y2, Z2, _, _ = _sketches(2, 512, 384, 16, seed=7, rank=3)
    sY.copy_(Y2)
    sZ.copy_(Z2)
    step.fill_(9)
    graph.replay()
    eager = PP.postprocess_triton(Y2, Z2, U, V, seed=2, step=9)
    torch.cuda.synchronize()
    for name, a, e in zip(eager._fields, captured, eager):
        assert torch.equal(a, e), name


def _params(seed, device=DEV):
    """Three matrices with a separated top 4 (8, 6, 4, 3, then a tail below 0.5), a rank-1
    matrix that never moves (its refill runs every step) and a bias."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, (m, n) in {"w1": (256, 192), "w2": (256, 192), "w3": (128, 256)}.items():
        r = min(m, n)
        sigma = torch.cat([torch.tensor([8.0, 6.0, 4.0, 3.0]), 0.5 * torch.logspace(0, -2, r - 4)])
        Q1 = torch.linalg.qr(torch.randn(m, r, generator=g, device=device))[0]
        Q2 = torch.linalg.qr(torch.randn(n, r, generator=g, device=device))[0]
        params[name] = (Q1 * sigma.to(device)) @ Q2.T
    u, v = torch.randn(256, 1, generator=g, device=device), torch.randn(1, 192, generator=g, device=device)
    params.update(low=u @ v, bias=torch.randn(256, generator=g, device=device))
    return {n: torch.nn.Parameter(p) for n, p in params.items()}


@pytest.fixture
def no_cupy(monkeypatch):
    """A GPU machine without CuPy, as far as the backends can tell."""
    monkeypatch.setattr(backends, "cupy_runs", lambda device: False)


def _grads(params, steps, seed, device=DEV):
    """Random gradients that move a matrix by about 0.25% of its norm per step (lr 0.02)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [{n: torch.zeros_like(p) if n == "low"
             else 0.01 * torch.randn(p.shape, generator=g, device=device) for n, p in params.items()}
            for _ in range(steps)]


def test_spectral_sgd_triton_without_cupy_eager(no_cupy):
    """backend="triton" without CuPy: the post-processing is captured after its warm-up and
    replayed, a step then makes no host sync, and after 40 steps the top-4 estimates are within
    1e-6 of float64 svdvals of the weights, relative to sigma_1 (the CPU backends, same
    problem: 0.5-4e-8; float32 sketches round at ~1e-7)."""
    assert backends.capture_safe("triton", DEV, 8)
    params = _params(0)
    opt = SpectralSGD(list(params.items()), lr=0.02, momentum=0.9, weight_decay=1e-4, rank=4,
                      sketch_rank=8, backend="triton")
    grads = _grads(params, 40, seed=1)
    for s, step_grads in enumerate(grads):
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        if s == len(grads) - 1:
            _without_sync(opt.step)
        else:
            opt.step()
    assert opt.tracked.post_graphs.captures == 1
    assert opt.tracked.post_graphs.replays == 40 - WARMUP
    for name, result in opt.spectra().items():
        exact = torch.linalg.svdvals(params[name].detach().double())[:4]
        err = float((result.sigma[:4].double().cpu() - exact.cpu()).abs().max() / exact[0])
        assert err <= 1e-6, (name, err)


def test_spectral_sgd_triton_without_cupy_captured_by_the_user(no_cupy):
    """The whole step captured with torch.cuda.graph (allowed now: the Triton post-processing
    is capture-safe), replayed with new gradients: the weights bit for bit against eager steps,
    the spectra to the rounding of the sketches' atomics."""
    warm, replays = 3, 5
    total = warm + replays
    grads = _grads(_params(0), total, seed=2)
    names = list(grads[0])

    def build():
        params = _params(0)
        opt = SpectralSGD(list(params.items()), lr=0.02, momentum=0.9, rank=4, sketch_rank=8,
                          backend="triton")
        return params, opt

    params_e, opt_e = build()
    for s in range(total):
        for n in names:
            params_e[n].grad = grads[s][n].clone()
        opt_e.step()
    params, opt = build()
    static = {n: torch.zeros_like(p) for n, p in params.items()}
    for n in names:
        params[n].grad = static[n]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in range(warm):
            for n in names:
                static[n].copy_(grads[s][n])
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(warm, total):
        for n in names:
            static[n].copy_(grads[s][n])
        graph.replay()
    torch.cuda.synchronize()
    for n in names:
        assert torch.equal(params[n], params_e[n]), n
    spectra, spectra_e = opt.spectra(), opt_e.spectra()
    for n in spectra_e:
        assert spectra[n].step == spectra_e[n].step == total, n
        torch.testing.assert_close(spectra[n].sigma, spectra_e[n].sigma, rtol=1e-5,
                                   atol=1e-6 * float(spectra_e[n].sigma[0]), msg=n)

"""Eager GPU steps: the post-processing replayed from CUDA graphs (lowrank/post_graphs.py) and
the foreach update of untracked tensors. Skipped without CUDA (and CuPy, whose post-processing
kernel is the one that can be captured).

The replayed post-processing must give the eager call's bits: the same kernels run on the same
values. So each test runs the same steps twice, with the graphs on and off, and compares every
state tensor with torch.equal, through the cases where a replay could go wrong: a non-finite
sketch (the masked commit), a zero sketch (the refill directions, drawn from the step: a replay
that kept the captured step would differ), a second pattern of groups (bases that are not a
pack's own are inputs too), and a copy of the optimizer (its graphs must not write the
original's memory).
"""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)
pytest.importorskip("cupy")

from test_cupy_gpu import _step_without_sync
from test_fused_sgd_sketch import DTYPES, OPTIONS, SHAPE, check_list_update

from lowrank import SpectralSGD
from lowrank.post_graphs import WARMUP
from lowrank.sketch import sketch_torch
from lowrank.tracking import STATE_KEYS
from lowrank.trackset import TrackedSet

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32_matmul")]
DEV = torch.device("cuda")
SHAPES = {"a0": (96, 64), "a1": (96, 64), "a2": (96, 64), "b0": (200, 48), "b1": (200, 48)}


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts,lr_kind", [o for o in OPTIONS if o.values[1] == "float"])
def test_list_update_on_cuda_bitwise_equal_to_torch_sgd(opts, lr_kind, dtype):
    """The foreach update SpectralSGD gives untracked float32/float64 tensors on CUDA equals
    torch.optim.SGD(foreach=False) bit for bit (also on lengths that leave a vector tail)."""
    check_list_update(opts, lr_kind, dtype, DEV,
                      shapes=((5,), (3, 4), (2, 3, 3), SHAPE, (4099,), (256, 129)))


def _assert_same_state(a: TrackedSet, b: TrackedSet, where: str) -> None:
    for name, ta in a.trackers.items():
        tb = b.trackers[name]
        assert ta._step == tb._step, f"{name}: step {ta._step} vs {tb._step} ({where})"
        for key in STATE_KEYS:
            assert torch.equal(getattr(ta, key), getattr(tb, key)), f"{name}.{key} ({where})"


@pytest.mark.parametrize("backend", ["cupy", "triton"])
def test_replayed_post_processing_equals_the_eager_one(backend):
    """Two TrackedSets fed the same sketches each step, post-processed with the graphs on and
    off: equal state after every step. Steps 0-7 queue every pack's batched sketches (step 4:
    a NaN in a1's; step 5: b0's sketch zero, a refill); steps 8-11 queue four matrices one by
    one (a1 left out: the a group's bases are then a concatenation, an input of the graph)."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = _gen(5)
    W0 = {n: torch.randn(s, generator=g, device=DEV) / s[1] ** 0.5 for n, s in SHAPES.items()}
    drift = {n: torch.randn(s, generator=g, device=DEV) * 1e-2 for n, s in SHAPES.items()}
    sets = []
    for graphs in (True, False):
        ts = TrackedSet(list(W0.items()), rank=4, sketch_rank=8, seed=3, backend=backend,
                        rank_tol=1e-3, audit_every=0, track_grad=False)
        ts.post_graphs.enabled = graphs
        sets.append(ts)
    a, b = sets
    assert len(a._packs) == 2
    for step in range(12):
        W = {n: W0[n] + step * drift[n] for n in SHAPES}
        if step < 8:
            for names in a._packs:
                sk = sketch_torch(torch.stack([W[n] for n in names]), *a.bases(names))
                if step == 4 and "a1" in names:
                    sk.Y[names.index("a1"), 3, 2] = float("nan")
                if step == 5 and "b0" in names:
                    for t in (sk.Y, sk.Z, sk.fro2, sk.row_sq):
                        t[names.index("b0")] = 0
                for ts in sets:
                    ts.absorb_many(list(names), sk._replace(**{
                        f: getattr(sk, f).clone() for f in ("Y", "Z", "fro2", "row_sq")}),
                        ts.bases(names))
        else:
            for name in ("a0", "a2", "b0", "b1"):
                tr = a.trackers[name]
                sk = sketch_torch(W[name][None], tr.U, tr.V)
                for ts in sets:
                    ts.absorb(name, sk._replace(**{
                        f: getattr(sk, f).clone() for f in ("Y", "Z", "fro2", "row_sq")}))
        for ts in sets:
            ts.finish_step()
        _assert_same_state(a, b, f"step {step}")
        if step == 4:
            assert bool(a.trackers["a1"].nonfinite.all()) and not bool(a.trackers["a0"].nonfinite.any())
    assert (a.post_graphs.captures, a.post_graphs.replays) == (2, 12 - 2 * WARMUP)
    assert b.post_graphs.replays == 0
    assert torch.isfinite(a.trackers["b0"].U).all()


def _params(seed):
    g = _gen(seed)
    shapes = {"w1": (128, 96), "w2": (128, 96), "w3": (64, 128), "bias": (128,), "norm": (64,)}
    return {n: torch.nn.Parameter(torch.randn(s, generator=g, device=DEV) / s[-1] ** 0.5)
            for n, s in shapes.items()}


def _spectral_sgd(params, graphs):
    opt = SpectralSGD(list(params.items()), lr=0.02, momentum=0.9, weight_decay=1e-4, rank=4,
                      sketch_rank=8, backend="triton", deterministic=True)
    opt.tracked.post_graphs.enabled = graphs
    return opt


def _run(params, opt, grads):
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()


def _assert_same_run(pa, oa, pb, ob):
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
        assert torch.equal(oa.state[pa[n]]["momentum_buffer"], ob.state[pb[n]]["momentum_buffer"]), n
    _assert_same_state(oa.tracked, ob.tracked, "end")
    for n, r in oa.spectra().items():
        assert torch.equal(r.sigma, ob.spectra()[n].sigma), n


def test_spectral_sgd_with_replayed_post_processing_equals_eager_steps():
    """SpectralSGD (Triton's deterministic pass, so the sketches themselves are reproducible):
    8 steps with the graphs on and off give the same weights, momentum buffers, state and
    spectra bit for bit; a deep copy taken after 3 steps (no graphs: they address the
    original's state) continues like the original."""
    pytest.importorskip("triton")
    g = _gen(9)
    grads = [{n: torch.randn(p.shape, generator=g, device=DEV) for n, p in _params(0).items()}
             for _ in range(8)]
    pa, pb = _params(0), _params(0)
    oa, ob = _spectral_sgd(pa, True), _spectral_sgd(pb, False)
    _run(pa, oa, grads[:3])
    _run(pb, ob, grads[:3])
    pc, oc = copy.deepcopy((pa, oa))
    assert oc.tracked.post_graphs.captures == 0
    for params, opt in ((pa, oa), (pb, ob), (pc, oc)):
        _run(params, opt, grads[3:])
    _assert_same_run(pa, oa, pb, ob)
    _assert_same_run(pc, oc, pb, ob)
    assert (oa.tracked.post_graphs.captures, oa.tracked.post_graphs.replays) == (1, 8 - WARMUP)
    assert oc.tracked.post_graphs.replays == 5 - WARMUP


def test_replayed_step_makes_no_host_sync():
    """Once captured, a CuPy step with the replayed post-processing does not synchronise (the
    capture's own synchronisation happens once, and not under torch's sync debug mode)."""
    params = _params(1)
    opt = SpectralSGD(list(params.items()), lr=0.02, momentum=0.9, rank=4, sketch_rank=8,
                      backend="cupy")
    g = _gen(2)
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g, device=DEV)
        opt.step()
    replays = opt.tracked.post_graphs.replays
    _step_without_sync(opt)
    assert opt.tracked.post_graphs.replays == replays + 1


@pytest.mark.parametrize("backend", ["cupy", "triton"])
def test_gradient_tracking_with_a_log_on_the_gpu(backend, tmp_path):
    """track_grad on a GPU backend: the gradient's sketch is that backend's sketch-only pass and
    its post-processing the backend's batched one, sync-free like the weights' (the torch
    reference's cuSOLVER calls synchronised once per matrix); the log buffers its blocks without
    a sync too. The estimates of a nearly fixed gradient converge to its float64 singular
    values, and the logged rows of the last step are spectra()'s (to the last bits a GPU
    reduction may order otherwise in a batch of another size). A last step where one matrix has
    no gradient (sketch-only pass, NaN in its gradient columns) is sync-free too."""
    import pandas as pd

    if backend == "triton":
        pytest.importorskip("triton")

    from lowrank import RunLog, load_log

    g = torch.Generator().manual_seed(4)
    G0 = (torch.linalg.qr(torch.randn(96, 6, generator=g, dtype=torch.float64)).Q
          * torch.tensor([5.0, 3.0, 2.0, 1.2, 0.6, 0.3], dtype=torch.float64)
          @ torch.linalg.qr(torch.randn(64, 6, generator=g, dtype=torch.float64)).Q.T)
    params = {"a": torch.nn.Parameter(torch.randn(96, 64, device=DEV)),
              "b": torch.nn.Parameter(torch.randn(200, 48, device=DEV))}
    with RunLog(tmp_path, flush_every=1000) as log:
        opt = SpectralSGD(list(params.items()), lr=1e-3, momentum=0.9, rank=4, sketch_rank=8,
                          backend=backend, track_grad=True, log=log)
        noise = _gen(5)
        for step in range(26):
            params["a"].grad = (G0.float().to(DEV)
                                + 1e-5 * torch.randn(96, 64, generator=noise, device=DEV))
            params["b"].grad = (torch.randn(200, 48, generator=noise, device=DEV)
                                if step < 25 else None)
            if step >= 24:
                _step_without_sync(opt)
            else:
                opt.step()
        found = opt.spectra()
    exact = torch.linalg.svdvals(params["a"].grad.double())[:4]
    grad_sigma = found["a"].extra["grad_sigma"]
    assert float(((grad_sigma - exact).abs() / exact[0]).max()) < 1e-3
    torch.testing.assert_close(found["a"].extra["grad_fro_norm"],
                               params["a"].grad.double().norm(), rtol=1e-6, atol=0)
    last = load_log(tmp_path).query("step == 25").set_index("name")
    for name, res in found.items():
        row = last.loc[name]
        for key in ("fro_norm", "stable_rank", "effective_rank", "convergence"):
            assert row[key] == pytest.approx(float(getattr(res, key)), rel=1e-12, abs=0), key
    row = last.loc["a"]
    assert list(row["grad_sigma"]) == pytest.approx(found["a"].extra["grad_sigma"].tolist(),
                                                    rel=1e-12, abs=0)
    assert not pd.isna(row["grad_weight_cosine"])
    row = last.loc["b"]  # no gradient at the last step
    assert pd.isna(row["grad_weight_cosine"]) and pd.isna(row["grad_fro_norm"])
    assert all(pd.isna(x) for x in row["grad_sigma"])


def test_log_rows_from_blocks_on_two_devices():
    """A model spread over the CPU and a GPU makes blocks on both: the flush copies each key's
    tensors to the host before joining them (torch.cat across devices raises)."""
    from lowrank.runlog import _to_host

    blocks = [({"sigma": torch.tensor([[3.0, 1.0]], device=DEV), "x": torch.tensor([1.0])}, 1),
              ({"sigma": torch.tensor([[2.0, 0.5], [4.0, 2.0]]),
                "x": torch.tensor([2.0, 3.0], device=DEV)}, 2)]
    out = _to_host(blocks, ["sigma", "x"])
    assert out == {"sigma": [[3.0, 1.0], [2.0, 0.5], [4.0, 2.0]], "x": [1.0, 2.0, 3.0]}

"""The whole sequential step in the C kernel (kernels/cpu/sequential_step.py): update and power
sketch, both sides of the post-processing, and the commit of each tracker's state in place.

Its reference is the same work in three calls (the list pass, the sequential post-processing,
the commit), which these tests run beside it; the estimates are checked against float64
``torch.linalg.svdvals``."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank import backends
from lowrank.tracking import STATE_KEYS, MatrixTracker

pytestmark = pytest.mark.skipif(not backends.cpu_kernel_available(),
                                reason="no C compiler with OpenMP for the cpu kernel")

SQ = backends.kernel_module("cpu", "sequential_step")
FS = backends.kernel_module("cpu", "fused_sgd_sketch")
PP = backends.kernel_module("cpu", "postprocess")


def decaying(m, n, seed, head=40):
    """An m x n matrix with singular values 0.8^i (i < head): a gap the tracker converges on."""
    g = torch.Generator().manual_seed(seed)
    h = min(head, m, n)
    left = torch.linalg.qr(torch.randn(m, h, generator=g)).Q
    right = torch.linalg.qr(torch.randn(n, h, generator=g)).Q
    return (left * 0.8 ** torch.arange(h, dtype=torch.float32)) @ right.T


def converged_tracker(name, W, k):
    """A static tracker (as TrackedSet makes them for this kernel) whose bases are close to W's
    singular vectors, so that the kernel's fast path applies; its other state is random."""
    m, n = W.shape
    tr = MatrixTracker(name, (m, n), k)
    U, _, Vh = torch.linalg.svd(W.double())
    g = torch.Generator().manual_seed(len(name))
    tr.U = torch.linalg.qr(U[:, :k] + 1e-3 * torch.randn(m, k, generator=g,
                                                        dtype=torch.float64)).Q.float()[None]
    tr.V = torch.linalg.qr(Vh[:k].T + 1e-3 * torch.randn(n, k, generator=g,
                                                         dtype=torch.float64)).Q.float()[None]
    for key in STATE_KEYS:
        value = getattr(tr, key).clone(memory_format=torch.contiguous_format)
        if value.is_floating_point() and key not in ("U", "V"):
            value = torch.rand(value.shape, generator=g, dtype=value.dtype)
        setattr(tr, key, value)
    tr.static = True
    return tr


def reference_step(Ws, Gs, bufs, trackers, hyper):
    """The three calls the kernel step replaces: list pass (power), sequential post-processing,
    commit. Returns (buffers, expected state per tracker, ok per matrix, sketches)."""
    sketches, new_bufs = FS.fused_sgd_sketch_cpu_list(
        Ws, Gs, bufs, [t.U for t in trackers], [t.V for t in trackers],
        ["power"] * len(Ws), **hyper)
    done = PP.postprocess_sequential_cpu_many(
        [([s.Y], [t.U], [s.P], [t.V], [s.fro2]) for s, t in zip(sketches, trackers)])
    expected = []
    for t, s, (post, ok) in zip(trackers, sketches, done):
        state = {key: getattr(t, key).clone() for key in STATE_KEYS}
        if ok[0]:
            state.update(U=post.U, V=post.V, sigma=post.sigma, sigma_y=post.sigma_y,
                         sigma_z=post.sigma_z, overlap_u=post.overlap_u, fro2=s.fro2,
                         row_sq=s.row_sq, sigma_prev=t.sigma.clone(),
                         nonfinite=torch.zeros(1, dtype=torch.bool))
        expected.append(state)
    return new_bufs, expected, [ok[0] for _, ok in done], sketches


SHAPES = [(64, 96), (96, 40), (33, 70), (300, 50)]  # wide, tall, odd, several row chunks


@pytest.mark.parametrize("k", [8, 12, 16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("update", [True, False], ids=["update", "sketch-only"])
def test_kernel_step_equals_the_pass_the_post_processing_and_the_commit(k, momentum, update):
    """Four shapes in one call, k a multiple of 8 or not, with and without momentum (its first
    step makes the buffers), or sketch only: the weights, buffers and every state field are
    those of the three calls (fro2 to rounding: summed in another order), the old sigma moved
    to sigma_prev; the estimates match float64 svdvals."""
    hyper = {"lr": 0.01, "weight_decay": 1e-3, "momentum": momentum, "dampening": 0.0,
             "nesterov": False, "maximize": False}
    Ws = [decaying(m, n, seed=i) for i, (m, n) in enumerate(SHAPES)]
    Gs = [1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(10 + i))
          for i, W in enumerate(Ws)] if update else None
    ref_trackers = [converged_tracker(f"m{i}", W, k) for i, W in enumerate(Ws)]
    trackers = [copy.deepcopy(t) for t in ref_trackers]
    ref_Ws = [W.clone() for W in Ws]
    bufs, ref_bufs = [None] * len(Ws), [None] * len(Ws)
    for _ in range(2):  # momentum: the first step makes the buffers, the second uses them
        ref_bufs, expected, ok, _ = reference_step(ref_Ws, Gs, ref_bufs, ref_trackers, hyper)
        assert all(ok)
        for t, state in zip(ref_trackers, expected):
            for key, value in state.items():
                getattr(t, key).copy_(value)
        old_sigma = [t.sigma.clone() for t in trackers]
        bufs, rest = SQ.fused_sequential_step_cpu_list(Ws, Gs, bufs, trackers, **hyper)
        assert rest == {}
        for W, ref_W, buf, ref_buf in zip(Ws, ref_Ws, bufs, ref_bufs):
            assert torch.equal(W, ref_W)
            assert (buf is None) == (ref_buf is None) and (buf is None or torch.equal(buf, ref_buf))
        for t, state, sigma in zip(trackers, expected, old_sigma):
            for key in STATE_KEYS:
                if key == "fro2":
                    torch.testing.assert_close(t.fro2, state["fro2"], rtol=1e-14, atol=0)
                else:
                    assert torch.equal(getattr(t, key), state[key]), key
            assert torch.equal(t.sigma_prev, sigma)
    for W, t in zip(Ws, trackers):
        exact = torch.linalg.svdvals(W.double())
        assert float(((t.sigma[0, :k // 2] - exact[:k // 2]).abs() / exact[0]).max()) < 1e-6
        torch.testing.assert_close(t.fro2[0], exact.square().sum(), rtol=1e-6, atol=0)
        torch.testing.assert_close(t.row_sq[0], W.double().square().sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["nan_gradient", "zero_matrix"])
def test_what_the_kernel_cannot_commit_keeps_its_state_and_gets_its_sketch(case):
    """A matrix whose sketch is not finite (a NaN gradient) or that needs the reference's
    refill (a zero matrix) between two normal ones: its state stays bit for bit and its power
    sketch comes back for the reference path (equal to the list pass's); the others commit."""
    hyper = {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0,
             "nesterov": False, "maximize": False}
    Ws = [decaying(64, 48, seed=i) for i in range(3)]
    Gs = [1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(i))
          for i, W in enumerate(Ws)]
    trackers = [converged_tracker(f"m{i}", W, 8) for i, W in enumerate(Ws)]
    if case == "nan_gradient":
        Gs[1][5, 7] = float("nan")
    else:
        Ws[1].zero_()
        Gs[1].zero_()
    before = [{key: getattr(t, key).clone() for key in STATE_KEYS} for t in trackers]
    ref_Ws = [W.clone() for W in Ws]
    ref_trackers = [converged_tracker(f"m{i}", W, 8) for i, W in enumerate(Ws)]
    _, _, ok, sketches = reference_step(ref_Ws, Gs, [None] * 3, ref_trackers, hyper)
    assert ok == [True, False, True]
    _, rest = SQ.fused_sequential_step_cpu_list(Ws, Gs, [None] * 3, trackers, **hyper)
    assert list(rest) == [1]
    for key in STATE_KEYS:
        assert torch.equal(getattr(trackers[1], key), before[1][key]), key
    assert not torch.equal(trackers[0].U, before[0]["U"])
    sk, ref = rest[1], sketches[1]
    for field in ("Y", "P", "row_sq"):
        torch.testing.assert_close(getattr(sk, field), getattr(ref, field), rtol=0, atol=0,
                                   equal_nan=True)
    torch.testing.assert_close(sk.fro2, ref.fro2, rtol=1e-14, atol=0, equal_nan=True)


def test_spectral_sgd_results_and_state_dicts_are_copies_of_the_state():
    """The kernel overwrites the trackers' state every step: a result or a state dict taken at
    one step must not change with the steps after it, and loading one continues the run bit
    for bit."""
    torch.manual_seed(0)
    W0 = decaying(48, 64, seed=3)

    def make():
        p = torch.nn.Parameter(W0.clone())
        return p, lowrank.SpectralSGD([("w", p)], lr=0.01, momentum=0.9, rank=4, sketch_rank=8,
                                      backend="cpu")

    def grad(step):
        return 1e-3 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(step))

    p, opt = make()
    assert opt.tracked.in_place("w", p)
    for step in range(5):
        p.grad = grad(step)
        opt.step()
    result = opt.spectra()["w"]
    kept = {key: value.clone() for key, value in result.__dict__.items()
            if isinstance(value, torch.Tensor)}
    state, weights = opt.state_dict(), p.detach().clone()
    saved = copy.deepcopy(state)
    for step in range(5, 8):
        p.grad = grad(step)
        opt.step()
    for key, value in kept.items():
        assert torch.equal(getattr(result, key), value), key
    for key, value in saved["lowrank"]["trackers"]["w"].items():
        now = state["lowrank"]["trackers"]["w"][key]
        assert value == now if key == "step" else torch.equal(value, now), key
    q, again = make()  # steps 5-7 again, from the state dict and the weights of step 5
    q.data.copy_(weights)
    again.load_state_dict(saved)
    for step in range(5, 8):
        q.grad = grad(step)
        again.step()
    assert torch.equal(q.detach(), p.detach())
    for key in STATE_KEYS:
        assert torch.equal(getattr(again.tracked.trackers["w"], key),
                           getattr(opt.tracked.trackers["w"], key)), key


def test_wider_sketches_stay_on_the_list_pass():
    """k above the kernel's KMAX: the tracker is not made static and its steps take the list
    pass and the reference post-processing, still matching float64 svdvals."""
    p = torch.nn.Parameter(decaying(96, 80, seed=4))
    opt = lowrank.SpectralSGD([("w", p)], lr=0.01, rank=20, sketch_rank=40, backend="cpu")
    assert not opt.tracked.trackers["w"].static and not opt.tracked.in_place("w", p)
    for step in range(10):
        p.grad = 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    exact = torch.linalg.svdvals(p.detach().double())[:4]
    est = opt.spectra()["w"].sigma[:4]
    assert float(((est - exact).abs() / exact[0]).max()) < 1e-6

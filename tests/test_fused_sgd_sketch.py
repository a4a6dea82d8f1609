"""Op ``fused_sgd_sketch`` (torch reference): the update is torch.optim.SGD bit for bit, and the
sketch is ``sketch_torch`` of the updated weights.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.fused_sgd_sketch import (
    foreach_applies,
    fused_sgd_sketch_torch,
    sgd_update_torch,
    sgd_update_torch_many,
)
from lowrank.sketch import as_batched, init_bases, sketch_torch

# --- tolerance table ---------------------------------------------------------------------------
# None: the reference runs the same torch operations in the same order as
# torch.optim.sgd._single_tensor_sgd (foreach=False), so weights, momentum buffers and sketches
# are compared with torch.equal (bitwise) over every step.
STEPS = 20
SHAPE = (13, 7)
K = 4


def _option_grid():
    params = []
    for momentum, dampening, nesterov, maximize, wd, lr_kind in itertools.product(
            (0.0, 0.9), (0.0, 0.3), (False, True), (False, True), (0.0, 0.05), ("float", "tensor")):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch.optim.SGD rejects nesterov without momentum or with dampening
        opts = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                    maximize=maximize, weight_decay=wd)
        name = (f"mom{momentum}-damp{dampening}-{'nest' if nesterov else 'plain'}-"
                f"{'max' if maximize else 'min'}-wd{wd}-lr{lr_kind}")
        params.append(pytest.param(opts, lr_kind, id=name))
    return params


OPTIONS = _option_grid()
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def _grads(dtype, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(STEPS)]


def _lr(kind):
    return 0.05 if kind == "float" else torch.tensor(0.05)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts,lr_kind", OPTIONS)
def test_trajectory_bitwise_equal_to_torch_sgd(opts, lr_kind, dtype):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    grads = _grads(dtype)
    ref = W0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=_lr(lr_kind), foreach=False, **opts)
    W_fused, W_plain = W0.clone(), W0.clone()
    buf_fused = buf_plain = None
    U, V = init_bases(*SHAPE, K, seed=2, dtype=dtype)  # the basis dtype follows fp32/fp64 weights
    for step, G in enumerate(grads):
        ref.grad = G.clone()
        opt.step()
        sk, buf_fused = fused_sgd_sketch_torch(W_fused, G, buf_fused, U, V, lr=_lr(lr_kind), **opts)
        buf_plain = sgd_update_torch(W_plain, G, buf_plain, lr=_lr(lr_kind), **opts)
        assert torch.equal(W_fused, ref.detach()), f"weights differ at step {step}"
        assert torch.equal(W_plain, ref.detach()), f"weights differ at step {step} (update only)"
        ref_buf = opt.state[ref].get("momentum_buffer")
        if opts["momentum"] == 0:
            assert buf_fused is None and buf_plain is None and ref_buf is None
        else:
            assert torch.equal(buf_fused, ref_buf) and torch.equal(buf_plain, ref_buf)
        expect = sketch_torch(ref.detach(), U, V)
        for name in ("Y", "Z", "fro2", "row_sq"):
            assert torch.equal(getattr(sk, name), getattr(expect, name)), f"{name} at step {step}"
    # The gradients were passed without copies: the update must never write them.
    assert all(torch.equal(a, b) for a, b in zip(grads, _grads(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts,lr_kind", [o for o in OPTIONS if o.values[1] == "float"])
def test_list_update_bitwise_equal_to_torch_sgd(opts, lr_kind, dtype):
    """sgd_update_torch_many (the foreach ops SpectralSGD uses for untracked parameters)
    against torch.optim.SGD(foreach=False), on the CPU (on CUDA: tests/test_eager_gpu.py)."""
    check_list_update(opts, lr_kind, dtype, torch.device("cpu"))


def check_list_update(opts, lr_kind, dtype, device, shapes=((5,), (3, 4), (2, 3, 3), SHAPE)):
    """sgd_update_torch_many against torch.optim.SGD(foreach=False), tensor by tensor, over
    STEPS steps on ``device``: several shapes, and a tensor whose gradient is missing for the
    first steps (its buffer starts later, so a step mixes new and existing buffers, as a model
    with frozen layers does)."""
    g = torch.Generator().manual_seed(7)
    W0 = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    grads = [[t.to(device) for t in _grads(dtype, seed=10 + i, shape=s)]
             for i, s in enumerate(shapes)]
    refs = [w.clone().requires_grad_(True) for w in W0]
    opt = torch.optim.SGD(refs, lr=_lr(lr_kind), foreach=False, **opts)
    Ws, bufs = [w.clone() for w in W0], [None] * len(shapes)
    for step in range(STEPS):
        live = [i for i in range(len(shapes)) if i != 2 or step >= 3]
        for i, ref in enumerate(refs):
            ref.grad = grads[i][step].clone() if i in live else None
        opt.step()
        assert all(foreach_applies(Ws[i], grads[i][step], bufs[i], _lr(lr_kind)) for i in live)
        out = sgd_update_torch_many([Ws[i] for i in live], [grads[i][step] for i in live],
                                    [bufs[i] for i in live], lr=_lr(lr_kind), **opts)
        for i, b in zip(live, out):
            bufs[i] = b
        for i, ref in enumerate(refs):
            assert torch.equal(Ws[i], ref.detach()), f"tensor {i} differs at step {step}"
            ref_buf = opt.state[ref].get("momentum_buffer")
            if opts["momentum"] == 0 or ref_buf is None:
                assert ref_buf is None and (bufs[i] is None or opts["momentum"] == 0)
            else:
                assert torch.equal(bufs[i], ref_buf), f"buffer {i} differs at step {step}"
    assert all(torch.equal(a.cpu(), b) for i, s in enumerate(shapes)
               for a, b in zip(grads[i], _grads(dtype, seed=10 + i, shape=s)))


def test_list_update_applies_only_where_it_matches_the_single_tensor_ops():
    W, G = torch.zeros(3), torch.ones(3)
    assert foreach_applies(W, G, None, 0.1) and foreach_applies(W, G, torch.zeros(3), 0.1)
    assert not foreach_applies(W, G, None, torch.tensor(0.1))  # tensor lr: the single path
    assert not foreach_applies(W, G.double(), None, 0.1)  # mixed dtypes promote differently
    assert not foreach_applies(W, G.to_sparse(), None, 0.1)
    # 16-bit: torch's _foreach_mul_ rounds a buffer times the momentum otherwise than mul_
    assert not foreach_applies(W.bfloat16(), G.bfloat16(), None, 0.1)
    assert not foreach_applies(W.half(), G.half(), None, 0.1)
    assert sgd_update_torch_many([], [], [], lr=0.1) == []


def test_gradient_and_buffer_ownership():
    """The update never writes G; the first momentum buffer is a fresh tensor, not G itself."""
    W = torch.ones(3, 4)
    G = torch.full((3, 4), 2.0)
    buf = sgd_update_torch(W, G, None, lr=0.1, momentum=0.9)
    assert buf is not None and buf.data_ptr() != G.data_ptr()
    assert torch.equal(G, torch.full((3, 4), 2.0))
    buf.add_(1.0)
    assert torch.equal(G, torch.full((3, 4), 2.0))


@pytest.mark.parametrize("shape", [pytest.param((6, 3, 3, 3), id="conv2d"),
                                   pytest.param((5, 4, 3), id="conv1d")])
def test_fused_on_conv_weight_sketches_the_matrix_view(shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    G = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    m, n = as_batched(W).shape[1:]
    U, V = init_bases(m, n, 3, seed=5)
    ref = W.clone()
    ref.add_(G, alpha=-0.1)
    sk, _ = fused_sgd_sketch_torch(W, G, None, U, V, lr=0.1)
    assert torch.equal(W, ref)
    expect = sketch_torch(ref.reshape(1, m, n), U, V)
    for name in ("Y", "Z", "fro2", "row_sq"):
        assert torch.equal(getattr(sk, name), getattr(expect, name)), name

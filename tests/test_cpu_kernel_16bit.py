"""bfloat16 and float16 weights on the CPU kernel (backend "cpu"): torch's own SGD update (bit for
bit torch.optim.SGD), then the kernel's sketch of the 16-bit weights, each block widened to
float32 exactly; sketches against float64 truth. (Whole SpectralSGD runs on 16-bit weights:
test_cpu_kernel.py's one-call-per-param-group test, parametrized by dtype.)"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lowrank import backends
from lowrank.sketch import init_bases, sketch_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

if not backends.cpu_kernel_available():
    pytest.skip("the CPU kernel does not build here", allow_module_level=True)

SK = backends.kernel_module("cpu", "sketch")
FS = backends.kernel_module("cpu", "fused_sgd_sketch")
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def rand(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def every_finite(dtype) -> torch.Tensor:
    """All finite values of a 16-bit dtype (each bit pattern once; -0 included)."""
    values = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_widening_is_exact_for_every_finite_value(dtype):
    """Y = W V with V the identity columns is W itself, exactly, where W is widened right: every
    finite value (subnormals, the extremes, -0) through the vectorised path (blocks of 8 x 8
    values) and through the scalar tail (1 x 7 matrices, shorter than a vector)."""
    values = every_finite(dtype)
    cut = values.numel() // 56 * 56
    blocks = values[:cut].reshape(-1, 8)
    eye8 = torch.eye(8).unsqueeze(0)
    out = SK.sketch_cpu(blocks, init_bases(blocks.shape[0], 8, 8)[0], eye8, sides="y")
    assert torch.equal(out.Y[0], blocks.float())
    assert torch.equal(out.row_sq[0], blocks.double().square().sum(-1))
    rows = torch.cat([values[cut:], values[:56]])[:(values.numel() - cut) // 7 * 7 + 56]
    tails = rows[:rows.numel() // 7 * 7].reshape(-1, 1, 7)
    U = torch.ones(tails.shape[0], 1, 7)
    out = SK.sketch_cpu(tails, U, torch.eye(7).expand(tails.shape[0], 7, 7), sides="y")
    assert torch.equal(out.Y, tails.float())


CASES = [(37, 53, 5), (300, 129, 24), (1030, 1100, 13)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("sides", ["both", "y", "z", "power"])
def test_sketch_of_16_bit_weights_matches_float64_truth(dtype, m, n, k, sides):
    W = rand(m, n, seed=m + n, dtype=dtype)
    U, V = init_bases(m, n, k, seed=k)
    out = SK.sketch_cpu(W, U, V, sides=sides)
    ref = sketch_torch(W, U, V, sides=sides)
    W64, U64, V64 = W.double(), U[0].double(), V[0].double()  # W's 16-bit values, exactly
    truth = {"Y": W64 @ V64, "Z": W64.T @ U64, "P": W64.T @ (W64 @ V64)}
    for name, want in truth.items():
        got = getattr(out, name)
        assert (got is None) == (getattr(ref, name) is None), name
        if got is not None:
            assert got.dtype == torch.float32
            assert rel(got[0], want) < 2e-6, name  # float32 sums, as for float32 weights
    sq = W64.square().sum(-1)
    assert float(((out.row_sq[0] - sq).abs() / sq).max()) < 1e-6
    assert float(out.fro2) == pytest.approx(float(sq.sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_call_updates_as_torch_sgd_then_sketches_the_update(dtype):
    """fused_sgd_sketch_cpu on 16-bit weights: W and the buffer are torch.optim.SGD's bit for
    bit (new buffer on the first step, then kept), the sketch is of the updated W."""
    m, n, k = 1030, 1100, 16
    W0 = rand(m, n, seed=1, dtype=dtype)
    U, V = init_bases(m, n, k, seed=2)
    hyper = {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}
    p = torch.nn.Parameter(W0.clone())
    opt = torch.optim.SGD([p], lr=0.05, foreach=False, **hyper)
    W, buf = W0.clone(), None
    for step in range(3):
        G = rand(m, n, seed=10 + step, dtype=dtype) * 0.01
        p.grad = G
        opt.step()
        out, buf = FS.fused_sgd_sketch_cpu(W, G, buf, U, V, lr=0.05, sides="power", **hyper)
        assert torch.equal(W, p.detach()), f"step {step}"
        assert buf.dtype == dtype and torch.equal(buf, opt.state[p]["momentum_buffer"])
    W64 = W.double()
    assert rel(out.Y[0], W64 @ V[0].double()) < 2e-6
    assert rel(out.P[0], W64.T @ (W64 @ V[0].double())) < 2e-6


def test_16_bit_inputs_are_checked():
    W = torch.ones(8, 6, dtype=torch.bfloat16)
    U, V = init_bases(8, 6, 2)
    with pytest.raises(TypeError, match=r"U must be torch.float32 \(float32 bases\)"):
        SK.sketch_cpu(W, U.bfloat16(), V)
    with pytest.raises(TypeError, match=r"G must be torch.bfloat16 \(the dtype of W\)"):
        FS.fused_sgd_sketch_cpu(W, torch.ones(8, 6), None, U, V, lr=0.1)
    with pytest.raises(TypeError, match="G must be torch.float16"):
        FS.fused_sgd_sketch_cpu_list([W.half()], [torch.ones(8, 6, dtype=torch.bfloat16)],
                                     [None], [U], [V], ["y"], lr=0.1)


def test_kernel_refuses_to_update_16_bit_weights():
    """The kernel sketches 16-bit weights only (torch updates them); asked for an update it
    returns an error code and writes nothing."""
    lib = backends.kernel_module("cpu", "_loader").library()
    W = torch.ones(8, 16, dtype=torch.bfloat16)
    G = torch.ones(8, 16, dtype=torch.bfloat16)
    U, V, Y = torch.zeros(8, 8), torch.zeros(16, 8), torch.full((8, 8), 7.0)
    row_sq = torch.zeros(8, dtype=torch.float64)
    hyper = backends.kernel_module("cpu", "_loader").SgdHyper(0.1, 0.0, 0.0, 1.0, 0, 0, 0)
    rc = lib.lowrank_sgd_sketch_f32(8, 16, 8, W.data_ptr(), G.data_ptr(), None,
                                    ctypes.byref(hyper), U.data_ptr(), V.data_ptr(),
                                    Y.data_ptr(), None, row_sq.data_ptr(), 1, None, 1, 1, 1)
    assert rc == -2
    assert torch.equal(W, torch.ones(8, 16, dtype=torch.bfloat16))
    assert torch.equal(Y, torch.full((8, 8), 7.0))

"""Triton kernels ``sketch`` and ``fused_sgd_sketch`` against their torch references.

Runs on CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, as in CI). Shapes
are small on purpose: the interpreter runs every program in numpy. Bounds are rigorous rounding
bounds (Higham's gamma_n for dot products, a few units in the last place per SGD operation), so a
missing tile, a wrong mask or a wrong update term fails by orders of magnitude.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from lowrank.backends import kernel_module
from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch, sgd_update_torch
from lowrank.sketch import as_batched, sketch_torch

SK = kernel_module("triton", "sketch")
FS = kernel_module("triton", "fused_sgd_sketch")
DEVICE = "cpu" if INTERPRET else "cuda"

# ---------------------------------------------------------------------------------------------
# Tolerance table
# ---------------------------------------------------------------------------------------------
U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53
# Extra relative error per product from the tl.dot input precision, on top of fp32 accumulation:
# TF32 keeps 10 mantissa bits (truncated or rounded: <= 2^-10 per operand, two operands);
# 3xTF32 splits each operand into two TF32 parts and drops lo*lo (about 3 * 2^-20, with margin).
PRODUCT_ERR = {"fp32": 0.0, "tf32x3": 4 * 2.0**-20, "tf32": 2 * 2.0**-10}


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: |fl(x.y) - x.y| <= gamma_n |x|.|y| for any summation order."""
    return n * u / (1 - n * u)


def batch_of(W):
    """The op's reading of W: (m, n) is a batch of one, (b, m, n) a batch."""
    return W.unsqueeze(0) if W.dim() == 2 else W


def sketch_bounds(W, U, V, mode="fp32"):
    """Elementwise bounds on |Y_kernel - Y_ref| and |Z_kernel - Z_ref| (kernel error + ref error)."""
    Wb = batch_of(W).double().abs()
    U3 = (U if U.dim() == 3 else U.unsqueeze(0)).double().abs()
    V3 = (V if V.dim() == 3 else V.unsqueeze(0)).double().abs()
    m, n = Wb.shape[-2:]
    # 3xTF32 sums three products per term, hence gamma of 3n for the kernel's accumulation;
    # tensor cores may truncate instead of rounding when they accumulate, so TF32 modes get
    # twice the unit roundoff.
    terms = 3 if mode == "tf32x3" else 1
    acc_u = U32 if mode == "fp32" else 2 * U32
    ty = PRODUCT_ERR[mode] + gamma(terms * n, acc_u) + gamma(n)
    tz = PRODUCT_ERR[mode] + gamma(terms * m, acc_u) + gamma(m)
    return ty * (Wb @ V3), tz * (Wb.mT @ U3)


def assert_within(actual, expected, bound, what):
    diff = (actual.double() - expected.double()).abs()
    bound = torch.broadcast_to(bound, diff.shape)
    bad = diff > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {diff.numel()} entries out of bound, "
                           f"max |diff| {diff.max().item():.3e}, max diff/bound "
                           f"{(diff / bound.clamp_min(1e-300)).max().item():.3e}")


def assert_sketch_matches(out, W, U, V, mode="fp32"):
    """out (a SketchOut from a kernel) against sketch_torch(W, U, V), with the rounding bounds."""
    ref = sketch_torch(W, U, V)
    b, m, n = batch_of(W).shape
    k = U.shape[-1]
    assert out.Y.shape == (b, m, k) and out.Y.dtype == torch.float32
    assert out.Z.shape == (b, n, k) and out.Z.dtype == torch.float32
    assert out.fro2.shape == (b,) and out.fro2.dtype == torch.float64
    assert out.row_sq.shape == (b, m) and out.row_sq.dtype == torch.float64
    by, bz = sketch_bounds(W, U, V, mode)
    assert_within(out.Y, ref.Y, by, "Y")
    assert_within(out.Z, ref.Z, bz, "Z")
    # row_sq / fro2: the kernel sums exact float64 squares (of fp32/bf16/fp16 values), so against
    # the float64 truth its relative error is at most gamma_terms(float64). The reference may sum
    # in float32 (relative error <= gamma_{n+1}(float32): n additions and the rounded squares),
    # so kernel vs reference gets both terms.
    sq = batch_of(W).double().square()
    rs64, fro64 = sq.sum(-1), sq.sum((-2, -1))
    assert_within(out.row_sq, rs64, gamma(n, U64) * rs64, "row_sq vs float64")
    assert_within(out.fro2, fro64, gamma(m * n, U64) * fro64, "fro2 vs float64")
    assert_within(out.row_sq, ref.row_sq, (gamma(n + 1) + gamma(n, U64)) * rs64, "row_sq vs ref")
    assert_within(out.fro2, ref.fro2, (gamma(m * n + 1) + gamma(m * n, U64)) * fro64, "fro2 vs ref")


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


SHAPES = {  # (b, m, n): 1, primes / non-powers of two, tall, wide, batched
    "1x1": (1, 1, 1),
    "7x123": (1, 7, 123),
    "129x65": (1, 129, 65),
    "tall300x17": (1, 300, 17),
    "wide17x300": (1, 17, 300),
    "b3x129x65": (3, 129, 65),
}
KS = (1, 5, 16)
# Small tiles and forced column splits: several row bands and splits even on tiny shapes, so the
# cross-program sums (atomics, or workspace + ordered sum) are exercised.
SMALL_TILES = dict(block_m=16, block_n=16, splits=3)


# ---------------------------------------------------------------------------------------------
# sketch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", KS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_sketch_matches_reference(shape, k):
    b, m, n = shape
    W, U, V = rand(b, m, n, seed=1), rand(b, m, k, seed=2), rand(b, n, k, seed=3)
    W0 = W.clone()
    assert_sketch_matches(SK.sketch_triton(W, U, V), W, U, V)
    assert torch.equal(W, W0), "sketch must not modify W"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", [SHAPES["129x65"], SHAPES["b3x129x65"], SHAPES["wide17x300"]],
                         ids=["129x65", "b3x129x65", "wide17x300"])
def test_sketch_cross_program_sums(shape, deterministic):
    b, m, n = shape
    W, U, V = rand(b, m, n, seed=4), rand(b, m, 5, seed=5), rand(b, n, 5, seed=6)
    out = SK.sketch_triton(W, U, V, deterministic=deterministic, **SMALL_TILES)
    assert_sketch_matches(out, W, U, V)


@pytest.mark.parametrize("k", [33, 128], ids=["k33", "k128"])
def test_sketch_wide_k(k):
    # k = 33 pads to K_PAD = 64, k = 128 uses the narrowest tiles of the heuristic.
    W, U, V = rand(1, 70, 40, seed=7), rand(1, 70, k, seed=8), rand(1, 40, k, seed=9)
    assert_sketch_matches(SK.sketch_triton(W, U, V), W, U, V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sketch_low_precision_weights(dtype):
    # bf16/fp16 -> fp32 is exact, so the fp32 bounds of the reference apply unchanged.
    W = rand(2, 45, 70, seed=10, dtype=dtype)
    U, V = rand(2, 45, 5, seed=11), rand(2, 70, 5, seed=12)
    assert_sketch_matches(SK.sketch_triton(W, U, V, **SMALL_TILES), W, U, V)


def test_sketch_non_contiguous_inputs():
    m, n, k = 37, 53, 5
    U, V = rand(1, m, k, seed=13), rand(1, n, k, seed=14)
    transposed = rand(n, m, seed=15).t()                # column-major W
    strided = rand(m, 2 * n, seed=16)[:, ::2]           # every other column
    batched = rand(m, 3, n, seed=17).transpose(0, 1)    # batch in the middle of memory
    for W in (transposed, strided):
        assert not W.is_contiguous()
        assert_sketch_matches(SK.sketch_triton(W, U, V), W, U, V)
    U3, V3 = rand(3, m, k, seed=18), rand(3, n, k, seed=19)
    assert_sketch_matches(SK.sketch_triton(batched, U3, V3), batched, U3, V3)
    # Non-contiguous bases: a transposed U and a V sliced out of a wider one.
    Ut = rand(1, k, m, seed=20).mT
    Vs = rand(1, n, 2 * k, seed=21)[..., ::2]
    W = rand(m, n, seed=22)
    assert_sketch_matches(SK.sketch_triton(W, Ut, Vs), W, Ut, Vs)


def test_sketch_shared_and_2d_bases():
    # A basis of batch 1 (or a 2-D one) serves every matrix of the batch, as matmul broadcasting
    # does in the reference.
    W = rand(3, 20, 30, seed=23)
    U, V = rand(1, 20, 4, seed=24), rand(30, 4, seed=25)
    assert_sketch_matches(SK.sketch_triton(W, U, V), W, U, V)
    W2 = rand(20, 30, seed=26)
    U2, V2 = rand(20, 4, seed=27), rand(30, 4, seed=28)
    assert_sketch_matches(SK.sketch_triton(W2, U2, V2), W2, U2, V2)


def test_sketch_conv_weight_through_as_batched():
    # Like sketch_torch, the op takes (m, n) or (b, m, n); a conv kernel goes through as_batched.
    U, V = rand(1, 6, 4, seed=29), rand(1, 12, 4, seed=30)
    conv = rand(6, 3, 2, 2, seed=31)                            # a view (1, 6, 12)
    permuted = rand(6, 2, 2, 3, seed=32).permute(0, 3, 1, 2)    # as_batched copies it
    for W in (conv, permuted):
        Wb = as_batched(W)
        assert_sketch_matches(SK.sketch_triton(Wb, U, V), Wb, U, V)
    with pytest.raises(ValueError, match="as_batched"):
        SK.sketch_triton(conv, U, V)


def test_sketch_float64_basis_is_rounded_like_reference():
    W = rand(1, 20, 30, seed=33)
    U, V = rand(1, 20, 4, seed=34, dtype=torch.float64), rand(1, 30, 4, seed=35, dtype=torch.float64)
    assert_sketch_matches(SK.sketch_triton(W, U, V), W, U, V)


def test_sketch_huge_values_do_not_overflow_fro2():
    # fp32 weights near 1e30: their squares (1e60) overflow fp32; fro2 and row_sq must not.
    W = rand(2, 40, 33, seed=36) * 1e30
    U, V = rand(2, 40, 3, seed=37), rand(2, 33, 3, seed=38)
    for opts in ({}, SMALL_TILES):
        out = SK.sketch_triton(W, U, V, **opts)
        truth = W.double().square().sum(dim=(-2, -1))
        assert torch.isfinite(out.fro2).all() and torch.isfinite(out.row_sq).all()
        assert_within(out.fro2, truth, 2 * gamma(40 * 33, U64) * truth, "fro2 vs float64")
        assert_sketch_matches(out, W, U, V)


@pytest.mark.parametrize("mode", ["fp32", "tf32x3", "tf32"])
def test_sketch_precision_modes(mode):
    # Each mode within its own rounding bound (on the interpreter all three compute in fp32).
    W, U, V = rand(1, 70, 90, seed=39), rand(1, 70, 16, seed=40), rand(1, 90, 16, seed=41)
    assert_sketch_matches(SK.sketch_triton(W, U, V, precision=mode), W, U, V, mode)


def test_sketch_deterministic_is_bitwise_reproducible():
    W, U, V = rand(2, 129, 65, seed=42), rand(2, 129, 5, seed=43), rand(2, 65, 5, seed=44)
    a = SK.sketch_triton(W, U, V, deterministic=True, **SMALL_TILES)
    b = SK.sketch_triton(W, U, V, deterministic=True, **SMALL_TILES)
    assert a.P is None and b.P is None  # the kernels sketch both sides (no power step)
    for name in ("Y", "Z", "fro2", "row_sq"):
        assert torch.equal(getattr(a, name), getattr(b, name)), \
            f"{name} differs between two deterministic runs"


def test_sketch_empty_matrix():
    W = torch.zeros(1, 0, 5, device=DEVICE)
    out = SK.sketch_triton(W, torch.zeros(1, 0, 2, device=DEVICE), rand(1, 5, 2, seed=45))
    ref = sketch_torch(W, torch.zeros(1, 0, 2, device=DEVICE), rand(1, 5, 2, seed=45))
    for x, y in zip(out, ref, strict=True):
        assert (x is None and y is None) or (x.shape == y.shape and torch.equal(x, y.to(x.dtype)))


def _meta_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


@pytest.mark.parametrize("case", [
    "W_1d", "W_4d", "W_int", "W_float64", "U_rows", "V_rows", "k_mismatch", "batch_mismatch",
    "U_int", "U_1d", "k_too_wide", "precision", "device_mismatch",
])
def test_sketch_rejects_bad_input(case):
    W, U, V = rand(2, 8, 6, seed=46), rand(2, 8, 3, seed=47), rand(2, 6, 3, seed=48)
    bad = {
        "W_1d": ((rand(8, seed=0), U, V), ValueError, "takes W as"),
        "W_4d": ((rand(2, 8, 6, 1), U, V), ValueError, "takes W as"),
        "W_int": ((W.to(torch.int32), U, V), TypeError, "dtype"),
        "W_float64": ((W.double(), U, V), TypeError, "backend='torch'"),
        "U_rows": ((W, rand(2, 9, 3), V), ValueError, "bases do not fit"),
        "V_rows": ((W, U, rand(2, 7, 3)), ValueError, "bases do not fit"),
        "k_mismatch": ((W, U, rand(2, 6, 4)), ValueError, "bases do not fit"),
        "batch_mismatch": ((rand(3, 8, 6), U, V), ValueError, "batch"),
        "U_int": ((W, U.to(torch.int64), V), TypeError, "U has dtype"),
        "U_1d": ((W, rand(8), V), ValueError, "U must be"),
        "k_too_wide": ((W, rand(2, 8, 300), rand(2, 6, 300)), ValueError, "limit"),
        "precision": ((W, U, V), ValueError, "precision"),
        "device_mismatch": ((W, _meta_like(U), V), ValueError, "device mismatch"),
    }[case]
    args, exc, match = bad
    kwargs = {"precision": "bf16"} if case == "precision" else {}
    with pytest.raises(exc, match=match):
        SK.sketch_triton(*args, **kwargs)


@pytest.mark.skipif(not INTERPRET, reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    W, U, V = rand(4, 4), rand(4, 2), rand(4, 2)
    with pytest.raises(ValueError, match="CUDA"):
        SK.sketch_triton(W, U, V)


# ---------------------------------------------------------------------------------------------
# fused_sgd_sketch
# ---------------------------------------------------------------------------------------------

def sgd_tol(W_ref, steps):
    """Kernel vs torch after ``steps`` fp32 SGD steps.

    Each step rounds g + wd*W, momentum*buf + (1-d)*g, g + momentum*buf and W - lr*g once each,
    and the two sides may fuse a multiply-add differently: a few ulps of the largest magnitude
    per step, growing at most linearly over a few steps. 8 ulps per step covers it with margin.
    """
    return 8 * steps * U32 * (W_ref.abs().max().item() + 1.0)


HYPER_GRID = [
    dict(momentum=mo, dampening=da, nesterov=ne, maximize=mx, weight_decay=wd, lr_tensor=lt)
    for mo, da, ne, mx, wd, lt in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [False, True], [False, True], [0.0, 1e-2], [False, True])
]


def _hyper_id(h):
    return "-".join([f"mom{h['momentum']}", f"damp{h['dampening']}", "nest" if h["nesterov"] else "plain",
                     "max" if h["maximize"] else "min", f"wd{h['weight_decay']}",
                     "lrT" if h["lr_tensor"] else "lrF"])


def _torch_sgd_accepts(h):
    # torch.optim.SGD's constructor rejects nesterov without momentum or with dampening.
    return not h["nesterov"] or (h["momentum"] > 0 and h["dampening"] == 0)


@pytest.mark.parametrize("h", HYPER_GRID, ids=[_hyper_id(h) for h in HYPER_GRID])
def test_fused_update_options(h):
    steps, lr = 3, 0.05
    m, n, k = 37, 29, 3
    W0 = rand(m, n, seed=50)
    grads = [rand(m, n, seed=51 + s) for s in range(steps)]
    U, V = rand(1, m, k, seed=60), rand(1, n, k, seed=61)
    hyper = dict(weight_decay=h["weight_decay"], momentum=h["momentum"],
                 dampening=h["dampening"], nesterov=h["nesterov"], maximize=h["maximize"])
    lr_arg = torch.tensor(lr, device=DEVICE) if h["lr_tensor"] else lr

    W, W_ref = W0.clone(), W0.clone()
    buf = buf_ref = None
    for s in range(steps):
        first = buf is None
        out, buf = FS.fused_sgd_sketch_triton(W, grads[s], buf, U, V, lr=lr_arg, **hyper)
        _, buf_ref = fused_sgd_sketch_torch(W_ref, grads[s], buf_ref, U, V, lr=lr_arg, **hyper)
        if h["momentum"] == 0:
            assert buf is None and buf_ref is None
        else:
            assert buf.shape == W.shape and buf.dtype == W.dtype
            if first:  # the kernel creates the buffer and fills it with g
                assert buf_ref is not None
            torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, s + 1))
        torch.testing.assert_close(W, W_ref, rtol=0, atol=sgd_tol(W_ref, s + 1))
        # The sketch is of the kernel's own updated W (isolates the sketch from update rounding).
        assert_sketch_matches(out, W, U, V)

    if _torch_sgd_accepts(h):
        p = torch.nn.Parameter(W0.clone())
        opt = torch.optim.SGD([p], lr=lr_arg, foreach=False, **hyper)
        for s in range(steps):
            p.grad = grads[s].clone()
            opt.step()
        torch.testing.assert_close(W, p.detach(), rtol=0, atol=sgd_tol(p.detach(), steps))
        if h["momentum"] != 0:
            mb = opt.state[p]["momentum_buffer"]
            torch.testing.assert_close(buf, mb, rtol=0, atol=sgd_tol(mb, steps))


# The fused op takes a parameter, not a batch: a 3-D W (o, i, kw) is one o x (i*kw) matrix.
PARAM_SHAPES = {
    "1x1": (1, 1), "7x123": (7, 123), "129x65": (129, 65), "tall300x17": (300, 17),
    "wide17x300": (17, 300), "conv1d3x43x3": (3, 43, 3),
}


@pytest.mark.parametrize("k", KS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", list(PARAM_SHAPES.values()), ids=list(PARAM_SHAPES))
def test_fused_shapes(shape, k):
    m = shape[0]
    n = int(torch.tensor(shape[1:]).prod())
    W0 = rand(*shape, seed=70)
    U, V = rand(1, m, k, seed=71), rand(1, n, k, seed=72)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    W, W_ref = W0.clone(), W0.clone()
    buf = buf_ref = None
    for s in range(2):
        G = rand(*shape, seed=73 + s)
        out, buf = FS.fused_sgd_sketch_triton(W, G, buf, U, V, **hyper)
        _, buf_ref = fused_sgd_sketch_torch(W_ref, G, buf_ref, U, V, **hyper)
        torch.testing.assert_close(W, W_ref, rtol=0, atol=sgd_tol(W_ref, s + 1))
        torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, s + 1))
        assert_sketch_matches(out, as_batched(W), U, V)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_fused_cross_program_sums(deterministic):
    m, n = 129, 65
    W, U, V = rand(m, n, seed=80), rand(1, m, 5, seed=81), rand(1, n, 5, seed=82)
    G = rand(m, n, seed=83)
    W_ref = W.clone()
    out, buf = FS.fused_sgd_sketch_triton(W, G, None, U, V, lr=0.1, momentum=0.5,
                                          deterministic=deterministic, **SMALL_TILES)
    _, buf_ref = fused_sgd_sketch_torch(W_ref, G, None, U, V, lr=0.1, momentum=0.5)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=sgd_tol(W_ref, 1))
    torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, 1))
    assert_sketch_matches(out, W, U, V)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_fused_tracking_off(momentum):
    m, n = 70, 45
    W0, G = rand(m, n, seed=90), rand(m, n, seed=91)
    W, W_ref = W0.clone(), W0.clone()
    buf = buf_ref = None
    for _ in range(2):
        out, buf = FS.fused_sgd_sketch_triton(W, G, buf, None, None, lr=0.1, momentum=momentum,
                                              weight_decay=1e-2)
        buf_ref = sgd_update_torch(W_ref, G, buf_ref, lr=0.1, momentum=momentum, weight_decay=1e-2)
        assert out is None
    torch.testing.assert_close(W, W_ref, rtol=0, atol=sgd_tol(W_ref, 2))
    if momentum:
        torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, 2))
    else:
        assert buf is None


def test_fused_empty_parameter():
    W, G = torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 5, device=DEVICE)
    U, V = torch.zeros(1, 0, 2, device=DEVICE), rand(1, 5, 2, seed=95)
    out, buf = FS.fused_sgd_sketch_triton(W, G, None, U, V, lr=0.1, momentum=0.9)
    # (as_batched cannot reshape a 0-row tensor with -1, so the expected sketch is built from
    # the 2-D view directly.)
    ref = sketch_torch(W.unsqueeze(0), U, V)
    assert buf.shape == W.shape
    for x, y in zip(out, ref, strict=True):
        assert (x is None and y is None) or (x.shape == y.shape and torch.equal(x, y.to(x.dtype)))


def test_fused_momentum_zero_returns_given_buffer_untouched():
    W, G = rand(10, 12, seed=92), rand(10, 12, seed=93)
    buf = rand(10, 12, seed=94)
    before = buf.clone()
    _, out_buf = FS.fused_sgd_sketch_triton(W, G, buf, None, None, lr=0.1, momentum=0.0)
    assert out_buf is buf and torch.equal(buf, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_low_precision_error_vs_float64(dtype):
    """Error of the kernel <= 2 x torch's own error in the same dtype + 1 ulp, against float64."""
    steps, m, n = 4, 48, 40
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, dampening=0.1)
    W0 = rand(m, n, seed=100).to(dtype)
    grads = [rand(m, n, seed=101 + s).to(dtype) for s in range(steps)]
    U, V = rand(1, m, 4, seed=110), rand(1, n, 4, seed=111)
    W, W_torch, W64 = W0.clone(), W0.clone(), W0.double()
    buf = buf_torch = buf64 = None
    for s in range(steps):
        out, buf = FS.fused_sgd_sketch_triton(W, grads[s], buf, U, V, **hyper)
        buf_torch = sgd_update_torch(W_torch, grads[s], buf_torch, **hyper)
        buf64 = sgd_update_torch(W64, grads[s].double(), buf64, **hyper)
        assert W.dtype == dtype and buf.dtype == dtype
        assert_sketch_matches(out, W, U, V)  # the sketch sees the stored (rounded) W
    # About one ulp at the largest magnitude (eps is the spacing at 1.0): both sides end with a
    # rounding to the parameter dtype, which alone can cost half an ulp against float64.
    ulp = torch.finfo(dtype).eps
    for name, mine, theirs, truth in (("W", W, W_torch, W64), ("buf", buf, buf_torch, buf64)):
        err = (mine.double() - truth).abs().max().item()
        err_torch = (theirs.double() - truth).abs().max().item()
        atol = ulp * truth.abs().max().item()
        assert err <= 2 * err_torch + atol, (name, err, err_torch, atol)


def test_fused_bf16_rounds_to_nearest_even():
    # W - lr*g computed in fp32 and rounded once to bf16, to nearest even, as the GPU's cvt.rn
    # and torch do (the kernel rounds on the bits, so the CPU interpreter checks the same thing).
    m, n, lr = 64, 48, 0.37
    W = rand(m, n, seed=125).bfloat16()
    G = rand(m, n, seed=126).bfloat16()
    expected = (W.float() - torch.tensor(lr, dtype=torch.float32) * G.float()).bfloat16()
    FS.fused_sgd_sketch_triton(W, G, None, None, None, lr=lr)
    diff_ulps = ((W.float() - expected.float()).abs() / (2.0**-7 * expected.float().abs())).max()
    mismatch = (W != expected).float().mean().item()
    assert diff_ulps <= 1
    # The GPU may contract w - lr*g into one fma (no rounding of lr*g), which moves a few
    # results across a rounding boundary; truncation instead of rounding would move about half.
    assert mismatch == 0 if INTERPRET else mismatch < 0.02


def test_fused_non_contiguous_parameter_updates_in_place():
    m, n, k = 33, 21, 4
    U, V = rand(1, m, k, seed=130), rand(1, n, k, seed=131)
    storage = rand(n, m, seed=132)
    W = storage.t()                                   # transposed view of a parameter
    G = rand(m, 2 * n, seed=133)[:, ::2]              # strided gradient
    W_ref = W.clone()
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    buf = buf_ref = None
    for _ in range(2):
        out, buf = FS.fused_sgd_sketch_triton(W, G, buf, U, V, **hyper)
        _, buf_ref = fused_sgd_sketch_torch(W_ref, G, buf_ref, U, V, **hyper)
    # The update landed in the caller's memory, through the view.
    torch.testing.assert_close(storage.t(), W_ref, rtol=0, atol=sgd_tol(W_ref, 2))
    torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, 2))
    assert buf.stride() == W.stride()  # torch's clone(g) layout for the new buffer
    assert_sketch_matches(out, W, U, V)


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_fused_conv_weight(layout):
    o, i, kh, kw = 6, 3, 2, 2
    if layout == "contiguous":
        W = rand(o, i, kh, kw, seed=140)
    else:  # (o, kh, kw, i) memory: cannot be viewed as (o, i*kh*kw); copied out and back
        W = rand(o, kh, kw, i, seed=140).permute(0, 3, 1, 2)
    G = rand(o, i, kh, kw, seed=141)
    U, V = rand(1, o, 3, seed=142), rand(1, i * kh * kw, 3, seed=143)
    W_ref = W.clone()
    out, buf = FS.fused_sgd_sketch_triton(W, G, None, U, V, lr=0.1, momentum=0.9)
    _, buf_ref = fused_sgd_sketch_torch(W_ref, G, None, U, V, lr=0.1, momentum=0.9)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=sgd_tol(W_ref, 1))
    torch.testing.assert_close(buf, buf_ref, rtol=0, atol=sgd_tol(buf_ref, 1))
    assert_sketch_matches(out, as_batched(W), U, V)


def test_fused_huge_values_do_not_overflow_fro2():
    W = rand(40, 33, seed=150) * 1e30
    G = rand(40, 33, seed=151) * 1e30
    U, V = rand(1, 40, 3, seed=152), rand(1, 33, 3, seed=153)
    out, _ = FS.fused_sgd_sketch_triton(W, G, None, U, V, lr=0.01, **SMALL_TILES)
    truth = W.double().square().sum(dim=(-2, -1))
    assert torch.isfinite(out.fro2).all()
    assert_within(out.fro2, truth, 2 * gamma(40 * 33, U64) * truth, "fro2 vs float64")
    assert_sketch_matches(out, W, U, V)


def test_fused_deterministic_is_bitwise_reproducible():
    m, n = 129, 65
    W0, G = rand(m, n, seed=160), rand(m, n, seed=161)
    buf0 = rand(m, n, seed=162)
    U, V = rand(1, m, 5, seed=163), rand(1, n, 5, seed=164)
    runs = []
    for _ in range(2):
        W, buf = W0.clone(), buf0.clone()
        out, buf = FS.fused_sgd_sketch_triton(W, G, buf, U, V, lr=0.1, momentum=0.9,
                                              deterministic=True, **SMALL_TILES)
        runs.append((W, buf) + tuple(out))
    for name, x, y in zip(("W", "buf") + out._fields, *runs, strict=True):
        assert (x is None and y is None) or torch.equal(x, y), \
            f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("case", [
    "G_shape", "G_dtype", "buf_shape", "U_without_V", "U_rows", "lr_two_elements", "lr_string",
    "W_float64", "device_mismatch",
])
def test_fused_rejects_bad_input_before_writing(case):
    W, G = rand(8, 6, seed=170), rand(8, 6, seed=171)
    U, V = rand(1, 8, 2, seed=172), rand(1, 6, 2, seed=173)
    W0 = W.clone()
    args = dict(W=W, G=G, buf=None, U=U, V=V)
    kw = dict(lr=0.1, momentum=0.9)
    exc, match = {
        "G_shape": (ValueError, "G has shape"),
        "G_dtype": (TypeError, "G has dtype"),
        "buf_shape": (ValueError, "buf is"),
        "U_without_V": (ValueError, "both"),
        "U_rows": (ValueError, "bases do not fit"),
        "lr_two_elements": (ValueError, "one element"),
        "lr_string": (TypeError, "lr must be"),
        "W_float64": (TypeError, "backend='torch'"),
        "device_mismatch": (ValueError, "device mismatch"),
    }[case]
    if case == "G_shape":
        args["G"] = rand(6, 8)
    elif case == "G_dtype":
        args["G"] = G.bfloat16()
    elif case == "buf_shape":
        args["buf"] = rand(8, 5)
    elif case == "U_without_V":
        args["V"] = None
    elif case == "U_rows":
        args["U"] = rand(1, 9, 2)
    elif case == "lr_two_elements":
        kw["lr"] = torch.tensor([0.1, 0.2], device=DEVICE)
    elif case == "lr_string":
        kw["lr"] = "0.1"
    elif case == "W_float64":
        args["W"], args["G"] = W.double(), G.double()
    elif case == "device_mismatch":
        args["G"] = _meta_like(G)
    with pytest.raises(exc, match=match):
        FS.fused_sgd_sketch_triton(args["W"], args["G"], args["buf"], args["U"], args["V"], **kw)
    assert torch.equal(W, W0), "a rejected call must leave W untouched"


# ---------------------------------------------------------------------------------------------
# fused_sgd_sketch_triton_many: b separate same-shape parameters in one launch (address table)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hyper", [dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                   dict(momentum=0.0, weight_decay=0.0, maximize=True),
                                   dict(momentum=0.5, dampening=0.1, lr_tensor=True)],
                         ids=["nesterov", "plain", "dampening-lrT"])
def test_fused_many_equals_one_call_per_matrix(hyper, dtype):
    """One launch over 3 separate (conv-shaped) parameters: each matrix's update, buffer and
    sketches are bit for bit those of its own call (deterministic sums: the same programs
    compute each matrix's tiles in the same order), over a first step (new buffers) and two
    more; the sketches also match the float64 truth of the updated weights."""
    hyper = dict(hyper)
    lr = torch.tensor(0.05, device=DEVICE) if hyper.pop("lr_tensor", False) else 0.05
    shape, b, k = (33, 5, 3), 3, 4
    m, n = 33, 15
    Ws = [rand(*shape, seed=200 + i, dtype=dtype) for i in range(b)]
    Ws_one = [W.clone() for W in Ws]
    U, V = rand(b, m, k, seed=210), rand(b, n, k, seed=211)
    bufs = bufs_one = [None] * b
    for s in range(3):
        Gs = [rand(*shape, seed=220 + 10 * s + i, dtype=dtype) for i in range(b)]
        out, bufs = FS.fused_sgd_sketch_triton_many(Ws, Gs, bufs, U, V, lr=lr, deterministic=True,
                                                    **SMALL_TILES, **hyper)
        ones, new_bufs = [], []
        for i in range(b):
            o, buf = FS.fused_sgd_sketch_triton(Ws_one[i], Gs[i], bufs_one[i], U[i:i + 1],
                                                V[i:i + 1], lr=lr, deterministic=True,
                                                **SMALL_TILES, **hyper)
            ones.append(o)
            new_bufs.append(buf)
        bufs_one = new_bufs
        for i in range(b):
            assert torch.equal(Ws[i], Ws_one[i]), (s, i)
            assert (bufs[i] is None) == (bufs_one[i] is None) and (
                bufs[i] is None or torch.equal(bufs[i], bufs_one[i])), (s, i)
            for field in ("Y", "Z", "fro2", "row_sq"):
                assert torch.equal(getattr(out, field)[i], getattr(ones[i], field)[0]), (s, i, field)
        assert_sketch_matches(out, torch.stack([as_batched(W)[0] for W in Ws]), U, V)


def test_fused_many_atomic_sums_and_version_counters():
    """The default (atomic) sums: each matrix's sketches against the float64 truth; the
    in-place writes are visible to autograd's version counters of every W and buffer."""
    b, m, n, k = 4, 129, 65, 5
    Ws = [rand(m, n, seed=230 + i) for i in range(b)]
    bufs = [rand(m, n, seed=240 + i) for i in range(b)]
    Gs = [rand(m, n, seed=250 + i) for i in range(b)]
    refs = [W.clone() for W in Ws]
    ref_bufs = [buf.clone() for buf in bufs]
    versions = [(W._version, buf._version) for W, buf in zip(Ws, bufs)]
    U, V = rand(b, m, k, seed=260), rand(b, n, k, seed=261)
    out, new_bufs = FS.fused_sgd_sketch_triton_many(Ws, Gs, bufs, U, V, lr=0.1, momentum=0.9,
                                                    **SMALL_TILES)
    assert all(nb is buf for nb, buf in zip(new_bufs, bufs))  # updated in place
    for i in range(b):
        _, rb = fused_sgd_sketch_torch(refs[i], Gs[i], ref_bufs[i], U[i:i + 1], V[i:i + 1],
                                       lr=0.1, momentum=0.9)
        torch.testing.assert_close(Ws[i], refs[i], rtol=0, atol=sgd_tol(refs[i], 1))
        torch.testing.assert_close(bufs[i], rb, rtol=0, atol=sgd_tol(rb, 1))
        assert Ws[i]._version > versions[i][0] and bufs[i]._version > versions[i][1]
    assert_sketch_matches(out, torch.stack(Ws), U, V)


@pytest.mark.parametrize("case", ["shape", "dtype", "non_contiguous", "mixed_buffers", "empty",
                                  "U_batch"])
def test_fused_many_rejects_bad_input_before_writing(case):
    b, m, n, k = 2, 8, 6, 2
    Ws = [rand(m, n, seed=270 + i) for i in range(b)]
    Gs = [rand(m, n, seed=280 + i) for i in range(b)]
    bufs = [None, None]
    U, V = rand(b, m, k, seed=290), rand(b, n, k, seed=291)
    before = [W.clone() for W in Ws]
    exc, match = ValueError, "contiguous"
    if case == "shape":
        Gs[1] = rand(m, n + 1)
    elif case == "dtype":
        Gs[1] = Gs[1].bfloat16()
    elif case == "non_contiguous":
        Ws[1] = rand(n, m).T
        before[1] = Ws[1].clone()
    elif case == "mixed_buffers":
        bufs = [rand(m, n), None]
        match = "every matrix has a momentum buffer or none"
    elif case == "empty":
        Ws = Gs = bufs = []
        match = "lists of one length"
    elif case == "U_batch":
        U = rand(3, m, k)
        match = "batch"
    with pytest.raises(exc, match=match):
        FS.fused_sgd_sketch_triton_many(Ws, Gs, bufs, U, V, lr=0.1, momentum=0.9)
    for W, W0 in zip(Ws, before):
        assert torch.equal(W, W0)


def test_spectral_sgd_triton_updates_same_shape_parameters_in_one_launch(monkeypatch):
    """SpectralSGD(backend="triton") sends a param group's same-shape matrices to one batched
    launch (counted), and its steps equal torch.optim.SGD's within the kernel's rounding."""
    from lowrank import SpectralSGD

    calls = []
    real = FS.fused_sgd_sketch_triton_many
    monkeypatch.setattr(FS, "fused_sgd_sketch_triton_many",
                        lambda Ws, *a, **kw: calls.append(len(Ws)) or real(Ws, *a, **kw))
    params = {f"w{i}": torch.nn.Parameter(rand(24, 16, seed=300 + i)) for i in range(3)}
    params["other"] = torch.nn.Parameter(rand(10, 24, seed=310))
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt = SpectralSGD(list(params.items()), lr=0.05, momentum=0.9, rank=2, sketch_rank=4,
                      backend="triton")
    sgd = torch.optim.SGD(list(ref.values()), lr=0.05, momentum=0.9, foreach=False)
    for s in range(3):
        for n in params:
            g = rand(*params[n].shape, seed=320 + 10 * s + len(n))
            params[n].grad, ref[n].grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    assert calls == [3, 3, 3]
    for n in params:
        torch.testing.assert_close(params[n].detach(), ref[n].detach(), rtol=0,
                                   atol=sgd_tol(ref[n].detach(), 3))
    for n, result in opt.spectra().items():
        exact = torch.linalg.svdvals(params[n].detach().double())[:2]
        assert bool((result.sigma[:2].double() <= exact * (1 + 1e-5)).all()), n  # lower bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sketch_many_equals_one_call_per_matrix(dtype):
    """sketch_triton_many over 3 separate (conv-shaped) tensors in one launch: bit for bit each
    matrix's own deterministic call, and the float64 truth within the rounding bounds."""
    shape, b, k = (40, 3, 7), 3, 5
    m, n = 40, 21
    Ws = [rand(*shape, seed=330 + i, dtype=dtype) for i in range(b)]
    U, V = rand(b, m, k, seed=340), rand(b, n, k, seed=341)
    out = SK.sketch_triton_many(Ws, U, V, deterministic=True, **SMALL_TILES)
    for i, W in enumerate(Ws):
        one = SK.sketch_triton(as_batched(W), U[i:i + 1], V[i:i + 1], deterministic=True,
                               **SMALL_TILES)
        for field in ("Y", "Z", "fro2", "row_sq"):
            assert torch.equal(getattr(out, field)[i], getattr(one, field)[0]), (i, field)
    assert_sketch_matches(out, torch.stack([as_batched(W)[0] for W in Ws]), U, V)
    with pytest.raises(ValueError, match="contiguous"):
        SK.sketch_triton_many([Ws[0], rand(n, m).T], U[:2], V[:2])


def test_spectrum_tracker_triton_sketches_same_shape_parameters_in_one_launch(monkeypatch):
    """SpectrumTracker(backend="triton") sketches same-shape matrices in one batched launch
    (counted); its estimates are lower bounds of float64 svdvals that converge to them."""
    from lowrank import SpectrumTracker

    calls = []
    real = SK.sketch_triton_many
    monkeypatch.setattr(SK, "sketch_triton_many",
                        lambda Ws, *a, **kw: calls.append(len(Ws)) or real(Ws, *a, **kw))
    g = torch.Generator().manual_seed(350)
    params = {}
    for i in range(3):  # a separated top 2: sigma 5, 3, then <= 0.5
        Q1 = torch.linalg.qr(torch.randn(24, 16, generator=g))[0]
        Q2 = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
        sigma = torch.cat([torch.tensor([5.0, 3.0]), 0.5 * torch.rand(14, generator=g)])
        params[f"w{i}"] = torch.nn.Parameter(((Q1 * sigma) @ Q2.T).to(DEVICE))
    tracker = SpectrumTracker(list(params.items()), rank=2, sketch_rank=4, backend="triton")
    for _ in range(12):
        tracker.step()
    assert calls == [3] * 12
    for n, result in tracker.spectra().items():
        exact = torch.linalg.svdvals(params[n].detach().double())[:2].cpu()
        torch.testing.assert_close(result.sigma[:2].double().cpu(), exact, rtol=1e-5, atol=0)


def test_many_launches_take_views_at_odd_offsets_one_by_one():
    """Parameters that are views of one flat buffer at offsets not aligned to 16 bytes (the
    table kernels assume aligned rows): the same results as aligned copies, through one call
    per matrix."""
    b, m, n, k = 3, 9, 7, 2
    flat = rand(1 + b * m * n, seed=360)
    Ws = [flat[1 + i * m * n: 1 + (i + 1) * m * n].view(m, n) for i in range(b)]
    assert any(W.data_ptr() % 16 for W in Ws)  # (4 + 252 i bytes: i = 1 happens to align)
    copies = [W.clone() for W in Ws]
    Gs = [rand(m, n, seed=370 + i) for i in range(b)]
    U, V = rand(b, m, k, seed=380), rand(b, n, k, seed=381)
    sk_views = SK.sketch_triton_many(Ws, U, V, deterministic=True)
    sk_copies = SK.sketch_triton_many(copies, U, V, deterministic=True)
    out, bufs = FS.fused_sgd_sketch_triton_many(Ws, Gs, [None] * b, U, V, lr=0.1, momentum=0.9,
                                                deterministic=True)
    out_c, bufs_c = FS.fused_sgd_sketch_triton_many(copies, Gs, [None] * b, U, V, lr=0.1,
                                                    momentum=0.9, deterministic=True)
    for field in ("Y", "Z", "fro2", "row_sq"):
        assert torch.equal(getattr(sk_views, field), getattr(sk_copies, field)), field
        assert torch.equal(getattr(out, field), getattr(out_c, field)), field
    for W, C, buf, buf_c in zip(Ws, copies, bufs, bufs_c):
        assert torch.equal(W, C) and torch.equal(buf, buf_c)

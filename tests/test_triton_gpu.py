"""GPU-only checks of the Triton kernels: large shapes, every dtype, TF32 modes, determinism, > 2^31.

Marked ``gpu``; skipped without CUDA (and under TRITON_INTERPRET=1, where these sizes would take
hours). Run on the GPU machine by ``python3 -m bench.gpu_check`` or ``pytest -m gpu tests``.
Every bound is stated next to its check; measured errors are printed and recorded as junit
properties so the report shows them.
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
    pytest.skip("GPU-size tests do not run under the Triton interpreter", allow_module_level=True)

from lowrank.backends import kernel_module
from lowrank.fused_sgd_sketch import sgd_update_torch

SK = kernel_module("triton", "sketch")
FS = kernel_module("triton", "fused_sgd_sketch")
DEV = "cuda"

U32 = 2.0**-24
U64 = 2.0**-53
# Same table as tests/test_triton_kernels.py: extra relative error per product of each
# tl.dot input precision (TF32: 10 mantissa bits per operand; 3xTF32: drops lo*lo, ~3 * 2^-20).
PRODUCT_ERR = {"fp32": 0.0, "tf32x3": 4 * 2.0**-20, "tf32": 2 * 2.0**-10}


def gamma(n, u=U32):
    return n * u / (1 - n * u)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV).to(dtype)


def sketch64(W, U, V):
    """Float64 truth of Y, Z, row_sq (W (b, m, n) or (m, n))."""
    W = (W.unsqueeze(0) if W.dim() == 2 else W).double()
    return W @ V.double(), W.mT @ U.double(), W.square().sum(-1)


def check_sketch(out, W, U, V, mode="fp32", record=None, tag=""):
    """Kernel vs float64 truth: rigorous elementwise bound; returns normwise relative errors."""
    Wb = (W.unsqueeze(0) if W.dim() == 2 else W).double()
    m, n = Wb.shape[-2:]
    Y64, Z64, rsq64 = sketch64(W, U, V)
    # 3xTF32 sums three products per term; tensor cores may truncate instead of rounding when
    # they accumulate, so TF32 modes get twice the unit roundoff.
    terms = 3 if mode == "tf32x3" else 1
    acc_u = U32 if mode == "fp32" else 2 * U32
    by = (PRODUCT_ERR[mode] + gamma(terms * n, acc_u)) * (Wb.abs() @ V.double().abs())
    bz = (PRODUCT_ERR[mode] + gamma(terms * m, acc_u)) * (Wb.abs().mT @ U.double().abs())
    ey = (out.Y.double() - Y64).abs()
    ez = (out.Z.double() - Z64).abs()
    assert (ey <= by).all(), f"Y: max err/bound {(ey / by.clamp_min(1e-300)).max().item():.3g}"
    assert (ez <= bz).all(), f"Z: max err/bound {(ez / bz.clamp_min(1e-300)).max().item():.3g}"
    # Non-negative float64 sums: relative error <= gamma_n.
    assert ((out.row_sq - rsq64).abs() <= gamma(n, U64) * rsq64).all()
    fro64 = rsq64.sum(-1)
    assert ((out.fro2 - fro64).abs() <= gamma(m * n, U64) * fro64).all()
    rel_y = (torch.linalg.norm(out.Y.double() - Y64) / torch.linalg.norm(Y64)).item()
    rel_z = (torch.linalg.norm(out.Z.double() - Z64) / torch.linalg.norm(Z64)).item()
    if record is not None:
        record(f"{tag}rel_err_Y", rel_y)
        record(f"{tag}rel_err_Z", rel_z)
    return rel_y, rel_z


LARGE = {"4096x4096": (1, 4096, 4096), "4097x1023": (1, 4097, 1023), "b3x1023x4097": (3, 1023, 4097)}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("k", [16, 64], ids=["k16", "k64"])
@pytest.mark.parametrize("shape", list(LARGE.values()), ids=list(LARGE))
def test_sketch_large_fp32(shape, k, deterministic, record_property):
    b, m, n = shape
    W, U, V = rand(b, m, n, seed=1), rand(b, m, k, seed=2), rand(b, n, k, seed=3)
    out = SK.sketch_triton(W, U, V, deterministic=deterministic)
    rel_y, rel_z = check_sketch(out, W, U, V, record=record_property)
    # And no worse than torch's own fp32 matmul against the same truth: x2, plus sqrt(len) * u,
    # the typical (random-walk) error of one sequential fp32 accumulation over len terms, since
    # cuBLAS may split the long dimension (smaller error) where this kernel runs it in order.
    Y64, Z64, _ = sketch64(W, U, V)
    ty = (torch.linalg.norm(torch.matmul(W, V).double() - Y64) / torch.linalg.norm(Y64)).item()
    tz = (torch.linalg.norm(torch.matmul(W.mT, U).double() - Z64) / torch.linalg.norm(Z64)).item()
    print(f"sketch {shape} k={k} det={deterministic}: rel err Y {rel_y:.2e} (torch {ty:.2e}), "
          f"Z {rel_z:.2e} (torch {tz:.2e})")
    assert rel_y <= 2 * ty + n**0.5 * U32 and rel_z <= 2 * tz + m**0.5 * U32


@pytest.mark.parametrize("mode", ["fp32", "tf32x3", "tf32"])
def test_sketch_precision_modes_error(mode, record_property):
    W, U, V = rand(1, 4096, 4096, seed=4), rand(1, 4096, 32, seed=5), rand(1, 4096, 32, seed=6)
    out = SK.sketch_triton(W, U, V, precision=mode)
    rel_y, rel_z = check_sketch(out, W, U, V, mode, record=record_property, tag=f"{mode}_")
    print(f"precision={mode}: normwise relative error Y {rel_y:.3e}, Z {rel_z:.3e}")
    # Stated normwise bounds. fp32 / 3xTF32: sequential accumulation over 4096 terms gives about
    # sqrt(4096) * 2^-24 = 4e-6; bound 2^-16 = 1.5e-5. TF32: operands keep 10 mantissa bits; if
    # the tensor cores truncate the low bits, the error has a bias of about 2^-10 of the result
    # on top of the random part; bound 2^-8 = 3.9e-3, still far below a broken mode.
    stated = {"fp32": 2.0**-16, "tf32x3": 2.0**-16, "tf32": 2.0**-8}[mode]
    assert rel_y <= stated and rel_z <= stated


def test_sketch_deterministic_bitwise_on_gpu():
    W, U, V = rand(1, 4096, 4096, seed=7), rand(1, 4096, 16, seed=8), rand(1, 4096, 16, seed=9)
    runs = [SK.sketch_triton(W, U, V, deterministic=True) for _ in range(3)]
    for r in runs[1:]:
        for name, x, y in zip(r._fields, runs[0], r, strict=True):
            assert (x is None and y is None) or torch.equal(x, y), \
                f"{name} differs between deterministic runs"


def sgd_tol(W_ref, steps):
    # A few ulps of the largest magnitude per step (each operation rounds once on both sides;
    # fused SGD also keeps some intermediates in double). 8 ulps per step, with margin.
    return 8 * steps * U32 * (W_ref.abs().max().item() + 1.0)


@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_fused_large_fp32_vs_torch_sgd(track):
    m, n, k, steps = 4096, 4096, 16, 3
    hyper = dict(momentum=0.9, weight_decay=1e-2, nesterov=True)
    W0 = rand(m, n, seed=10)
    grads = [rand(m, n, seed=11 + s) for s in range(steps)]
    U, V = (rand(1, m, k, seed=20), rand(1, n, k, seed=21)) if track else (None, None)
    W, buf = W0.clone(), None
    for s in range(steps):
        out, buf = FS.fused_sgd_sketch_triton(W, grads[s], buf, U, V, lr=0.05, **hyper)
        if track:
            check_sketch(out, W, U, V)
        else:
            assert out is None
    for kind in ("foreach", "fused"):
        p = torch.nn.Parameter(W0.clone())
        opt = torch.optim.SGD([p], lr=0.05, **{kind: True}, **hyper)
        for s in range(steps):
            p.grad = grads[s].clone()
            opt.step()
        torch.testing.assert_close(W, p.detach(), rtol=0, atol=sgd_tol(p.detach(), steps))
        mb = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(buf, mb, rtol=0, atol=sgd_tol(mb, steps))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr_float", "lr_tensor"])
def test_fused_low_precision_vs_float64(dtype, lr_tensor, record_property):
    """Error <= 2 x the error of torch's own SGD in that dtype + 1 ulp, against float64."""
    m, n, k, steps = 4097, 1023, 16, 4
    hyper = dict(momentum=0.9, weight_decay=1e-2, dampening=0.1)
    lr = torch.tensor(0.05, device=DEV) if lr_tensor else 0.05
    W0 = rand(m, n, seed=30, dtype=dtype)
    grads = [rand(m, n, seed=31 + s, dtype=dtype) for s in range(steps)]
    U, V = rand(1, m, k, seed=40), rand(1, n, k, seed=41)
    W, W64, buf, buf64 = W0.clone(), W0.double(), None, None
    for s in range(steps):
        out, buf = FS.fused_sgd_sketch_triton(W, grads[s], buf, U, V, lr=lr, **hyper)
        buf64 = sgd_update_torch(W64, grads[s].double(), buf64, lr=0.05, **hyper)
        check_sketch(out, W, U, V)  # the sketch of the stored W, exact widening to fp32
    ulp = torch.finfo(dtype).eps  # spacing at 1.0: one rounding to the dtype costs <= this * |x|
    for kind in ("foreach", "fused"):
        p = torch.nn.Parameter(W0.clone())
        opt = torch.optim.SGD([p], lr=lr, **{kind: True}, **hyper)
        for s in range(steps):
            p.grad = grads[s].clone()
            opt.step()
        for name, mine, theirs, truth in (("W", W, p.detach(), W64),
                                          ("buf", buf, opt.state[p]["momentum_buffer"], buf64)):
            err = (mine.double() - truth).abs().max().item()
            err_torch = (theirs.double() - truth).abs().max().item()
            record_property(f"{kind}_{name}_err_kernel", err)
            record_property(f"{kind}_{name}_err_torch", err_torch)
            print(f"{dtype} {name}: kernel err {err:.3e}, torch SGD ({kind}) err {err_torch:.3e}")
            assert err <= 2 * err_torch + ulp * truth.abs().max().item()


def test_fused_deterministic_bitwise_on_gpu():
    m, n, k = 4096, 4096, 16
    W0, G, B0 = rand(m, n, seed=50), rand(m, n, seed=51), rand(m, n, seed=52)
    U, V = rand(1, m, k, seed=53), rand(1, n, k, seed=54)
    runs = []
    for _ in range(2):
        W, buf = W0.clone(), B0.clone()
        out, buf = FS.fused_sgd_sketch_triton(W, G, buf, U, V, lr=0.1, momentum=0.9,
                                              deterministic=True)
        runs.append((W, buf) + tuple(out))
    for i, (x, y) in enumerate(zip(*runs, strict=True)):
        # P is None in this sketch mode: absent in both runs is equal too.
        assert (x is None and y is None) or torch.equal(x, y), \
            f"output {i} differs between deterministic runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_many_one_launch_equals_one_call_per_matrix_on_gpu(dtype):
    """fused_sgd_sketch_triton_many (one launch over 4 separate 1024 x 768 parameters, their
    addresses in a device table) against each matrix's own call, deterministic sums and the
    same column splits (the default splits depend on the batch): weights, buffers and sketches
    bit for bit, over a first momentum step and a second; and sketch_triton_many likewise."""
    b, m, n, k = 4, 1024, 768, 16
    Ws = [rand(m, n, seed=70 + i, dtype=dtype) for i in range(b)]
    Ws_one = [W.clone() for W in Ws]
    U, V = rand(b, m, k, seed=80), rand(b, n, k, seed=81)
    bufs = bufs_one = [None] * b
    for s in range(2):
        Gs = [rand(m, n, seed=90 + 10 * s + i, dtype=dtype) for i in range(b)]
        out, bufs = FS.fused_sgd_sketch_triton_many(Ws, Gs, bufs, U, V, lr=0.05, momentum=0.9,
                                                    nesterov=True, deterministic=True, splits=6)
        new = []
        for i in range(b):
            one, buf = FS.fused_sgd_sketch_triton(Ws_one[i], Gs[i], bufs_one[i], U[i:i + 1],
                                                  V[i:i + 1], lr=0.05, momentum=0.9,
                                                  nesterov=True, deterministic=True, splits=6)
            new.append(buf)
            assert torch.equal(Ws[i], Ws_one[i]) and torch.equal(bufs[i], buf), (s, i)
            for field in ("Y", "Z", "fro2", "row_sq"):
                assert torch.equal(getattr(out, field)[i], getattr(one, field)[0]), (s, i, field)
        bufs_one = new
    sk = SK.sketch_triton_many(Ws, U, V, deterministic=True, splits=6)
    for i in range(b):
        one = SK.sketch_triton(Ws[i], U[i:i + 1], V[i:i + 1], deterministic=True, splits=6)
        for field in ("Y", "Z", "fro2", "row_sq"):
            assert torch.equal(getattr(sk, field)[i], getattr(one, field)[0]), (i, field)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("op", ["sketch", "fused"])
def test_more_than_2_to_31_elements(op):
    # 65537 x 32769 = 2^31 + 98305 elements: offsets past 2^31 must not wrap.
    m, n, k = 65537, 32769, 8
    numel = m * n
    assert numel > 2**31
    need = numel * 4 * (3 if op == "fused" else 1) + 4 * 2**30  # W (+G, buf) + float64 chunks
    if _free_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free GPU memory")
    W = torch.empty(m, n, device=DEV)
    for i in range(0, m, 8192):  # fill in chunks: one generator call of 8.6 GB needs as much again
        W[i:i + 8192] = rand(min(8192, m - i), n, seed=60 + i)
    U, V = rand(1, m, k, seed=61), rand(1, n, k, seed=62)
    if op == "fused":
        G = torch.ones_like(W)
        tail_before = W[-3:].clone()
        out, buf = FS.fused_sgd_sketch_triton(W, G, None, U, V, lr=0.5, momentum=0.9)
        # First step: buf = g = 1, W = W - 0.5 (exact in fp32 for |W| < 2^22... up to rounding).
        assert torch.equal(buf[-3:], torch.ones_like(buf[-3:]))
        torch.testing.assert_close(W[-3:], tail_before - 0.5, rtol=0, atol=4 * U32 * 8)
        del G, buf
    else:
        out = SK.sketch_triton(W, U, V)
    # Check the rows past 2^31 (the last rows) and Z (which every row feeds) in float64 chunks.
    tail = slice(m - 1024, m)
    Wt = W[tail].double()
    Y64 = Wt @ V[0].double()
    by = gamma(n) * (Wt.abs() @ V[0].double().abs())
    assert ((out.Y[0, tail].double() - Y64).abs() <= by).all()
    assert ((out.row_sq[0, tail] - Wt.square().sum(-1)).abs()
            <= gamma(n, U64) * Wt.square().sum(-1)).all()
    Z64 = torch.zeros(n, k, dtype=torch.float64, device=DEV)
    bz = torch.zeros(n, k, dtype=torch.float64, device=DEV)
    fro = torch.zeros((), dtype=torch.float64, device=DEV)
    for i in range(0, m, 4096):
        Wc = W[i:i + 4096].double()
        Z64 += Wc.mT @ U[0, i:i + 4096].double()
        bz += Wc.abs().mT @ U[0, i:i + 4096].double().abs()
        fro += Wc.square().sum()
    assert ((out.Z[0].double() - Z64).abs() <= gamma(m) * bz).all()
    assert (out.fro2[0] - fro).abs() <= gamma(numel, U64) * fro

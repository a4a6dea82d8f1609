"""Triton kernel of op ``fused_sgd_sketch``: the torch.optim.SGD step and the sketch of the new W.

Same contract as :func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch`. One pass: each element
of W and G is read once and W written once (plus one read and one write of the momentum buffer
when momentum != 0, only a write on the first step); the updated tile is sketched while it is
still in registers (see :mod:`lowrank.kernels.triton.sketch` for the band layout and the two
reduction modes). With U = V = None it is a plain fused SGD step, to compare with
``torch.optim.SGD(fused=True)``.

Numerics of the update. Every parameter dtype is loaded, updated in fp32 and rounded once on
store, which is what ``torch.optim.SGD(fused=True)`` does (its CUDA kernel works in the fp32
"opmath" type, with some intermediates in double because the hyperparameters are doubles):

- float32 parameters: matches the reference and torch's SGD to a few ulps (the only differences
  are where rounding happens: fma contraction, double vs float intermediates).
- bfloat16 / float16: the default (foreach and single-tensor) torch SGD rounds to the parameter
  dtype after every operation (g + wd*W, buf*momentum, buf + (1-d)*g, ...); this kernel, like the
  fused one, keeps g and the new buffer in fp32 and rounds only the stored W and buf: fewer
  roundings, so usually closer to the float64 result (the tests require error <= 2 x torch's own
  error in that dtype + 1 ulp). The momentum value used for the nesterov term and the step is
  the unrounded fp32 one (as in fused SGD), not the stored low-precision buffer.
- A float lr, weight_decay, momentum and 1 - dampening enter the kernel as fp32 scalars, as torch
  casts a double ``alpha`` to a float tensor's opmath type; a tensor lr is read as fp32.
- The sketch sees the W that is stored (rounded to the parameter dtype, then widened to fp32),
  exactly as the reference sketches the updated parameter.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from lowrank.sketch import SketchOut, cat_sketches

from ..device_table import device_table
from .sketch import (
    _TL_DTYPES,
    SketchBuffers,
    _emit_band,
    _load_band_basis,
    _sketch_tile,
    batched_bases,
    check_device,
    check_param_dtype,
    check_precision,
    k_pad,
    launch_config,
    zero_sketch,
)


@triton.jit
def _round_to_param(x, PARAM_DTYPE: tl.constexpr, PARAM_BF16: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in the parameter dtype.

    For bfloat16 the rounding is done on the bits (add 0x7FFF plus the lowest kept bit, shift):
    the GPU's cvt.rn gives the same result, but the CPU interpreter's float->bf16 cast truncates,
    which would make the CPU tests check a different rounding than the GPU runs. A few integer
    operations per element, free in a memory-bound kernel.
    """
    if PARAM_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        # NaN stays NaN (adding the bias to a NaN's bits could carry it into an infinity).
        return tl.where(x != x, x.to(tl.bfloat16), r)  # noqa: PLR0124 - the NaN test
    else:
        return x.to(PARAM_DTYPE)


@triton.jit
def _fused_sgd_sketch_kernel(
    w_ptr,            # W (b, m, n) fp32/bf16/fp16, any strides; updated in place. With
                      # FROM_TABLE: an int64 table of 3 addresses per matrix (W, G, buf) of b
                      # separate tensors of one shape, strides m/n as given (b stride unused)
    g_ptr,            # G (b, m, n) gradient, dtype of W, any strides (unused with FROM_TABLE)
    buf_ptr,          # momentum buffer (b, m, n), dtype of W (unused without momentum, or
                      # with FROM_TABLE)
    lr_ptr,           # lr as a 1-element tensor on the device (used when LR_FROM_PTR)
    u_ptr,            # U (b, m, k) fp32 (unused when not TRACK)
    v_ptr,            # V (b, n, k) fp32
    y_ptr,            # Y (b, y_slots, m, k) fp32: output or per-split partials
    z_ptr,            # Z (b, z_slots, n, k) fp32: output or per-band partials
    rsq_ptr,          # row_sq partials (b, splits, m) fp64
    m, n, k,
    stride_wb, stride_wm, stride_wn,
    stride_gb, stride_gm, stride_gn,
    stride_bb, stride_bm, stride_bn,
    stride_ub, stride_um, stride_uk,
    stride_vb, stride_vn, stride_vk,
    cols_per_split,   # columns walked by one program (a multiple of BLOCK_N)
    y_slots, z_slots,
    lr,               # lr as a float (used when not LR_FROM_PTR)
    weight_decay,     # coupled weight decay
    momentum,
    one_minus_dampening,   # 1 - dampening, formed on the host in double as torch does
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,  # no buffer yet: buf = g, nothing read
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    TRACK: tl.constexpr,       # also sketch the updated W
    PARAM_DTYPE: tl.constexpr,  # storage dtype of W and buf (tl.float32, tl.bfloat16, tl.float16)
    PARAM_BF16: tl.constexpr,
    ATOMIC_Y: tl.constexpr, ATOMIC_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
    FROM_TABLE: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    nsplit = tl.num_programs(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    row_ok = rows < m

    if LR_FROM_PTR:
        # Read on the device: no host synchronisation for a tensor learning rate.
        step_lr = tl.load(lr_ptr).to(tl.float32)
    else:
        step_lr = lr

    if TRACK:
        u = _load_band_basis(u_ptr, bid, rows, kk, m, k, stride_ub, stride_um, stride_uk)
        acc_y = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
        rsq = tl.zeros((BLOCK_M,), dtype=tl.float64)
        z_slot = pid_m % z_slots
        z_base = (bid * z_slots + z_slot) * n * k

    col0 = pid_s.to(tl.int64) * cols_per_split
    hi = tl.minimum(cols_per_split, n - col0)
    if FROM_TABLE:
        # 16-byte aligned (the launcher checks): as for a pointer argument, the loads and
        # stores of a row can then be vectorised.
        w_mat = tl.multiple_of(tl.load(w_ptr + 3 * bid).to(tl.pointer_type(PARAM_DTYPE)), 16)
        g_mat = tl.multiple_of(tl.load(w_ptr + 3 * bid + 1).to(tl.pointer_type(PARAM_DTYPE)), 16)
        b_mat = tl.multiple_of(tl.load(w_ptr + 3 * bid + 2).to(tl.pointer_type(PARAM_DTYPE)), 16)
    else:
        w_mat = w_ptr + bid * stride_wb
        g_mat = g_ptr + bid * stride_gb
        b_mat = buf_ptr + bid * stride_bb
    w_row = w_mat + rows[:, None] * stride_wm
    g_row = g_mat + rows[:, None] * stride_gm
    b_row = b_mat + rows[:, None] * stride_bm
    for c in range(0, hi, BLOCK_N):
        cols = col0 + c + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = row_ok[:, None] & (cols < n)[None, :]
        w_ptrs = w_row + cols[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        # The order of operations is torch.optim.SGD's (see the module docstring).
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            b_ptrs = b_row + cols[None, :] * stride_bn
            if FIRST_STEP:
                mom = g
            else:
                old = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
                mom = old * momentum + one_minus_dampening * g
            tl.store(b_ptrs, _round_to_param(mom, PARAM_DTYPE, PARAM_BF16), mask=mask)
            if NESTEROV:
                g = g + momentum * mom
            else:
                g = mom
        w_new = _round_to_param(w - step_lr * g, PARAM_DTYPE, PARAM_BF16)
        tl.store(w_ptrs, w_new, mask=mask)
        if TRACK:
            # Sketch the stored (rounded) value, the W the reference sketches. Masked lanes hold
            # w = g = 0, so w_new is 0 there and adds nothing to Y, Z or row_sq.
            acc_y, rsq = _sketch_tile(w_new.to(tl.float32), u, acc_y, rsq, v_ptr, z_ptr, bid,
                                      z_base, rows, cols, kk, m, n, k,
                                      stride_vb, stride_vn, stride_vk, ATOMIC_Z, PRECISION)

    if TRACK:
        y_slot = pid_s % y_slots
        y_base = (bid * y_slots + y_slot) * m * k
        rsq_base = (bid * nsplit + pid_s) * m
        _emit_band(acc_y, rsq, y_ptr, rsq_ptr, y_base, rsq_base, rows, kk, m, k, ATOMIC_Y)


def _matrix_view(X: torch.Tensor) -> torch.Tensor | None:
    """X as (1, m, n) sharing X's memory (the layout of ``as_batched``), or None if no view exists."""
    if X.dim() == 2:
        return X.unsqueeze(0)  # always a view, whatever the strides
    try:
        return X.view(1, X.shape[0], -1)
    except RuntimeError:
        return None


def _lr_arg(lr, device):
    """(lr_tensor_or_None, lr_float). A tensor lr stays on the device: no .item(), no sync."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must hold one element; got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"a tensor lr must be floating point; got {lr.dtype}")
        # A CPU lr with CUDA weights (allowed by torch.optim.SGD) is copied to the device;
        # the kernel cannot read host memory. The value is used, not differentiated.
        return lr.detach().to(device).reshape(1), 0.0
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a float or a 1-element tensor; got {type(lr).__name__}")
    return None, float(lr)


def fused_sgd_sketch_triton(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None,
                            U: torch.Tensor | None, V: torch.Tensor | None, *, lr,
                            weight_decay: float = 0.0, momentum: float = 0.0,
                            dampening: float = 0.0, nesterov: bool = False,
                            maximize: bool = False, precision: str = "fp32",
                            deterministic: bool = False, block_m=None, block_n=None,
                            splits=None, num_warps=None
                            ) -> tuple[SketchOut | None, torch.Tensor | None]:
    """One torch.optim.SGD step on W (in place), then the sketch of the updated W.

    The contract of :func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch`. All tensors on one
    CUDA device (CPU tensors only under ``TRITON_INTERPRET=1``):

    - W: a parameter of any shape with >= 2 dims, sketched as the matrix
      ``as_batched(W)`` = (1, m, n), m = W.shape[0], n = the product of the other dims (a conv
      kernel (o, i, kh, kw) is o x i*kh*kw); there is no batch here, as in the reference.
      float32, bfloat16 or float16 (float64: TypeError, use backend="torch"). Any strides for a
      2-D W; a W of more dims whose trailing dims cannot be viewed as one is updated through a
      contiguous temporary copied back afterwards (two extra passes over W). Updated in place.
    - G: gradient, same shape and dtype as W, any strides. Read only.
    - buf: momentum buffer, same shape and dtype as W, or None. With momentum != 0 and buf None
      (the first step) a new buffer ``torch.empty_like(W)`` is created and initialised to g by
      the kernel; it is returned. With momentum == 0, buf is returned untouched.
    - U (1, m, k) or (m, k), V (1, n, k) or (n, k): float32 bases as in ``sketch_triton``; or
      both None to skip the sketch (a plain fused SGD step, returns (None, buf)).
    - lr: float, or a 1-element float tensor read on the device (no host sync; a CPU tensor is
      copied to W's device first; it is not differentiated through).
    - weight_decay, momentum, dampening, nesterov, maximize: as torch.optim.SGD. Like the
      reference, no hyperparameter validation (torch.optim.SGD's constructor does it).
    - precision, deterministic, block_m, block_n, splits, num_warps: as ``sketch_triton``.

    Returns (SketchOut(Y (1, m, k) fp32, Z (1, n, k) fp32, fro2 (1,) fp64, row_sq (1, m) fp64)
    or None, buf).
    """
    for X, name in ((W, "W"), (G, "G")):
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    check_param_dtype(W.dtype)
    if W.dim() < 2:
        raise ValueError(f"W must have at least 2 dimensions (got shape {tuple(W.shape)})")
    if G.shape != W.shape:
        raise ValueError(f"G has shape {tuple(G.shape)} but W has shape {tuple(W.shape)}")
    if G.dtype != W.dtype:
        raise TypeError(f"G has dtype {G.dtype} but W has dtype {W.dtype}; they must match")
    if buf is not None:
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"buf must be a torch.Tensor or None, got {type(buf).__name__}")
        if buf.shape != W.shape or buf.dtype != W.dtype:
            raise ValueError(f"buf is {tuple(buf.shape)} {buf.dtype}; expected W's "
                             f"{tuple(W.shape)} {W.dtype}")
    if (U is None) != (V is None):
        raise ValueError("U and V must both be tensors (tracking on) or both None (tracking off)")
    track = U is not None
    ptx = check_precision(precision)
    tensors = [W, G] + ([buf] if buf is not None else []) + ([U, V] if track else [])
    names = ["W", "G"] + (["buf"] if buf is not None else []) + (["U", "V"] if track else [])
    device = check_device(*tensors, names=names)
    lr_t, lr_f = _lr_arg(lr, device)
    # The matrix as_batched(W) reads: m = W.shape[0], n = the product of the other dims.
    b, m = 1, W.shape[0]
    n = math.prod(W.shape[1:])
    if track:
        U3, V3, k = batched_bases(U, V, b, m, n)
    else:
        U3 = V3 = None
        k = 0
    # Everything is validated: from here on, memory is allocated and W may be written.

    has_momentum = momentum != 0
    first = has_momentum and buf is None
    if first:
        buf = torch.empty_like(W)  # same strides as a dense W: torch's clone(g) layout
    if W.numel() == 0:
        return (zero_sketch(b, m, n, k, device) if track else None), buf

    # In-place targets must be views of the caller's memory; copy out and back otherwise.
    Wb = _matrix_view(W)
    w_copied = Wb is None
    if w_copied:
        Wb = W.contiguous().view(1, m, n)
    Gb = _matrix_view(G)
    if Gb is None:
        Gb = G.reshape(1, m, n)
    Bb = None
    b_copied = False
    if has_momentum:
        Bb = _matrix_view(buf)
        b_copied = Bb is None
        if b_copied:
            Bb = buf.contiguous().view(1, m, n)

    hyper = {"weight_decay": weight_decay, "momentum": momentum, "dampening": dampening,
             "nesterov": nesterov, "maximize": maximize}
    out = _launch(Wb, Gb, Bb if has_momentum else None, lr_t, lr_f, U3, V3, (b, m, n, k),
                  (Wb.stride(), Gb.stride(), Bb.stride() if has_momentum else Wb.stride()),
                  W.dtype, hyper, first, ptx, deterministic, (block_m, block_n, splits, num_warps))
    if w_copied:
        W.copy_(Wb.view(W.shape))
    if b_copied:
        buf.copy_(Bb.view(buf.shape))
    _bump_version(W)
    if has_momentum and not first:
        _bump_version(buf)
    return (out.finish() if track else None), buf


def _launch(w_arg, g_arg, b_arg, lr_t, lr_f, U3, V3, bmnk, strides, dtype, hyper, first, ptx,
            deterministic, tiles, table=None):
    """One launch of the fused kernel over a batch of b (m, n) matrices: the (b, m, n) views
    ``w_arg``, ``g_arg``, ``b_arg`` (None: no momentum) with their ``strides``, or, with
    ``table``, the device table of b (W, G, buf) addresses (the views are then unused and
    ``strides`` hold the matrices' own). ``hyper``: weight_decay, momentum (nonzero: a
    buffer), dampening, nesterov, maximize. Returns the SketchBuffers (None when not tracking)."""
    b, m, n, k = bmnk
    track = U3 is not None
    has_momentum = hyper["momentum"] != 0
    device = (w_arg if table is None else table).device
    block_m, block_n, splits, num_warps = tiles
    kp = k_pad(k) if track else 16
    bm, bn, nw, bands, nsplits, cps = launch_config(
        b, m, n, kp, device, track=track, block_m=block_m, block_n=block_n,
        splits=splits if (track or splits is not None) else triton.cdiv(n, block_n or 128),
        num_warps=num_warps)
    if track:
        out = SketchBuffers(b, m, n, k, bands, nsplits, deterministic, device)
        y, z, rsq, y_slots, z_slots = out.y, out.z, out.rsq, out.y_slots, out.z_slots
        atomic_y, atomic_z = out.atomic_y, out.atomic_z
    else:
        out = None
        y = z = rsq = U3 = V3 = table if table is not None else w_arg  # never dereferenced
        y_slots = z_slots = 1
        atomic_y = atomic_z = False
    if table is not None:
        w_arg = g_arg = b_arg = table
    elif b_arg is None:
        b_arg = w_arg  # unused pointer without momentum
    _fused_sgd_sketch_kernel[(bands, nsplits, b)](
        w_arg, g_arg, b_arg, lr_t if lr_t is not None else w_arg, U3, V3, y, z, rsq,
        m, n, k, *strides[0], *strides[1], *strides[2],
        *(U3.stride() if track else (0, 0, 0)), *(V3.stride() if track else (0, 0, 0)),
        cps, y_slots, z_slots,
        lr_f, float(hyper["weight_decay"]), float(hyper["momentum"]),
        float(1.0 - hyper["dampening"]),
        HAS_WD=hyper["weight_decay"] != 0, HAS_MOMENTUM=has_momentum, FIRST_STEP=first,
        NESTEROV=bool(hyper["nesterov"]), MAXIMIZE=bool(hyper["maximize"]),
        LR_FROM_PTR=lr_t is not None, TRACK=track, PARAM_DTYPE=_TL_DTYPES[dtype],
        PARAM_BF16=dtype == torch.bfloat16, ATOMIC_Y=atomic_y, ATOMIC_Z=atomic_z,
        PRECISION=ptx, BLOCK_M=bm, BLOCK_N=bn, K_PAD=kp, FROM_TABLE=table is not None,
        num_warps=nw,
    )
    return out


def fused_sgd_sketch_triton_many(Ws, Gs, bufs, U: torch.Tensor, V: torch.Tensor, *, lr,
                                 weight_decay: float = 0.0, momentum: float = 0.0,
                                 dampening: float = 0.0, nesterov: bool = False,
                                 maximize: bool = False, precision: str = "fp32",
                                 deterministic: bool = False, block_m=None, block_n=None,
                                 splits=None, num_warps=None):
    """:func:`fused_sgd_sketch_triton` for b separate parameters of one shape and dtype in ONE
    launch: the kernel reads each matrix's W, G and buf addresses from a small device table
    (:func:`lowrank.kernels.device_table.device_table`, uploaded once while the addresses stay
    the same), so a model's same-shape layers pay one launch's host time instead of b.

    Ws, Gs: lists of b contiguous tensors of one shape (>= 2-D, sketched as (m, n) with m =
    shape[0]) and dtype; bufs: a list of b momentum buffers like W, or of b None (the first step
    with momentum: new buffers, initialised to g by the kernel). U (b, m, k), V (b, n, k)
    float32 bases. Returns (SketchOut (b, ...), list of the b buffers, None entries without
    momentum); per matrix, the results of b calls of :func:`fused_sgd_sketch_triton` (to the
    rounding of the atomics; bitwise with ``deterministic`` and the same ``splits``: on a GPU
    the default splits depend on b). An operand not aligned to 16 bytes (a view at an odd
    offset) makes it b such calls.
    """
    op = "fused_sgd_sketch_triton_many"
    if not isinstance(Ws, (list, tuple)) or not Ws or len(Gs) != len(Ws) or len(bufs) != len(Ws):
        raise ValueError(f"{op}: Ws, Gs and bufs must be lists of one length >= 1")
    W0 = Ws[0]
    if not isinstance(W0, torch.Tensor) or W0.dim() < 2:
        raise ValueError(f"{op}: W[0] must be a tensor with >= 2 dimensions")
    check_param_dtype(W0.dtype)
    has_momentum = momentum != 0
    have = [buf is not None for buf in bufs]
    if has_momentum and any(have) and not all(have):
        raise ValueError(f"{op}: either every matrix has a momentum buffer or none (first step)")
    first = has_momentum and not any(have)
    for i, (W, G, buf) in enumerate(zip(Ws, Gs, bufs)):
        for X, name in ((W, "W"), (G, "G"), (buf if has_momentum else None, "buf")):
            if X is None:
                if name != "buf":
                    raise TypeError(f"{op}: {name}[{i}] is None")
                continue
            if not isinstance(X, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor")
            if X.shape != W0.shape or X.dtype != W0.dtype or not X.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] is {tuple(X.shape)} {X.dtype}"
                                 f"{'' if X.is_contiguous() else ' non-contiguous'}; every "
                                 f"operand must be a contiguous {tuple(W0.shape)} {W0.dtype}")
    tensors = [*Ws, *Gs, *(buf for buf in bufs if buf is not None), U, V]
    device = check_device(*tensors, names=["W"] * len(Ws) + ["G"] * len(Gs)
                          + ["buf"] * sum(have) + ["U", "V"])
    ptx = check_precision(precision)
    lr_t, lr_f = _lr_arg(lr, device)
    b, m = len(Ws), W0.shape[0]
    n = W0.numel() // m
    U3, V3, k = batched_bases(U, V, b, m, n)
    if first:
        bufs = [torch.empty_like(W) for W in Ws]  # torch clones g; the kernel writes it
    elif not has_momentum:
        bufs = [None] * b
    if W0.numel() == 0:
        return zero_sketch(b, m, n, k, device), bufs
    addresses = []
    for W, G, buf in zip(Ws, Gs, bufs):
        addresses += [W.data_ptr(), G.data_ptr(), buf.data_ptr() if buf is not None else 0]
    if any(a % 16 for a in addresses):  # a view at an odd offset: one call per matrix
        outs = []
        for i in range(b):
            sk, bufs[i] = fused_sgd_sketch_triton(
                Ws[i], Gs[i], None if first else bufs[i], U3[i:i + 1], V3[i:i + 1], lr=lr,
                weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                nesterov=nesterov, maximize=maximize, precision=precision,
                deterministic=deterministic, block_m=block_m, block_n=block_n, splits=splits,
                num_warps=num_warps)
            outs.append(sk)
        return cat_sketches(outs), bufs
    table = device_table(tuple(addresses), device)
    dense = (m * n, n, 1)
    hyper = {"weight_decay": weight_decay, "momentum": momentum, "dampening": dampening,
             "nesterov": nesterov, "maximize": maximize}
    out = _launch(None, None, None, lr_t, lr_f, U3, V3, (b, m, n, k), (dense, dense, dense),
                  W0.dtype, hyper, first, ptx, deterministic,
                  (block_m, block_n, splits, num_warps), table=table)
    for W, buf in zip(Ws, bufs):
        _bump_version(W)
        if has_momentum and not first:
            _bump_version(buf)
    return out.finish(), bufs


def _bump_version(X: torch.Tensor) -> None:
    """Tell autograd that X changed in place (the kernel writes through a raw pointer)."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None and not X.is_inference():
        inc(X)

"""CuPy launcher of op ``fused_sgd_sketch``: torch.optim.SGD update + sketch of the updated W.

Kernel: ``fused_sgd_sketch.cu`` (one entry point per weight dtype and sketch chunk, see
:func:`entry_point`). Reference and contract:
:func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch`. :func:`launch` also serves the
sketch-only pass (:mod:`.sketch`), which runs the same kernel with the update switched off.
"""

from __future__ import annotations

import numpy as np
import torch

from lowrank.sketch import SketchOut

from . import _loader

CU = "fused_sgd_sketch.cu"
BM, BN, THREADS, LDW = 64, 32, 256, 36  # must match FS_BM, FS_BN, FS_THREADS, FS_LDW in the .cu
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def _sketch_view(W: torch.Tensor, op: str) -> torch.Tensor:
    """The sketch op's W: (m, n) -> (1, m, n), (b, m, n) as is (as :func:`lowrank.sketch.sketch_torch`)."""
    if W.dim() == 2:
        return W.unsqueeze(0)
    if W.dim() == 3:
        return W
    raise ValueError(f"{op} takes W as (m, n) or (b, m, n), got shape {tuple(W.shape)}; "
                     "view a parameter with lowrank.sketch.as_batched(W) first")


def _matrix_view(X: torch.Tensor) -> torch.Tensor | None:
    """A parameter as the matrix (1, m, n) sharing its memory (``as_batched``), or None."""
    if X.dim() == 2:
        return X.unsqueeze(0)  # a view whatever the strides
    try:
        return X.view(1, X.shape[0], -1)
    except RuntimeError:
        return None


def _basis(B: torch.Tensor, b: int, p: int, name: str, op: str, dtype: torch.dtype):
    """A basis (b, p, k), (1, p, k) or (p, k) as contiguous ``dtype`` rows + its batch stride."""
    if B.dim() == 2:
        B = B.unsqueeze(0)
    if B.dim() != 3 or B.shape[1] != p or B.shape[0] not in (1, b):
        raise ValueError(f"{op}: {name} has shape {tuple(B.shape)}; expected ({b}, {p}, k)")
    B = B.detach().to(dtype=dtype).contiguous()  # no copy when it already is
    return B, (0 if B.shape[0] == 1 else B.stride(0))


def _bump_version(X: torch.Tensor) -> None:
    """Tell autograd that X changed in place (the kernel writes through a raw pointer)."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None and not X.is_inference():
        inc(X)


def chunk_layout(k: int) -> tuple[int, int]:
    """(KC, ldk) of the kernel for sketch width k: the chunk of sketch columns a block computes at
    once (the smallest of 8, 16, 32 that covers k; larger k takes several chunks of 32) and the
    padded row length of U, V and Y in shared memory (as ``ldk`` in the .cu)."""
    kc = 8 if k <= 8 else 16 if k <= 16 else 32
    kp = -(-k // kc) * kc
    return kc, kp + (4 if kc == 16 else 2)


def entry_point(dtype: torch.dtype, k: int) -> str:
    """The kernel's entry point for weights of ``dtype`` and sketch width k."""
    return f"fused_sgd_sketch_{_SUFFIX[dtype]}_k{chunk_layout(k)[0]}"


def shared_bytes(k: int, acc_dtype: torch.dtype) -> int:
    """Dynamic shared memory of a block: the staged tile, U and Y of its band, V of its tile."""
    itemsize = 8 if acc_dtype == torch.float64 else 4
    ldk = chunk_layout(k)[1]
    return (BM * LDW + (2 * BM + BN) * ldk) * itemsize


def supports(k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused pass takes sketch width k for weights of ``dtype`` on ``device``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return shared_bytes(k, acc) <= _loader.max_shared_bytes(device)


def launch(W, G, buf, U, V, *, update: bool, lr=0.0, weight_decay=0.0, momentum=0.0,
           dampening=0.0, nesterov=False, maximize=False, op="fused_sgd_sketch_cupy"):
    """Run the kernel; returns (SketchOut or None, buf). See :func:`fused_sgd_sketch_cupy`.

    update=False is the sketch op: W (m, n) or a batch (b, m, n), read only. update=True is the
    fused op: W a parameter of any shape >= 2-D taken as the one matrix ``as_batched(W)``.
    """
    for X, name in ((W, "W"), (G, "G")):
        if (update or name == "W") and not isinstance(X, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(X).__name__}")
    if W.dtype not in _SUFFIX:
        raise TypeError(f"{op}: W has dtype {W.dtype}; expected float32, bfloat16, float16 or float64")
    if W.dim() < 2:
        raise ValueError(f"{op}: W must have at least 2 dimensions (got shape {tuple(W.shape)})")
    if (U is None) != (V is None) or (U is None and not update):
        raise ValueError(f"{op}: U and V must both be tensors (or both None to skip the sketch)")
    track = U is not None
    device = _loader.check_cuda(op, W=W, G=G if update else None, buf=buf, U=U, V=V)

    Gb = Bb = None
    w_copied = b_copied = False
    init_buf = 0
    if update:
        if G.shape != W.shape or G.dtype != W.dtype:
            raise ValueError(f"{op}: G must match W (shape {tuple(W.shape)}, dtype {W.dtype}); "
                             f"got {tuple(G.shape)}, {G.dtype}")
        if buf is not None and (buf.shape != W.shape or buf.dtype != W.dtype):
            raise ValueError(f"{op}: buf is {tuple(buf.shape)} {buf.dtype}; expected W's "
                             f"{tuple(W.shape)} {W.dtype}")
        # In-place targets must be views of the caller's memory; else a contiguous temporary
        # is updated and copied back (two extra passes, only for exotic layouts).
        Wb = _matrix_view(W)
        w_copied = Wb is None
        if w_copied:
            Wb = W.contiguous().view(1, W.shape[0], -1)
        Gb = _matrix_view(G)
        if Gb is None:
            Gb = G.reshape(1, G.shape[0], -1)
        if momentum != 0:
            if buf is None:
                # First step: torch clones g into a new buffer; the kernel writes it (init_buf).
                buf = torch.empty_like(W)  # dense W: same strides, as torch's clone
                init_buf = 1
            Bb = _matrix_view(buf)
            b_copied = Bb is None
            if b_copied:
                Bb = buf.contiguous().view(1, buf.shape[0], -1)
    else:
        Wb = _sketch_view(W, op)
    b, m, n = Wb.shape
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    if track:
        Uc, sUb = _basis(U, b, m, "U", op, cdt)
        Vc, sVb = _basis(V, b, n, "V", op, cdt)
        k = Uc.shape[-1]
        if Vc.shape[-1] != k or k < 1:
            raise ValueError(f"{op}: U and V must have the same k >= 1, got {Uc.shape[-1]} and {Vc.shape[-1]}")
    else:
        Uc = Vc = None
        sUb = sVb = 0
        k = 0  # the kernel's sketch loops are empty: a plain fused SGD step

    lr_t, hyper = _hyper(op, update, device, cdt, lr, weight_decay, momentum, dampening,
                         nesterov, maximize, init_buf)
    if not track:  # a plain SGD step: the elementwise kernel, no sketch outputs
        if Wb.numel() > 0:
            _plain_update(Wb, Gb, Bb, lr_t, hyper, W.dtype, device)
        _finish_update(W, Wb, w_copied, buf, Bb, b_copied, init_buf)
        return None, buf
    strides = (Wb.stride(), Gb.stride() if Gb is not None else (0, 0, 0),
               Bb.stride() if Bb is not None else (0, 0, 0))
    out = _run_pass(op, device, W.dtype, (b, m, n), (Wb, Gb, Bb), None, strides, Uc, sUb, Vc,
                    sVb, k, update, lr_t, hyper)
    if update:
        _finish_update(W, Wb, w_copied, buf, Bb, b_copied, init_buf)
    return out, buf


def _hyper(op, update, device, cdt, lr, weight_decay, momentum, dampening, nesterov, maximize,
           init_buf):
    """The kernel's update arguments: (device lr tensor or None, the scalar tuple)."""
    lr_t = None
    lr_v = 0.0
    if update:
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"{op}: a tensor lr must hold one floating point element, got "
                                 f"{lr.dtype} of shape {tuple(lr.shape)}")
            if lr.device.type == "cuda":
                # Read in the kernel: no .item(), so no host sync and a captured graph sees updates.
                lr_t = lr.detach().reshape(()).to(device=device, dtype=cdt)
            else:
                lr_v = float(lr)  # a CPU scalar: reading it needs no device sync
        elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise TypeError(f"{op}: lr must be a float or a 1-element tensor, got {type(lr).__name__}")
        else:
            lr_v = float(lr)
    scalar = np.float64 if cdt == torch.float64 else np.float32
    # torch's alpha 1 - dampening is formed in double and rounded once to the arithmetic type.
    hyper = (scalar(lr_v), scalar(weight_decay), scalar(momentum), scalar(1.0 - float(dampening)),
             np.int32(bool(nesterov)), np.int32(bool(maximize)), np.int32(init_buf))
    return lr_t, hyper


def _run_pass(op, device, dtype, bmn, operands, table, strides, Uc, sUb, Vc, sVb, k, update,
              lr_t, hyper) -> SketchOut:
    """Launch the fused pass over b matrices (m, n): ``operands`` (W, G, buf) batched views with
    ``strides`` (three (b, m, n) stride triples), or None with ``table`` the device int64
    addresses (W, G, buf) of each matrix. Returns the zero-initialised, then reduced, sketches."""
    b, m, n = bmn
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    # Zero-initialised: Z (and Y when the columns are split) are reduced with atomics.
    Y = torch.zeros((b, m, k), dtype=cdt, device=device)
    Z = torch.zeros((b, n, k), dtype=cdt, device=device)
    fro2 = torch.zeros((b,), dtype=torch.float64, device=device)
    row_sq = torch.zeros((b, m), dtype=torch.float64, device=device)
    if b * m * n == 0:
        return SketchOut(Y, Z, fro2, row_sq)
    smem = shared_bytes(k, cdt)
    if not supports(k, dtype, device):
        raise ValueError(f"{op}: k = {k} needs {smem} bytes of shared memory per block; this "
                         f"GPU allows {_loader.max_shared_bytes(device)} (use a smaller k or "
                         "backend='triton')")
    nbands = -(-m // BM)
    # Enough blocks to fill the GPU ~4 times: split the columns when bands x batch are few.
    target = 4 * _loader.sm_count(device)
    chunks = max(1, min(-(-n // BN), -(-target // (nbands * b))))
    cols_per_chunk = -(-(-(-n // chunks)) // BN) * BN
    chunks = -(-n // cols_per_chunk)
    _loader.grid_dim_check(op, "column chunks", chunks)
    _loader.grid_dim_check(op, "batch", b)
    _loader.grid_dim_check(op, "row bands", nbands, 2**31 - 1)

    fn = _loader.function(CU, entry_point(dtype, k), device)
    i64 = np.int64
    sW, sG, sB = strides
    Wb, Gb, Bb = operands if operands is not None else (None, None, None)
    with _loader.on_torch_stream(device):
        c = _loader.pointer
        args = (
            c(Wb), c(Gb), c(Bb), c(Uc), c(Vc), c(Y), c(Z), c(fro2), c(row_sq),
            i64(m), i64(n), np.int32(k), i64(sUb), i64(sVb),
            i64(sW[0]), i64(sW[1]), i64(sW[2]), i64(sG[0]), i64(sG[1]), i64(sG[2]),
            i64(sB[0]), i64(sB[1]), i64(sB[2]), i64(cols_per_chunk), np.int32(1 if update else 0),
            c(lr_t), *hyper, c(table),
        )
        fn((nbands, chunks, b), (THREADS, 1, 1), args, shared_mem=smem)
    return SketchOut(Y, Z, fro2, row_sq)


UP_THREADS, UP_PER_THREAD = 256, 4  # as in the .cu
GRID_Y = _loader.GRID_YZ  # the grid rows; a module name, so tests can lower it


def _plain_update(Wb, Gb, Bb, lr_t, hyper, dtype, device) -> None:
    """Launch sgd_update_<dtype>: (b, m, n) views, each thread UP_PER_THREAD columns of a row."""
    b, m, n = Wb.shape
    i64 = np.int64
    sW, sG = Wb.stride(), Gb.stride()
    sB = Bb.stride() if Bb is not None else (0, 0, 0)
    cols = -(-n // (UP_THREADS * UP_PER_THREAD))
    _loader.grid_dim_check("fused_sgd_sketch_cupy", "column blocks", cols, 2**31 - 1)
    fn = _loader.function(CU, f"sgd_update_{_SUFFIX[dtype]}", device)
    with _loader.on_torch_stream(device):
        c = _loader.pointer
        fn((cols, min(b * m, GRID_Y), 1), (UP_THREADS, 1, 1),
           (c(Wb), c(Gb), c(Bb), i64(m), i64(n), i64(b * m), *(i64(x) for x in (*sW, *sG, *sB)),
            c(lr_t), *hyper))


def _finish_update(W, Wb, w_copied, buf, Bb, b_copied, init_buf) -> None:
    """Copy back temporaries of exotic layouts; bump the version counters torch would."""
    if w_copied:
        W.copy_(Wb.view(W.shape))
    if b_copied:
        buf.copy_(Bb.view(buf.shape))
    _bump_version(W)
    if Bb is not None and not init_buf:
        _bump_version(buf)


def fused_sgd_sketch_cupy(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None,
                          U: torch.Tensor | None, V: torch.Tensor | None, *, lr,
                          weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
                          nesterov: bool = False, maximize: bool = False
                          ) -> tuple[SketchOut | None, torch.Tensor | None]:
    """One torch.optim.SGD step on W (in place), then the sketch of the updated W, in one pass.

    The contract of :func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch` (and of the Triton
    launcher). CUDA tensors on one device:

    - W: a parameter of any shape with >= 2 dims, sketched as the matrix ``as_batched(W)`` =
      (1, m, n), m = W.shape[0], n = the product of the other dims. float32, bfloat16, float16
      or float64. Any strides for a 2-D W; a W of more dims that cannot be viewed as a matrix is
      updated through a contiguous temporary copied back. Updated in place.
    - G: gradient, W's shape and dtype, any strides. buf: momentum buffer like W, or None (with
      momentum != 0 a new ``torch.empty_like(W)`` is initialised to g by the kernel and returned;
      with momentum == 0 buf is returned untouched).
    - U (1, m, k) or (m, k), V (1, n, k) or (n, k): bases (converted to fp32, fp64 for float64 W);
      or both None to skip the sketch (returns (None, buf)).
    - lr: float, or a 1-element float tensor; a CUDA one is read by the kernel (no host sync, and
      a captured CUDA graph sees its later values), a CPU one is read on the host.

    Arithmetic is fp32 (fp64 for float64 W); 16-bit W and buf are rounded once when stored, where
    torch rounds after every operation (differences of ~1 ulp of the stored dtype). Returns
    (SketchOut(Y (1, m, k), Z (1, n, k), fro2 (1,) fp64, row_sq (1, m) fp64) or None, buf), on
    torch's current stream, with no host synchronisation.
    """
    return launch(W, G, buf, U, V, update=True, lr=lr, weight_decay=weight_decay,
                  momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize)


def launch_many(Ws, Gs, bufs, U, V, *, update: bool, lr=0.0, weight_decay=0.0, momentum=0.0,
                dampening=0.0, nesterov=False, maximize=False, op="fused_sgd_sketch_cupy_many"):
    """The pass over b separate matrices of one shape and dtype in one launch; see
    :func:`fused_sgd_sketch_cupy_many`. Returns (SketchOut (b, ...), bufs)."""
    if not isinstance(Ws, (list, tuple)) or not Ws:
        raise ValueError(f"{op}: Ws must be a non-empty list of tensors")
    b = len(Ws)
    W0 = Ws[0]
    if W0.dtype not in _SUFFIX:
        raise TypeError(f"{op}: W has dtype {W0.dtype}; expected float32, bfloat16, float16 or float64")
    if W0.dim() < 2:
        raise ValueError(f"{op}: W must have at least 2 dimensions (got shape {tuple(W0.shape)})")
    Gs = list(Gs) if update else [None] * b
    bufs = list(bufs) if bufs is not None else [None] * b
    if len(Gs) != b or len(bufs) != b:
        raise ValueError(f"{op}: {b} weights, {len(Gs)} gradients and {len(bufs)} buffers")
    with_buf = update and momentum != 0
    init_buf = 0
    if with_buf:
        have = [x is not None for x in bufs]
        if any(have) and not all(have):
            raise ValueError(f"{op}: either every matrix has a momentum buffer or none (first "
                             "step): group them apart")
        if not any(have):
            bufs = [torch.empty_like(W) for W in Ws]  # torch clones g; the kernel writes it
            init_buf = 1
    device = _loader.check_cuda(op, W=W0, G=Gs[0], buf=bufs[0] if with_buf else None, U=U, V=V)
    for i in range(b):
        for X, name in ((Ws[i], "W"), (Gs[i], "G"), (bufs[i] if with_buf else None, "buf")):
            if X is None:
                if name == "W" or (name == "G" and update):
                    raise TypeError(f"{op}: {name}[{i}] is None")
                continue
            if X.shape != W0.shape or X.dtype != W0.dtype or not X.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] is {tuple(X.shape)} {X.dtype}"
                                 f"{'' if X.is_contiguous() else ' non-contiguous'}; every "
                                 f"operand must be a contiguous {tuple(W0.shape)} {W0.dtype}")
            if X.device != device:
                raise ValueError(f"{op}: all tensors must be on one device; {name}[{i}] is on "
                                 f"{X.device}, expected {device}")
    m, n = W0.shape[0], W0.numel() // W0.shape[0]
    cdt = torch.float64 if W0.dtype == torch.float64 else torch.float32
    Uc, sUb = _basis(U, b, m, "U", op, cdt)
    Vc, sVb = _basis(V, b, n, "V", op, cdt)
    k = Uc.shape[-1]
    if Vc.shape[-1] != k or k < 1:
        raise ValueError(f"{op}: U and V must have the same k >= 1, got {Uc.shape[-1]} and {Vc.shape[-1]}")
    lr_t, hyper = _hyper(op, update, device, cdt, lr, weight_decay, momentum, dampening,
                         nesterov, maximize, init_buf)
    addresses = []
    for i in range(b):
        addresses += [Ws[i].data_ptr(), Gs[i].data_ptr() if update else 0,
                      bufs[i].data_ptr() if with_buf else 0]
    table = _loader.device_table(tuple(addresses), device)
    dense = (m * n, n, 1)
    out = _run_pass(op, device, W0.dtype, (b, m, n), None, table, (dense, dense, dense), Uc, sUb,
                    Vc, sVb, k, update, lr_t, hyper)
    if update:
        for i in range(b):
            _bump_version(Ws[i])
            if with_buf and not init_buf:
                _bump_version(bufs[i])
    return out, (bufs if with_buf else [None] * b)


def fused_sgd_sketch_cupy_many(Ws, Gs, bufs, U: torch.Tensor, V: torch.Tensor, *, lr,
                               weight_decay: float = 0.0, momentum: float = 0.0,
                               dampening: float = 0.0, nesterov: bool = False,
                               maximize: bool = False):
    """:func:`fused_sgd_sketch_cupy` for b separate parameters of one shape and dtype, in ONE
    launch (the kernel reads each matrix's W, G and buf addresses from a small device table):
    a model's same-shape layers pay one launch's host time instead of b.

    Ws, Gs: lists of b contiguous tensors of one shape (>= 2-D, sketched as (m, n) with m =
    shape[0]) and dtype; bufs: None, or a list of b momentum buffers like W, or of b None (the
    first step with momentum: new buffers are initialised to g by the kernel). U (b, m, k), V
    (b, n, k). Same hyperparameters for all. Returns (SketchOut(Y (b, m, k), Z (b, n, k), fro2
    (b,), row_sq (b, m)), list of the b buffers (None entries without momentum)); per matrix,
    the results of b calls of :func:`fused_sgd_sketch_cupy` (to the atomics' rounding).
    """
    return launch_many(Ws, Gs, bufs, U, V, update=True, lr=lr, weight_decay=weight_decay,
                       momentum=momentum, dampening=dampening, nesterov=nesterov,
                       maximize=maximize)

"""Triton kernel of op ``sketch``: Y = W V, Z = W^T U, ||W||_F^2 and row sums of squares.

Same contract as :func:`lowrank.sketch.sketch_torch` (the reference the tests compare against).

Layout of the work. A program owns a band of ``BLOCK_M`` rows of one matrix and walks its columns
in ``BLOCK_N`` tiles, so each element of W is read exactly once:

    Y[band]     += W[band, tile] @ V[tile]      kept in registers for the whole walk
    Z[tile]     += W[band, tile]^T @ U[band]    summed across row bands (the cross-tile reduction)
    row_sq[band] += sum(W[band, tile]^2)        in float64

When the row bands alone are too few to fill the GPU (4096 rows / 128 = 32 bands on a 132-SM H100),
the columns are also cut into ``splits`` ranges; Y then needs a sum across splits as well.

The two cross-program sums have two modes:

- fast (default): relaxed ``tl.atomic_add`` into a zeroed fp32 output. The atomics land in L2
  (Z is n * k * 4 bytes, small); the order of the additions, hence the last bits, varies by run.
- ``deterministic=True``: each program writes its partial into a workspace slot of its own
  (Z: (b, bands, n, k), Y: (b, splits, m, k)), and ``_sum_partials_kernel`` adds the slots in
  a fixed order. Bitwise reproducible for a given shape, tiling and device (the number of splits
  depends on the SM count), at the cost of writing and re-reading the workspace
  (bands * n * k * 4 + splits * m * k * 4 bytes per matrix; with the default tiles on a 132-SM
  H100 about 13 MB for 4096^2 at k = 16 and 150 MB for 8192^2 at k = 64).

row_sq is always written through per-split slots (b, splits, m) in float64 and summed in a fixed
order, so it, and fro2 = sum(row_sq), are reproducible in both modes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lowrank.sketch import SketchOut, cat_sketches

from ..device_table import device_table

PRECISIONS = {"fp32": "ieee", "tf32x3": "tf32x3", "tf32": "tf32"}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
BASIS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Widest sketch the register budget allows: Y's accumulator is BLOCK_M x K_PAD fp32 per program.
MAX_K = 256
MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------------------------
# Device-side building blocks, shared with the fused SGD kernel (kernels/triton/fused_sgd_sketch.py)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_band_basis(u_ptr, bid, rows, kk, m, k, stride_ub, stride_um, stride_uk):
    """U[bid, rows, :k] as a (BLOCK_M, K_PAD) fp32 tile, zero outside the matrix."""
    mask = (rows < m)[:, None] & (kk < k)[None, :]
    ptrs = u_ptr + bid * stride_ub + rows[:, None] * stride_um + kk[None, :] * stride_uk
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sketch_tile(w, u, acc_y, rsq, v_ptr, z_ptr, bid, z_base, rows, cols, kk, m, n, k,
                 stride_vb, stride_vn, stride_vk,
                 ATOMIC_Z: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one (BLOCK_M, BLOCK_N) fp32 tile ``w`` of W into the sketches.

    w      : (BLOCK_M, BLOCK_N) fp32, zero outside the matrix (masked load)
    u      : (BLOCK_M, K_PAD) fp32, this band's rows of U
    acc_y  : (BLOCK_M, K_PAD) fp32, running W[band, :] @ V
    rsq    : (BLOCK_M,) fp64, running row sums of squares
    z_base : int64 offset of this program's Z slot (output itself, or its workspace slot)
    Returns the updated (acc_y, rsq); the tile's Z contribution is emitted here.
    """
    col_ok = cols < n
    k_ok = kk < k
    v = tl.load(v_ptr + bid * stride_vb + cols[:, None] * stride_vn + kk[None, :] * stride_vk,
                mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    acc_y = tl.dot(w, v, acc=acc_y, input_precision=PRECISION)
    zp = tl.dot(tl.trans(w), u, input_precision=PRECISION)  # (BLOCK_N, K_PAD)
    z_ptrs = z_ptr + z_base + cols[:, None] * k + kk[None, :]
    z_mask = col_ok[:, None] & k_ok[None, :]
    if ATOMIC_Z:
        tl.atomic_add(z_ptrs, zp, mask=z_mask, sem="relaxed")
    else:
        tl.store(z_ptrs, zp, mask=z_mask)
    # Squares in float64: fp32 weights near 1e30 have squares (1e60) far past fp32's 3.4e38.
    w64 = w.to(tl.float64)
    rsq += tl.sum(w64 * w64, axis=1)
    return acc_y, rsq


@triton.jit
def _emit_band(acc_y, rsq, y_ptr, rsq_ptr, y_base, rsq_base, rows, kk, m, k,
               ATOMIC_Y: tl.constexpr):
    """Write this band's Y rows (store, or atomic add across column splits) and row_sq slot."""
    row_ok = rows < m
    y_ptrs = y_ptr + y_base + rows[:, None] * k + kk[None, :]
    y_mask = row_ok[:, None] & (kk < k)[None, :]
    if ATOMIC_Y:
        tl.atomic_add(y_ptrs, acc_y, mask=y_mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc_y, mask=y_mask)
    tl.store(rsq_ptr + rsq_base + rows, rsq, mask=row_ok)


@triton.jit
def _sketch_kernel(
    w_ptr,            # W (b, m, n) fp32/bf16/fp16, any strides; with FROM_TABLE an int64
                      # table of the addresses of b separate (m, n) tensors of dtype W_DTYPE
    u_ptr,            # U (b, m, k) fp32, any strides (batch stride 0: one basis for all)
    v_ptr,            # V (b, n, k) fp32, any strides
    y_ptr,            # Y (b, y_slots, m, k) fp32 contiguous: the output, or per-split partials
    z_ptr,            # Z (b, z_slots, n, k) fp32 contiguous: the output, or per-band partials
    rsq_ptr,          # row_sq partials (b, splits, m) fp64 contiguous
    m, n, k,          # matrix size and sketch width
    stride_wb, stride_wm, stride_wn,
    stride_ub, stride_um, stride_uk,
    stride_vb, stride_vn, stride_vk,
    cols_per_split,   # columns walked by one program (a multiple of BLOCK_N)
    y_slots,          # 1 (store / atomic into Y) or splits (deterministic partials)
    z_slots,          # 1 (store / atomic into Z) or bands (deterministic partials)
    ATOMIC_Y: tl.constexpr,   # Y summed across column splits with atomics
    ATOMIC_Z: tl.constexpr,   # Z summed across row bands with atomics
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
    FROM_TABLE: tl.constexpr = False, W_DTYPE: tl.constexpr = tl.float32,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    nsplit = tl.num_programs(1)
    # int64 everywhere an offset is formed: a single weight can pass 2^31 elements.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    row_ok = rows < m

    u = _load_band_basis(u_ptr, bid, rows, kk, m, k, stride_ub, stride_um, stride_uk)
    acc_y = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    rsq = tl.zeros((BLOCK_M,), dtype=tl.float64)
    # Z slot: the output itself (z_slots == 1) or this band's private workspace slot.
    z_slot = pid_m % z_slots
    z_base = (bid * z_slots + z_slot) * n * k

    col0 = pid_s.to(tl.int64) * cols_per_split
    hi = tl.minimum(cols_per_split, n - col0)
    if FROM_TABLE:
        w_mat = tl.multiple_of(tl.load(w_ptr + bid).to(tl.pointer_type(W_DTYPE)), 16)  # checked
    else:
        w_mat = w_ptr + bid * stride_wb
    w_row = w_mat + rows[:, None] * stride_wm
    for c in range(0, hi, BLOCK_N):
        cols = col0 + c + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = row_ok[:, None] & (cols < n)[None, :]
        w = tl.load(w_row + cols[None, :] * stride_wn, mask=mask, other=0.0).to(tl.float32)
        acc_y, rsq = _sketch_tile(w, u, acc_y, rsq, v_ptr, z_ptr, bid, z_base, rows, cols, kk,
                                  m, n, k, stride_vb, stride_vn, stride_vk, ATOMIC_Z, PRECISION)

    y_slot = pid_s % y_slots
    y_base = (bid * y_slots + y_slot) * m * k
    rsq_base = (bid * nsplit + pid_s) * m
    _emit_band(acc_y, rsq, y_ptr, rsq_ptr, y_base, rsq_base, rows, kk, m, k, ATOMIC_Y)


@triton.jit
def _sum_partials_kernel(
    src_ptr,          # partials (outer, parts, inner) contiguous, fp32 or fp64
    dst_ptr,          # result (outer, inner) contiguous, same dtype
    parts, inner,
    BLOCK: tl.constexpr,
):
    """dst[o] = sum over p = 0, 1, ..., parts-1 of src[o, p], always in this order (reproducible)."""
    pid = tl.program_id(0)
    o = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < inner
    ptrs = src_ptr + o * parts * inner + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, parts):
        ptrs += inner
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(dst_ptr + o * inner + offs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors, names) -> torch.device:
    """All tensors on one device, and that device one Triton can run on here."""
    dev = tensors[0].device
    for t, name in zip(tensors, names, strict=True):
        if t.device != dev:
            raise ValueError(f"device mismatch: {names[0]} is on {dev} but {name} is on {t.device}")
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        raise ValueError(f"the Triton kernels need CUDA tensors (got {dev}); CPU tensors run only "
                         "under the interpreter (TRITON_INTERPRET=1)")
    return dev


def check_param_dtype(dtype: torch.dtype, name: str = "W") -> None:
    if dtype == torch.float64:
        # Triton has no portable float64 tl.dot (fp64 MMA/FMA lowering is not in every release
        # we support), and a broadcast-and-sum fp64 path would spill registers badly. Float64
        # weights go to the torch backend, which is exact float64 (cuBLAS DGEMM).
        raise TypeError(f"{name} is float64: the Triton kernels compute in float32; use "
                        "backend='torch' for float64 weights")
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; the Triton kernels take float32, bfloat16 "
                        "or float16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def batched_bases(U: torch.Tensor, V: torch.Tensor, b: int, m: int, n: int):
    """Check U (b|1, m, k) or (m, k) and V (b|1, n, k) or (n, k); return 3-D views (b, ., k)."""
    for X, name in ((U, "U"), (V, "V")):
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
        if X.dtype not in BASIS_DTYPES:
            raise TypeError(f"{name} has dtype {X.dtype}; expected float32")
        if X.dim() not in (2, 3):
            raise ValueError(f"{name} must be (b, rows, k) or (rows, k); got shape {tuple(X.shape)}")
    U3 = U if U.dim() == 3 else U.unsqueeze(0)
    V3 = V if V.dim() == 3 else V.unsqueeze(0)
    if U3.shape[1] != m or V3.shape[1] != n or U3.shape[2] != V3.shape[2]:
        raise ValueError(f"bases do not fit a batch of {m} x {n} matrices: U is {tuple(U.shape)}, "
                         f"V is {tuple(V.shape)}; expected U (b, {m}, k) and V (b, {n}, k)")
    k = U3.shape[2]
    if k > MAX_K:
        raise ValueError(f"sketch width k={k} exceeds the Triton kernel's limit of {MAX_K}")
    for X3, name in ((U3, "U"), (V3, "V")):
        if X3.shape[0] not in (1, b):
            raise ValueError(f"{name} has batch {X3.shape[0]} but W has batch {b}")
    # A float64 (or low-precision) basis is rounded to float32, as sketch_torch does for
    # non-float64 weights. Small copy (rows * k), only when the dtype differs.
    U3 = U3.to(torch.float32).expand(b, m, k)
    V3 = V3.to(torch.float32).expand(b, n, k)
    return U3, V3, k


def k_pad(k: int) -> int:
    # tl.dot needs every dimension >= 16 and a power of two.
    return max(16, triton.next_power_of_2(k))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(b: int, m: int, n: int, kp: int, device: torch.device, *, track: bool = True,
                  block_m=None, block_n=None, splits=None, num_warps=None):
    """Tile sizes, number of column splits and warps. First guesses, to be tuned on the GPU.

    Tall row bands: Z's cross-band atomics move (m / BLOCK_M) * n * k * 4 bytes through L2, a
    fraction k / BLOCK_M of W's own traffic, so BLOCK_M is as large as the registers allow
    (W's tile, U's band, V's tile and the Y accumulator, all fp32). The choices below compile
    for sm_90 without register spills (checked with ptxas, Triton 3.9, fp32/bf16, ieee/tf32);
    their speed is measured by ``bench/gpu_check.py``'s sweep. Column splits are added until
    there are about 4 programs per SM: a lone row band cannot keep enough loads in flight to
    use its SM's share of HBM bandwidth.
    """
    if track:
        if kp <= 64:
            bm, bn, nw = 128, 32, 8
        elif kp <= 128:
            bm, bn, nw = 64, 16, 8
        else:
            bm, bn, nw = 32, 32, 8
    else:
        bm, bn, nw = 32, 128, 4  # pure elementwise update: 512 B row segments, coalesced
    bm = block_m or bm
    bn = block_n or bn
    nw = num_warps or nw
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block sizes must be powers of two >= 16; got {bm} x {bn}")
    bands = triton.cdiv(m, bm)
    tiles = triton.cdiv(n, bn)
    if splits is None:
        if device.type == "cuda" and not interpreting():
            target = 4 * _sm_count(device.index if device.index is not None
                                   else torch.cuda.current_device())
            splits = min(tiles, max(1, triton.cdiv(target, b * bands)))
        else:
            splits = 1
    # Grid (bands, splits, b): CUDA caps the y and z dimensions of a grid at 65535.
    splits = max(1, min(int(splits), tiles, MAX_GRID_YZ))
    if b > MAX_GRID_YZ:
        raise ValueError(f"a batch of {b} matrices exceeds the launch grid's limit of {MAX_GRID_YZ}")
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split
    return bm, bn, nw, bands, splits, tiles_per_split * bn


class SketchBuffers:
    """Outputs and workspaces of one sketch launch; ``finish`` reduces partials into a SketchOut."""

    def __init__(self, b, m, n, k, bands, splits, deterministic, device):
        f32 = dict(device=device, dtype=torch.float32)
        self.b, self.m, self.n, self.k = b, m, n, k
        self.bands, self.splits = bands, splits
        self.atomic_y = splits > 1 and not deterministic
        self.atomic_z = bands > 1 and not deterministic
        self.y_slots = splits if (splits > 1 and deterministic) else 1
        self.z_slots = bands if (bands > 1 and deterministic) else 1
        # Atomic targets start at zero; stores overwrite every element, so empty is enough.
        self.y = (torch.zeros if self.atomic_y else torch.empty)(b, self.y_slots, m, k, **f32)
        self.z = (torch.zeros if self.atomic_z else torch.empty)(b, self.z_slots, n, k, **f32)
        self.rsq = torch.empty(b, splits, m, device=device, dtype=torch.float64)

    def finish(self) -> SketchOut:
        Y = reduce_slots(self.y)
        Z = reduce_slots(self.z)
        row_sq = reduce_slots(self.rsq)
        return SketchOut(Y, Z, row_sq.sum(dim=-1), row_sq)


def reduce_slots(x: torch.Tensor) -> torch.Tensor:
    """(outer, parts, *inner) -> (outer, *inner), summing the parts in a fixed order."""
    outer, parts = x.shape[0], x.shape[1]
    if parts == 1:
        return x[:, 0]
    inner = x[0, 0].numel()
    out = torch.empty((outer,) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
    BLOCK = 1024
    _sum_partials_kernel[(triton.cdiv(inner, BLOCK), outer)](x, out, parts, inner, BLOCK=BLOCK)
    return out


def zero_sketch(b, m, n, k, device) -> SketchOut:
    f32 = dict(device=device, dtype=torch.float32)
    f64 = dict(device=device, dtype=torch.float64)
    return SketchOut(torch.zeros(b, m, k, **f32), torch.zeros(b, n, k, **f32),
                     torch.zeros(b, **f64), torch.zeros(b, m, **f64))


def sketch_triton(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *, precision: str = "fp32",
                  deterministic: bool = False, block_m=None, block_n=None, splits=None,
                  num_warps=None) -> SketchOut:
    """Sketch pass over W with bases U, V; the contract of :func:`lowrank.sketch.sketch_torch`.

    Inputs (all on one CUDA device; CPU tensors only under ``TRITON_INTERPRET=1``):

    - W: (b, m, n) or (m, n) (read as b = 1), float32, bfloat16 or float16, any strides, never
      copied (a transposed W is correct, but its loads are not coalesced, so it is slower).
      Other ranks raise ValueError, as in the reference: pass ``as_batched(W)`` for a conv
      weight. float64 raises TypeError: use ``backend="torch"``.
    - U: (b, m, k) or (m, k), V: (b, n, k) or (n, k); float32 (another float dtype is rounded
      to float32, a copy of rows * k). A batch of 1 is shared by all b matrices. Any strides.
      1 <= k <= 256 (padded to a power of two >= 16 inside the kernel).

    Options:

    - precision: "fp32" (default, exact fp32 products, ``input_precision="ieee"``), "tf32x3"
      (three TF32 tensor-core products, close to fp32), "tf32" (one TF32 product, about 1e-3
      relative error per product).
    - deterministic: sum the cross-program partials of Y and Z in a fixed order (bitwise
      reproducible for a given shape and device) instead of with atomics. Costs a workspace of
      (bands * n + splits * m) * k * 4 bytes, written once and read once.
    - block_m, block_n, splits, num_warps: tuning overrides (None: the heuristic of
      :func:`launch_config`).

    Returns :class:`lowrank.sketch.SketchOut` of new contiguous tensors:
    Y (b, m, k) float32, Z (b, n, k) float32, fro2 (b,) float64, row_sq (b, m) float64.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    check_param_dtype(W.dtype)
    if W.dim() not in (2, 3):
        raise ValueError(f"sketch_triton takes W as (m, n) or (b, m, n), got shape {tuple(W.shape)}; "
                         "view a parameter with lowrank.sketch.as_batched(W) first")
    ptx = check_precision(precision)
    Wb = W.unsqueeze(0) if W.dim() == 2 else W  # a view: strides are passed, nothing is copied
    b, m, n = Wb.shape
    U3, V3, k = batched_bases(U, V, b, m, n)
    device = check_device(W, U, V, names=("W", "U", "V"))
    if Wb.numel() == 0 or k == 0:
        return zero_sketch(b, m, n, k, device)

    return _launch_sketch(Wb, Wb.stride(), W.dtype, (b, m, n, k), U3, V3, ptx, deterministic,
                          (block_m, block_n, splits, num_warps), device).finish()


def _launch_sketch(w_arg, w_strides, dtype, bmnk, U3, V3, ptx, deterministic, tiles, device,
                   from_table: bool = False) -> SketchBuffers:
    """One launch of the sketch kernel over b (m, n) matrices: the (b, m, n) view ``w_arg``
    with ``w_strides``, or (``from_table``) the device table of their addresses."""
    b, m, n, k = bmnk
    block_m, block_n, splits, num_warps = tiles
    kp = k_pad(k)
    bm, bn, nw, bands, splits, cps = launch_config(b, m, n, kp, device, block_m=block_m,
                                                   block_n=block_n, splits=splits,
                                                   num_warps=num_warps)
    out = SketchBuffers(b, m, n, k, bands, splits, deterministic, device)
    _sketch_kernel[(bands, splits, b)](
        w_arg, U3, V3, out.y, out.z, out.rsq,
        m, n, k,
        *w_strides, *U3.stride(), *V3.stride(),
        cps, out.y_slots, out.z_slots,
        ATOMIC_Y=out.atomic_y, ATOMIC_Z=out.atomic_z, PRECISION=ptx,
        BLOCK_M=bm, BLOCK_N=bn, K_PAD=kp, FROM_TABLE=from_table, W_DTYPE=_TL_DTYPES[dtype],
        num_warps=nw,
    )
    return out


def sketch_triton_many(Ws, U: torch.Tensor, V: torch.Tensor, *, precision: str = "fp32",
                       deterministic: bool = False, block_m=None, block_n=None, splits=None,
                       num_warps=None) -> SketchOut:
    """:func:`sketch_triton` of b separate matrices of one shape and dtype (contiguous, >= 2-D,
    read as (m, n) with m = shape[0]) with the batched bases U (b, m, k), V (b, n, k), in ONE
    launch: the kernel reads each matrix's address from a device table
    (:func:`lowrank.kernels.device_table.device_table`). Returns SketchOut (b, ...): per
    matrix, its own call's results (bitwise with ``deterministic`` and the same ``splits``; on
    a GPU the default splits depend on b). A matrix not aligned to 16 bytes (a view at an odd
    offset) makes it b calls."""
    op = "sketch_triton_many"
    if not isinstance(Ws, (list, tuple)) or not Ws:
        raise ValueError(f"{op}: Ws must be a non-empty list of tensors")
    W0 = Ws[0]
    for i, W in enumerate(Ws):
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"{op}: W[{i}] must be a torch.Tensor, got {type(W).__name__}")
        if W.shape != W0.shape or W.dtype != W0.dtype or not W.is_contiguous() or W.dim() < 2:
            raise ValueError(f"{op}: W[{i}] is {tuple(W.shape)} {W.dtype}"
                             f"{'' if W.is_contiguous() else ' non-contiguous'}; every matrix "
                             f"must be a contiguous {tuple(W0.shape)} {W0.dtype} with >= 2 dims")
    check_param_dtype(W0.dtype)
    ptx = check_precision(precision)
    b, m = len(Ws), W0.shape[0]
    n = W0.numel() // m
    U3, V3, k = batched_bases(U, V, b, m, n)
    device = check_device(*Ws, U, V, names=[f"W[{i}]" for i in range(b)] + ["U", "V"])
    if W0.numel() == 0 or k == 0:
        return zero_sketch(b, m, n, k, device)
    addresses = tuple(W.data_ptr() for W in Ws)
    if any(a % 16 for a in addresses):  # a view at an odd offset: one call per matrix
        outs = [sketch_triton(W.view(1, m, n), U3[i:i + 1], V3[i:i + 1], precision=precision,
                              deterministic=deterministic, block_m=block_m, block_n=block_n,
                              splits=splits, num_warps=num_warps) for i, W in enumerate(Ws)]
        return cat_sketches(outs)
    table = device_table(addresses, device)
    return _launch_sketch(table, (m * n, n, 1), W0.dtype, (b, m, n, k), U3, V3, ptx,
                          deterministic, (block_m, block_n, splits, num_warps), device,
                          from_table=True).finish()

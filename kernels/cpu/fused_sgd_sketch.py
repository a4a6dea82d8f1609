"""CPU launcher of op ``fused_sgd_sketch``: the torch.optim.SGD update and the sketch of the
updated W in one pass over memory (kernel: ``sgd_sketch.c``).

Reference and contract: :func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch` (same update,
same operation order; the sketch products are summed in another order than torch's matmul, so
they agree to float32 rounding, not bit for bit). CPU weights in float32, bfloat16 or float16:
16-bit weights are updated by the reference's own torch ops (torch.optim.SGD's 16-bit rounding,
bit for bit by construction) and then sketched by the kernel, which widens each block of rows to
float32 (exactly) on the way; float32 weights are updated inside the pass.
"""

from __future__ import annotations

import array
import ctypes

import torch

from lowrank.fused_sgd_sketch import sgd_update_torch
from lowrank.sketch import SIDES, SketchOut

from . import _loader
from ._loader import ptr

MODE_Y, MODE_Z, MODE_POWER = 1, 2, 4
_MODES = {"both": MODE_Y | MODE_Z, "y": MODE_Y, "z": MODE_Z, "power": MODE_POWER}
assert set(_MODES) == set(SIDES)
# Below this many elements a matrix runs on one thread (starting the pool costs more).
_PARALLEL_MIN = 1 << 15
# Rows are handed to threads in chunks of ROWS-row blocks, this many chunks per thread (see
# sgd_sketch.c); Z partials per chunk make the result independent of the scheduling.
_CHUNKS_PER_THREAD = 4
_ROWS = 8  # ROWS of sgd_sketch.c
# Weight dtypes the kernel reads (wtype of sgd_sketch.c); the 16-bit ones are sketched only.
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {-1: "no memory for the kernel's scratch",
           -2: "the kernel updates float32 weights only (16-bit ones: torch, then a sketch)"}


def _check(name: str, t: torch.Tensor | None, op: str, dtype=torch.float32) -> None:
    """A CPU tensor of ``dtype`` (the weights' dtype for G and buf, float32 for the bases)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"{op} (backend='cpu') needs CPU tensors; {name} is on {t.device}")
    if name == "W" and t.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{op} (backend='cpu') takes float32, bfloat16 or float16 weights; W is "
                        f"{t.dtype} (use backend='torch' for other dtypes)")
    if name != "W" and t.dtype != dtype:
        why = "the dtype of W" if name in ("G", "buf") else "float32 bases"
        raise TypeError(f"{op} (backend='cpu'): {name} must be {dtype} ({why}), got {t.dtype}")


def _check_all(op: str, W, G, buf, U, V) -> None:
    _check("W", W, op)
    for name, t in (("G", G), ("buf", buf)):
        _check(name, t, op, W.dtype)
    for name, t in (("U", U), ("V", V)):
        _check(name, t, op)


def _raise_on(rc: int, op: str) -> None:
    if rc != 0:
        raise (MemoryError if rc == -1 else RuntimeError)(f"{op}: {_ERRORS.get(rc, rc)}")


def _item(t: torch.Tensor | None, i: int) -> int | None:
    """Address of t[i] (t[0] where t holds one item), NULL for None; t contiguous."""
    if t is None:
        return None
    return t.data_ptr() + (i * t.stride(0) * t.element_size() if t.shape[0] > 1 else 0)


def _threads_and_chunks(m: int, n: int) -> tuple[int, int]:
    """Threads for an m x n pass and its row chunks (as the kernel clamps them)."""
    threads = torch.get_num_threads() if m * n >= _PARALLEL_MIN else 1
    return threads, min(_CHUNKS_PER_THREAD * threads, -(-m // _ROWS))


def _padded_bases(U: torch.Tensor, V: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(kp, U, V): the bases contiguous and widened with zero columns to kp = k rounded up to 8
    (the kernel works on chunks of 8 / 16 sketch columns)."""
    k = U.shape[-1]
    kp = -(-k // 8) * 8
    if kp == k:
        return kp, U.contiguous(), V.contiguous()
    Up, Vp = (torch.nn.functional.pad(B, (0, kp - k)).contiguous() for B in (U, V))
    return kp, Up, Vp


def _sketch_buffers(b: int, m: int, n: int, kp: int, mode: int):
    """The kernel's outputs for ``mode``: Y (b, m, kp) and Z (b, n, kp) float32 where it writes
    them (else None), and the row sums of squares (b, m) float64."""
    f32 = {"dtype": torch.float32}  # whatever torch's default dtype
    Y = torch.empty(b, m, kp, **f32) if mode & (MODE_Y | MODE_POWER) else None
    Z = torch.empty(b, n, kp, **f32) if mode & (MODE_Z | MODE_POWER) else None
    return Y, Z, torch.empty(b, m, dtype=torch.float64)


def _sketch_out(Y, Z, row_sq: torch.Tensor, k: int, kp: int, sides: str) -> SketchOut:
    """The kernel's outputs (widths padded to kp) as the SketchOut of a k-wide sketch."""
    if kp != k:
        Y = None if Y is None else Y[..., :k]
        Z = None if Z is None else Z[..., :k]
    if sides == "power":
        return SketchOut(Y, None, row_sq.sum(dim=-1), row_sq, P=Z)
    return SketchOut(Y, Z, row_sq.sum(dim=-1), row_sq)


def _plain_lr(lr, op: str):
    """torch.optim.SGD reads a tensor lr as a scalar too; one that requires grad cannot be."""
    if isinstance(lr, torch.Tensor):
        if lr.requires_grad:
            raise ValueError(f"{op} takes a plain learning rate; a tensor lr that requires grad "
                             "needs backend='torch'")
        lr = lr.item()
    return lr


def launch(W: torch.Tensor, G: torch.Tensor | None, buf: torch.Tensor | None, U: torch.Tensor,
           V: torch.Tensor, *, sides: str, op: str, lr: float = 0.0, weight_decay: float = 0.0,
           momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
           maximize: bool = False):
    """Run the kernel over W (b, m, n), in place when G is given. Returns (SketchOut, buf)."""
    if sides not in _MODES:
        raise ValueError(f"sides must be one of {', '.join(SIDES)}; got {sides!r}")
    _check_all(op, W, G, buf, U, V)
    if W.dim() == 2:
        W = W.unsqueeze(0)
    b, m, n = W.shape
    k = U.shape[-1]
    if U.shape[-2:] != (m, k) or V.shape[-2:] != (n, k) or U.shape[0] not in (1, b) \
            or V.shape[0] not in (1, b):
        raise ValueError(f"{op}: bases of shapes {tuple(U.shape)}, {tuple(V.shape)} do not fit "
                         f"W of shape {tuple(W.shape)} (need (b, m, k) and (b, n, k))")
    if G is not None and G.numel() != W.numel():
        raise ValueError(f"{op}: G has shape {tuple(G.shape)}, W has {tuple(W.shape)}")
    lib = _loader.library()
    kp, Up, Vp = _padded_bases(U, V)
    mode = _MODES[sides]
    Y, Z, row_sq = _sketch_buffers(b, m, n, kp, mode)
    threads, chunks = _threads_and_chunks(m, n)
    zwork = torch.empty(chunks, n, kp, dtype=torch.float32) if Z is not None else None
    update = G is not None
    if update and not (W.is_contiguous() and (buf is None or buf.is_contiguous())):
        raise ValueError(f"{op}: the in-place update needs contiguous W and buf")
    wtype = WEIGHT_DTYPES[W.dtype]
    if update and wtype:  # 16-bit weights: torch's update, then the kernel's sketch of them
        buf = sgd_update_torch(W, G.reshape(W.shape), buf, lr=lr, weight_decay=weight_decay,
                               momentum=momentum, dampening=dampening, nesterov=nesterov,
                               maximize=maximize)
        G, update = None, False
    Wc = W.contiguous()  # sketch only: a copy where the layout needs one
    Gc = None if G is None else G.reshape(W.shape).contiguous()
    new_buf = update and momentum != 0 and buf is None
    if new_buf:
        buf = torch.empty_like(Wc)
    # torch.optim.SGD ignores the buffer without momentum; the kernel uses one where passed
    bufc = None if buf is None or not update or momentum == 0 else buf.reshape(W.shape)
    hyper = _loader.SgdHyper(float(lr), float(weight_decay), float(momentum),
                             float(1 - dampening), int(bool(nesterov)), int(bool(maximize)),
                             int(new_buf))
    # matrix i's pointers by offset: indexing each tensor costs more than the kernel of a small
    # matrix (a model's step calls this once per matrix)
    for i in range(b):
        _raise_on(lib.lowrank_sgd_sketch_f32(
            m, n, kp, _item(Wc, i), _item(Gc, i), _item(bufc, i), ctypes.byref(hyper),
            _item(Up, i), _item(Vp, i), _item(Y, i), _item(Z, i), _item(row_sq, i), mode,
            ptr(zwork), chunks, threads, wtype), op)
    return _sketch_out(Y, Z, row_sq, k, kp, sides), buf


def fused_sgd_sketch_cpu(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None,
                         U: torch.Tensor, V: torch.Tensor, *, lr, weight_decay: float = 0.0,
                         momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                         maximize: bool = False, sides: str = "both"
                         ) -> tuple[SketchOut, torch.Tensor | None]:
    """Update the parameter W in place (and the momentum buffer), then sketch the updated W
    (viewed as (1, m, n), conv kernels flattened) with U (1, m, k), V (1, n, k).

    ``sides``: "both", "y", "z", or "power" (Y = W V and P = W^T Y from one read of W; see
    :class:`lowrank.sketch.SketchOut`). ``buf`` None with momentum: a new buffer is returned
    (torch.optim.SGD's first step). Returns (SketchOut, buf).
    """
    lr = _plain_lr(lr, "fused_sgd_sketch_cpu")
    m = W.shape[0]
    shape = (1, m, W.numel() // m)
    W = W.detach()
    # channels_last conv weights (or any layout the kernel cannot address): the update runs on
    # contiguous copies, written back after.
    Wc = W if W.is_contiguous() else W.contiguous()
    bufc = buf if buf is None or buf.is_contiguous() else buf.contiguous()
    out, new_buf = launch(Wc.view(shape), G.detach(), None if bufc is None else bufc.view(shape),
                          U, V, sides=sides, op="fused_sgd_sketch_cpu", lr=lr,
                          weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, maximize=maximize)
    if Wc is not W:
        W.copy_(Wc)
    if buf is not None:
        if bufc is not buf:
            buf.copy_(bufc)
        return out, buf
    return out, None if new_buf is None else new_buf.view(W.shape)


def _update_16_bit(Ws, Gs, bufs, **hyper):
    """torch's SGD update of the 16-bit weights among Ws, tensor by tensor (torch.optim.SGD's
    single-tensor ops: its ``_foreach_*`` ops round 16-bit buffers otherwise). Returns (Gs,
    bufs) for the kernel: None gradients for the weights now updated (sketch only), and their
    buffers (new ones on the first step with momentum)."""
    Gs, bufs = list(Gs), list(bufs)
    for i, W in enumerate(Ws):
        if WEIGHT_DTYPES[W.dtype]:
            bufs[i] = sgd_update_torch(W, Gs[i], bufs[i], **hyper)
            Gs[i] = None
    return Gs, bufs


def _addr(t: torch.Tensor | None) -> int:
    """A tensor's address in a kernel's int64 table (0: NULL)."""
    return 0 if t is None else t.data_ptr()


def fused_sgd_sketch_cpu_list(Ws, Gs, bufs, Us, Vs, sides, *, lr=0.0, weight_decay: float = 0.0,
                              momentum: float = 0.0, dampening: float = 0.0,
                              nesterov: bool = False, maximize: bool = False):
    """:func:`fused_sgd_sketch_cpu` for several parameters of one param group, whatever their
    shapes, in one call of the kernel (a model's step otherwise returns to Python between
    matrices: 25-35 us of checks and allocations each, more than the pass of a small matrix).

    ``Ws``, ``Gs``, ``bufs``: contiguous (m, n) views of each parameter, its gradient and its
    momentum buffer (None: none yet; with momentum a new one is returned); ``Gs`` None: the
    sketch-only pass of every matrix (W not written, as :func:`lowrank.kernels.cpu.sketch.
    sketch_cpu`); ``Us`` (1, m, k), ``Vs`` (1, n, k); ``sides`` each matrix's sketch ("both",
    "y", "z" or "power"). Each matrix gets the bits that its own call gives it. Returns (list of
    SketchOut, list of buffers).
    """
    op = "fused_sgd_sketch_cpu_list"
    hyper = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
             "dampening": dampening, "nesterov": nesterov, "maximize": maximize}
    Gs, bufs = prepare_list(op, Ws, Gs, bufs, Us, Vs, hyper)
    table, outs, new_bufs = [], [], []
    for W, G, buf, U, V, side in zip(Ws, Gs, bufs, Us, Vs, sides):
        m, n = W.shape
        k = U.shape[-1]
        kp, U, V = _padded_bases(U, V)
        Y, Z, row_sq = _sketch_buffers(1, m, n, kp, _MODES[side])
        new_bufs.append(list_entry(table, W, G, buf, U, V, side, _addr(Y), _addr(Z),
                                   row_sq.data_ptr(), hyper["momentum"]))
        outs.append((Y, Z, row_sq, k, kp, side, U, V))  # U, V: padded copies live until the call
    run_list(table, hyper, op)
    sketches = [_sketch_out(Y, Z, row_sq, k, kp, side) for Y, Z, row_sq, k, kp, side, _, _ in outs]
    return sketches, new_bufs


def prepare_list(op: str, Ws, Gs, bufs, Us, Vs, hyper: dict):
    """Check the operands of a list call (raises before anything runs) and update the 16-bit
    weights among them by torch (their sketch follows in the kernel). Returns (Gs, bufs) as the
    kernel takes them: None gradients for a sketch-only call and for the weights now updated."""
    hyper["lr"] = _plain_lr(hyper["lr"], op)
    update = Gs is not None
    if not update:
        Gs = bufs = [None] * len(Ws)
    for W, G, buf, U, V in zip(Ws, Gs, bufs, Us, Vs):
        _check_all(op, W, G, buf, U, V)
        m, n = W.shape
        k = U.shape[-1]
        if U.shape != (1, m, k) or V.shape != (1, n, k) or (update and G.shape != W.shape):
            raise ValueError(f"{op}: W {tuple(W.shape)}, G "
                             f"{None if G is None else tuple(G.shape)}, U {tuple(U.shape)}, "
                             f"V {tuple(V.shape)} do not fit together")
        if not (W.is_contiguous() and (G is None or G.is_contiguous())
                and (buf is None or buf.is_contiguous())):
            raise ValueError(f"{op}: W, G and buf must be contiguous")
    if update:
        Gs, bufs = _update_16_bit(Ws, Gs, bufs, **hyper)
    return Gs, bufs


def list_entry(table: list, W, G, buf, U, V, side: str, Y: int, Z: int, row_sq: int,
               momentum: float):
    """Append one matrix's entry (sketch_entry of sgd_sketch.c) to ``table``: U, V padded to kp
    (:func:`_padded_bases`), outputs at addresses Y (m, kp), Z (n, kp) (0: not written) and
    row_sq (m) float64. Returns the matrix's momentum buffer (a new one where this step makes
    it)."""
    m, n = W.shape
    threads, chunks = _threads_and_chunks(m, n)
    buf_init = G is not None and momentum != 0 and buf is None
    if buf_init:
        buf = torch.empty_like(W)
    # torch.optim.SGD ignores the buffer without momentum; the kernel uses one where passed
    table += [m, n, U.shape[-1], W.data_ptr(), _addr(G),
              _addr(buf if momentum != 0 and G is not None else None), U.data_ptr(),
              V.data_ptr(), Y, Z, row_sq, _MODES[side], int(buf_init), chunks, threads,
              WEIGHT_DTYPES[W.dtype]]
    return buf


def run_list(table: list, hyper: dict, op: str) -> None:
    """Run the kernel over the entries of ``table`` (:func:`list_entry`), one call."""
    h = _loader.SgdHyper(float(hyper["lr"]), float(hyper["weight_decay"]),
                         float(hyper["momentum"]), float(1 - hyper["dampening"]),
                         int(bool(hyper["nesterov"])), int(bool(hyper["maximize"])), 0)
    entries = array.array("q", table)
    _raise_on(_loader.library().lowrank_sgd_sketch_many_f32(
        len(table) // _ENTRY_FIELDS, entries.buffer_info()[0], ctypes.byref(h)), op)


_ENTRY_FIELDS = 16  # int64 fields of sketch_entry (sgd_sketch.c)

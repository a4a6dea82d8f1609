"""CPU launcher of a whole tracked step of the sequential schedule: the fused update and power
sketch of every matrix (``sgd_sketch.c``), both sides of the post-processing
(``postprocess.c``), and the commit of each matrix's new state into its tracker's own tensors,
in place, from two kernel calls with no Python between them.

Reference and contract: :func:`lowrank.kernels.cpu.fused_sgd_sketch.fused_sgd_sketch_cpu_list`
with ``sides="power"``, then :func:`lowrank.kernels.cpu.postprocess.
postprocess_sequential_cpu_many` and the trackers' commit; the same kernels compute the same
bits (fro2, the sum of the row sums, is added in row order here, in torch's order there).

Why: after the pass over a large W has evicted the interpreter's data from the caches, every
Python object of the post-processing and of the commit costs several microseconds (a 2048^2 step
spent 0.4 ms in Python after its pass, a ResNet-like model's 1.5 ms). Here the outputs of the
pass and the post-processing go to two flat scratch buffers, and the state is written by the
kernel: the Python after the pass reads one status per matrix.
"""

from __future__ import annotations

import array

import torch

from lowrank import _checks
from lowrank.postprocess import _WELL_CONDITIONED
from lowrank.sketch import SketchOut

from . import _loader
from .fused_sgd_sketch import (
    WEIGHT_DTYPES,
    _padded_bases,
    _sketch_out,
    list_entry,
    prepare_list,
    run_list,
)
from .postprocess import KMAX, post_threads

# The state fields written in place (MatrixTracker's STATE_KEYS but the flags) and their dtype.
STATE_F32 = ("U", "V")
STATE_F64 = ("sigma", "sigma_prev", "sigma_y", "sigma_z", "overlap_u", "fro2", "row_sq")


def takes_state(state) -> bool:
    """Whether the kernel can step a tracker with this state: a sketch width <= KMAX and state
    tensors of the dtypes written here, contiguous. Checked once, when TrackedSet makes the
    tracker static: static state is then only ever written in place."""
    return (state.U.shape[-1] <= KMAX
            and all(getattr(state, f).dtype == torch.float32 and getattr(state, f).is_contiguous()
                    for f in STATE_F32)
            and all(getattr(state, f).dtype == torch.float64 and getattr(state, f).is_contiguous()
                    for f in STATE_F64)
            and state.nonfinite.dtype == torch.bool)


def takes_weight(W: torch.Tensor) -> bool:
    """Whether the kernel can step these weights (checked every step: a parameter's dtype or
    device can change under a tracker): CPU weights of a dtype the kernel reads, and host reads
    free (the statuses are read on the host: the no-sync tests switch that off)."""
    return _checks.host_reads_are_free(W) and W.is_cpu and W.dtype in WEIGHT_DTYPES


def fused_sequential_step_cpu_list(Ws, Gs, bufs, states, *, lr=0.0, weight_decay: float = 0.0,
                                   momentum: float = 0.0, dampening: float = 0.0,
                                   nesterov: bool = False, maximize: bool = False):
    """Update (``Gs`` given; None: sketch only) and power-sketch each matrix, post-process both
    sides of the sequential step, and write each new state into ``states[i]`` in place.

    ``Ws``, ``Gs``, ``bufs``: as :func:`~lowrank.kernels.cpu.fused_sgd_sketch.
    fused_sgd_sketch_cpu_list`. ``states``: per matrix an object with the tensors of a
    :class:`lowrank.tracking.MatrixTracker` (U (1, m, k), V (1, n, k) float32; sigma,
    sigma_prev, sigma_y, sigma_z (1, k), overlap_u (1, k, k), fro2 (1,), row_sq (1, m) float64;
    nonfinite (1,) bool), each its own contiguous memory (:func:`takes_state`), read (old bases)
    and then overwritten.

    Returns (buffers, rest): ``rest`` maps the index of each matrix whose state was left as it
    was (a sketch that is not finite, or one that needs the reference's refill or Cholesky-QR
    round) to its power sketch (a :class:`SketchOut`, views of this call's scratch), for the
    caller's reference path.
    """
    op = "fused_sequential_step_cpu_list"
    hyper = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
             "dampening": dampening, "nesterov": nesterov, "maximize": maximize}
    Us, Vs = [s.U for s in states], [s.V for s in states]
    Gs, bufs = prepare_list(op, Ws, Gs, bufs, Us, Vs, hyper)
    # Scratch, one float32 and one float64 buffer for the whole step: per matrix Y (m, kp) and
    # P (n, kp) from the pass, U_next (m, k) and V_next (n, k); row_sq (m), fro2 (1), sigma,
    # sigma_y, sigma_z (k), overlap_u, overlap_v (k, k).
    layout, n32, n64 = [], 0, 0
    for W, U in zip(Ws, Us):
        (m, n), k = W.shape, U.shape[-1]
        kp = -(-k // 8) * 8
        layout.append((m, n, k, kp, n32, n64))
        n32 += (m + n) * (kp + k)
        n64 += m + 1 + 3 * k + 2 * k * k
    f32 = torch.empty(n32, dtype=torch.float32)
    f64 = torch.empty(n64, dtype=torch.float64)
    a32, a64 = f32.data_ptr(), f64.data_ptr()
    passes, posts, commits, new_bufs, keep = [], [], [], [], []
    for W, G, buf, U, V, state, (m, n, k, kp, o32, o64) in zip(Ws, Gs, bufs, Us, Vs, states,
                                                                 layout):
        y, p = a32 + 4 * o32, a32 + 4 * (o32 + m * kp)
        u_next, v_next = p + 4 * n * kp, p + 4 * (n * kp + m * k)
        row_sq, fro2 = a64 + 8 * o64, a64 + 8 * (o64 + m)
        sigma = fro2 + 8
        sigma_y, sigma_z, ou = sigma + 8 * k, sigma + 16 * k, sigma + 24 * k
        ov = ou + 8 * k * k
        _, Up, Vp = _padded_bases(U, V)
        keep += [Up, Vp]  # padded copies (k not a multiple of 8) live until the call
        new_bufs.append(list_entry(passes, W, G, buf, Up, Vp, "power", y, p, row_sq,
                                   hyper["momentum"]))
        # sequential_entry of postprocess.c: m, n, k, Y, ldy, U_old, P, ldp, V_old, fro2,
        # U_next, V_next, sigma, sigma_y, sigma_z, overlap_u, overlap_v
        posts += [m, n, k, y, kp, U.data_ptr(), p, kp, V.data_ptr(), fro2, u_next, v_next,
                  sigma, sigma_y, sigma_z, ou, ov]
        commits += [row_sq, fro2, U.data_ptr(), V.data_ptr(),
                    *(getattr(state, f).data_ptr() for f in STATE_F64),
                    state.nonfinite.data_ptr()]
    run_list(passes, hyper, op)
    count = len(states)
    status = torch.empty(count, dtype=torch.int32)
    post_table, commit_table = array.array("q", posts), array.array("q", commits)
    rc = _loader.library().lowrank_postprocess_sequential_commit(
        count, post_table.buffer_info()[0], commit_table.buffer_info()[0],
        _WELL_CONDITIONED[torch.float32], status.data_ptr(),
        post_threads((m, n) for m, n, *_ in layout))
    if rc < 0:
        raise MemoryError(f"{op}: the post-processing could not run ({count} matrices)")
    rest = {}
    if rc:
        for i, st in enumerate(status.tolist()):
            if st:
                rest[i] = _sketch(f32, f64, layout[i])
    return new_bufs, rest


def _sketch(f32: torch.Tensor, f64: torch.Tensor, item) -> SketchOut:
    """The power sketch of one matrix, views of the scratch, as the list pass returns it."""
    m, n, k, kp, o32, o64 = item
    Y = f32[o32:o32 + m * kp].view(1, m, kp)
    P = f32[o32 + m * kp:o32 + (m + n) * kp].view(1, n, kp)
    return _sketch_out(Y, P, f64[o64:o64 + m].view(1, m), k, kp, "power")


__all__ = ["fused_sequential_step_cpu_list", "takes_state", "takes_weight"]

"""CPU launcher of the post-processing of one side (kernel: ``postprocess.c``).

Reference and contract: the fast path of :func:`lowrank.postprocess.postprocess_side_torch`
(same float64 math; the k x k eigenproblem is solved by Jacobi instead of LAPACK, so results
agree to float64 rounding, and within a cluster of equal singular values the basis may differ by
a rotation). The torch path costs ~20 small torch operations per side (0.3-0.8 ms for a
1024 x 16 sketch on a 2-core CPU); this is one call.
"""

from __future__ import annotations

import array

import torch

from lowrank import _checks
from lowrank.postprocess import _WELL_CONDITIONED, PostOut, postprocess_torch

from . import _loader
from ._loader import ptr

KMAX = 32  # KMAX of postprocess.c: wider sketches take the torch path (faster there)
_CHUNK = 256  # CHUNK of postprocess.c: rows per task (threads only help past one chunk)


def supported(S: torch.Tensor, B_old: torch.Tensor) -> bool:
    """Whether :func:`postprocess_side_cpu` takes these operands (else use the torch path).
    Its status is read on the host: free on the CPU (the no-sync tests switch that off)."""
    return (_checks.host_reads_are_free(S) and B_old.device.type == "cpu"
            and S.dtype in (torch.float32, torch.float64) and B_old.dtype == torch.float32
            and 1 <= S.shape[-1] <= KMAX and S.shape == B_old.shape and S.dim() == 3)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (b, p, k) as a tensor whose rows the kernel can step through, and the row stride."""
    if t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


def postprocess_side_cpu(S: torch.Tensor, B_old: torch.Tensor, *, P: torch.Tensor | None = None):
    """One side's fast-path post-processing of the sketches S (b, p, k) (float32 or float64)
    against the float32 bases B_old (b, p, k).

    Returns (Q (b, p, k) float32, sigma (b, k), overlap B_old^T Q (b, k, k), T (b, k, k) with
    Q = S T, PT (b, n, k) = P T or None), all but Q float64; or None when any matrix of the batch
    is not finite or needs the general path (refill, Cholesky-QR): the caller then runs the
    torch reference on the batch. Call only where :func:`supported` holds.
    """
    b, p, k = S.shape
    lib = _loader.library()
    S, lds = _rows(S)
    B_old = B_old.contiguous()
    f64 = dict(dtype=torch.float64)
    Q = torch.empty(b, p, k, dtype=torch.float32)
    sigma = torch.empty(b, k, **f64)
    overlap, T = torch.empty(b, k, k, **f64), torch.empty(b, k, k, **f64)
    status = torch.empty(b, dtype=torch.int32)
    if P is not None:
        P, ldp = _rows(P)
        n = P.shape[1]
        PT = torch.empty(b, n, k, **f64)
    else:
        n, ldp, PT = 0, 0, None
    tasks = b * (-(-p // _CHUNK) + -(-n // _CHUNK))
    threads = min(torch.get_num_threads(), tasks)
    rc = lib.lowrank_postprocess_side(b, p, k, ptr(S), int(S.dtype == torch.float64), lds,
                                      ptr(B_old), ptr(Q), ptr(sigma), ptr(overlap), ptr(T),
                                      ptr(P), n, ldp, ptr(PT), _WELL_CONDITIONED[torch.float32],
                                      ptr(status), threads)
    if rc < 0:
        raise MemoryError(f"postprocess_side_cpu: the kernel could not run (k={k}, b={b})")
    if rc > 0:  # some matrix needs the reference path
        return None
    return Q, sigma, overlap, T, PT


def postprocess_cpu(Y: torch.Tensor, Z: torch.Tensor, U_old: torch.Tensor, V_old: torch.Tensor,
                    *, seed: int = 0, step: int = 0, refill=None) -> PostOut:
    """Op ``postprocess`` (both sides) on the CPU: the kernel's fast path for each side where it
    applies to the whole batch, else :func:`lowrank.postprocess.postprocess_torch` (same
    arguments and result)."""
    if supported(Y, U_old) and supported(Z, V_old):
        y = postprocess_side_cpu(Y, U_old)
        z = postprocess_side_cpu(Z, V_old) if y is not None else None
        if z is not None:
            return PostOut(torch.maximum(y[1], z[1]), y[1], z[1], y[0], z[0], y[2], z[2])
    return postprocess_torch(Y, Z, U_old, V_old, seed=seed, step=step, refill=refill)


def postprocess_sequential_cpu_many(groups) -> list[tuple[PostOut, list[bool]]]:
    """Both sides of a sequential-schedule step for the matrices of a whole step, whatever their
    shapes, in one call (one parallel region: the threads share the small matrices' work
    instead of each matrix waiting for the one before): per matrix, Y = W V against U_old, then
    Z = P T_y (P = W^T Y) against V_old; the fast path of
    :func:`lowrank.tracking.absorb_sequential` for each side (float64 math).

    ``groups``: (Ys, Us, Ps, Vs, fro2s), lists of one group of same-shape m x n matrices: Y
    (1, m, k) and P (1, n, k) float32 with unit column stride, U_old (1, m, k) and V_old
    (1, n, k) float32 contiguous, fro2 None or ||W||_F^2 (one float64). Call only where
    :func:`supported` holds for each (Y, U_old) and (P, V_old).

    Returns per group (post, ok): ``post`` a :class:`PostOut` batched over the group (U_next
    and V_next float32; sigma the larger of the two sides' estimates) and ``ok`` per matrix:
    False where its sketch or fro2 is not finite or it needs the general path (refill,
    Cholesky-QR round), whose outputs are then not written: the caller runs the reference for
    it. A matrix's results do not depend on the others of the call.
    """
    lib = _loader.library()
    f64 = dict(dtype=torch.float64)
    table, outs, keep = [], [], []  # keep: operands copied here live until the call returns
    for Ys, Us, Ps, Vs, fro2s in groups:
        b = len(Ys)
        _, m, k = Ys[0].shape
        n = Ps[0].shape[-2]
        post = PostOut(torch.empty(b, k, **f64), torch.empty(b, k, **f64),
                       torch.empty(b, k, **f64), torch.empty(b, m, k, dtype=torch.float32),
                       torch.empty(b, n, k, dtype=torch.float32), torch.empty(b, k, k, **f64),
                       torch.empty(b, k, k, **f64))
        outs.append(post)
        addr = [t.data_ptr() for t in post]
        size = [t.numel() // b * t.element_size() for t in post]
        for j, (Y, U, P, V, fro2) in enumerate(zip(Ys, Us, Ps, Vs, fro2s)):
            Y, ldy = _rows(Y)
            P, ldp = _rows(P)
            U, V = U.contiguous(), V.contiguous()
            if fro2 is not None and fro2.dtype != torch.float64:
                fro2 = fro2.to(torch.float64)
            keep += [Y, P, U, V, fro2]
            o = [a + j * z for a, z in zip(addr, size)]  # sigma, sigma_y, sigma_z, U, V, ou, ov
            table += [m, n, k, Y.data_ptr(), ldy, U.data_ptr(), P.data_ptr(), ldp, V.data_ptr(),
                      0 if fro2 is None else fro2.data_ptr(), o[3], o[4], o[0], o[1], o[2], o[5],
                      o[6]]
    count = len(table) // _ENTRY_FIELDS
    entries = array.array("q", table)
    status = torch.empty(count, dtype=torch.int32)
    threads = post_threads((Ys[0].shape[-2], Ps[0].shape[-2]) for Ys, _, Ps, _, _ in groups
                           for _ in Ys)
    rc = lib.lowrank_postprocess_sequential_many(count, entries.buffer_info()[0],
                                                 _WELL_CONDITIONED[torch.float32], ptr(status),
                                                 threads)
    if rc < 0:
        raise MemoryError(f"postprocess_sequential_cpu_many: the kernel could not run "
                          f"({count} matrices)")
    ok = (status == 0).tolist()
    result, start = [], 0
    for post, (Ys, *_) in zip(outs, groups):
        result.append((post, ok[start:start + len(Ys)]))
        start += len(Ys)
    return result


_ENTRY_FIELDS = 17  # int64 fields of sequential_entry (postprocess.c)


def post_threads(shapes) -> int:
    """Threads of a sequential post-processing of matrices of ``shapes`` (m, n): torch's, at
    most one per task of its largest stage (a row chunk of the longer side of each matrix)."""
    tasks = sum(-(-max(m, n) // _CHUNK) for m, n in shapes)
    return min(torch.get_num_threads(), max(tasks, 1))


def postprocess_sequential_cpu(Y: torch.Tensor, U_old: torch.Tensor, P: torch.Tensor,
                               V_old: torch.Tensor, fro2: torch.Tensor | None = None):
    """:func:`postprocess_sequential_cpu_many` for one batch of same-shape matrices: Y
    (b, m, k), U_old (b, m, k), P (b, n, k), V_old (b, n, k), fro2 (b,) or None. Returns the
    batched :class:`PostOut`, or None when any matrix needs the reference path."""
    b = Y.shape[0]
    one = [[t[i:i + 1] for i in range(b)] for t in (Y, U_old, P, V_old)]
    fro2s = [None] * b if fro2 is None else [fro2[i:i + 1] for i in range(b)]
    (post, ok), = postprocess_sequential_cpu_many([(*one, fro2s)])
    return post if all(ok) else None

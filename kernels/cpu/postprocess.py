"""CPU launcher of the post-processing of one side (kernel: ``postprocess.c``).

Reference and contract: the fast path of :func:`lowrank.postprocess.postprocess_side_torch`
(same float64 math; the k x k eigenproblem is solved by Jacobi instead of LAPACK, so results
agree to float64 rounding, and within a cluster of equal singular values the basis may differ by
a rotation). The torch path costs ~20 small torch operations per side (0.3-0.8 ms for a
1024 x 16 sketch on a 2-core CPU); this is one call.
"""

from __future__ import annotations

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


def postprocess_sequential_cpu(Y: torch.Tensor, U_old: torch.Tensor, P: torch.Tensor,
                               V_old: torch.Tensor, fro2: torch.Tensor | None = None):
    """Both sides of a sequential-schedule step for a batch of m x n matrices, in one call:
    Y = W V (b, m, k) against U_old, then Z = P T_y (P = W^T Y, (b, n, k)) against V_old; the
    fast path of :func:`lowrank.tracking.absorb_sequential` for each side (float64 math).

    Returns a :class:`PostOut` (U_next and V_next float32; sigma the larger of the two sides'
    estimates), or None when any matrix of the batch is not finite (its ``fro2`` (b,) included)
    or needs the general path: the caller then runs the reference on the batch. Call only where
    :func:`supported` holds for (Y, U_old) and (P, V_old), all float32 and contiguous.
    """
    b, m, k = Y.shape
    n = P.shape[1]
    lib = _loader.library()
    f64 = dict(dtype=torch.float64)
    Y, P, U_old, V_old = (t.contiguous() for t in (Y, P, U_old, V_old))
    U_next, V_next = (torch.empty(b, d, k, dtype=torch.float32) for d in (m, n))
    sigma, sigma_y, sigma_z = (torch.empty(b, k, **f64) for _ in range(3))
    overlap_u, overlap_v = torch.empty(b, k, k, **f64), torch.empty(b, k, k, **f64)
    status = torch.empty(b, dtype=torch.int32)
    fro2 = None if fro2 is None else fro2.to(torch.float64).contiguous()
    threads = min(torch.get_num_threads(), b * -(-max(m, n) // _CHUNK))
    rc = lib.lowrank_postprocess_sequential(
        b, m, n, k, ptr(Y), ptr(U_old), ptr(P), ptr(V_old), ptr(fro2), ptr(U_next), ptr(V_next),
        ptr(sigma), ptr(sigma_y), ptr(sigma_z), ptr(overlap_u), ptr(overlap_v),
        _WELL_CONDITIONED[torch.float32], ptr(status), threads)
    if rc < 0:
        raise MemoryError(f"postprocess_sequential_cpu: the kernel could not run (k={k}, b={b})")
    if rc > 0:
        return None
    return PostOut(sigma, sigma_y, sigma_z, U_next, V_next, overlap_u, overlap_v)

"""Triton kernels of the post-processing, so that the Triton backend needs no CuPy to run a GPU
step without a host synchronisation.

The post-processing (:func:`lowrank.postprocess.postprocess_torch`) is small float64 linear
algebra on k x k Gram matrices and p x k sketches. Two of its pieces synchronise the host or
cannot be captured in a CUDA graph when written in torch:

- ``torch.linalg.eigh`` checks cuSOLVER's error flags on the host, once per call (2 per group
  and step). Op ``gram_eigh`` replaces it: a batched parallel Jacobi solver, one program per
  matrix, the k x k matrix and its eigenvectors in registers, the sweep loop and its stopping
  test on the device.
- The refill candidates come from a ``torch.Generator`` seeded with the step, a host value.
  Op ``refill_candidates`` replaces it: counter-based normals (``tl.randn``, Philox) keyed by
  (seed, step, side, index in the group), where the step may be a device scalar that a replayed
  CUDA graph advances, as the CuPy kernel does.

Everything else stays the torch reference's code (``cholesky_ex``, triangular solves, matmuls,
``torch.where`` selections: none of them reads the device from the host), so this backend's
results are the reference's up to the eigensolver's rounding and the refill candidates.
:func:`postprocess_triton` puts the three together.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowrank.postprocess import PostOut, postprocess_torch

from .sketch import check_device

# Widest Gram matrix the one-program solver takes: A and its eigenvectors, 2 K^2 doubles, are
# spread over the program's registers (K = 128 and 16 warps: 64 doubles a thread).
MAX_K = 128  # lowrank.backends.TRITON_POST_MAX_K routes on it (a test checks they agree)
# The sweeps stop when ||offdiag(A)||_F <= JACOBI_TOL ||A||_F, the level of a backward-stable
# solver (as the CuPy kernel's); MAX_SWEEPS only bounds a pathological stall (a NaN or Inf
# input fails the test at once: no sweep).
JACOBI_TOL = 1e-15
MAX_SWEEPS = 40


@triton.jit
def _gram_eigh_kernel(a_ptr, evals_ptr, evecs_ptr, sweeps_ptr, k, tol2, max_sweeps,
                      K: tl.constexpr):
    """Eigenvalues (descending) and eigenvectors of the symmetric k x k matrix of program b.

    Parallel cyclic Jacobi: a sweep is K - 1 rounds, and a round rotates K / 2 disjoint pairs of
    indices at once (the round-robin "circle" pairing over K players), so that a round is a few
    whole-matrix operations: A <- J^T A J and V <- V J, where J has two entries per row. The
    matrix is padded to K (a power of two) with zero rows and columns: a pair with a padded
    index has a zero off-diagonal entry, so its rotation is the identity.
    """
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, K)
    rows, cols = idx[:, None], idx[None, :]
    inside = (rows < k) & (cols < k)
    base = b * k * k
    A = tl.load(a_ptr + base + rows * k + cols, mask=inside, other=0.0).to(tl.float64)
    A = tl.where(rows >= cols, A, tl.trans(A))  # the lower triangle, as torch.linalg.eigh reads
    # Scale by a power of two (exact) to bring max |a| into [1, 2): the squares summed below
    # neither overflow (|a| > 1e154) nor underflow (|a| < 1e-154) on any finite input.
    amax = tl.max(tl.max(tl.abs(A), axis=1), axis=0)
    finite_max = (amax > 0.0) & (amax < float("inf"))
    expo = tl.floor(tl.log2(tl.where(finite_max, amax, 1.0)))
    scale = tl.exp2(tl.minimum(tl.maximum(-expo, -1000.0), 1000.0))
    A = A * scale
    diag = rows == cols
    V = tl.where(diag, 1.0, 0.0).to(tl.float64)
    total = tl.sum(tl.sum(A * A, axis=1), axis=0)
    off = tl.sum(tl.sum(tl.where(diag, 0.0, A * A), axis=1), axis=0)
    sweep = 0
    while (off > tol2 * total) & (sweep < max_sweeps):
        for r in range(K - 1):
            # Round r pairs i with (r - i) mod (K - 1); the index that would pair with itself
            # pairs with K - 1 instead, and K - 1 with the i where 2 i = r mod (K - 1), i.e.
            # i = r K / 2 mod (K - 1) (K / 2 is the inverse of 2 modulo the odd K - 1).
            partner = (r + (K - 1) - idx) % (K - 1)
            partner = tl.where(partner == idx, K - 1, partner)
            partner = tl.where(idx == K - 1, (r * (K // 2)) % (K - 1), partner)
            is_low = idx < partner
            d = tl.sum(tl.where(diag, A, 0.0), axis=1)
            d_partner = tl.sum(tl.where(cols == partner[:, None], d[None, :], 0.0), axis=1)
            # a_pq of the pair (p < q) from row p, read by both members, so that both compute
            # the same rotation bit for bit (A is symmetric only up to rounding).
            a_row = tl.sum(tl.where(cols == partner[:, None], A, 0.0), axis=1)  # A[i, partner]
            a_col = tl.sum(tl.where(rows == partner[None, :], A, 0.0), axis=0)  # A[partner, i]
            a_pq = tl.where(is_low, a_row, a_col)
            a_pp = tl.where(is_low, d, d_partner)
            a_qq = tl.where(is_low, d_partner, d)
            # Golub & Van Loan's symmetric Schur 2x2: t = tan of the angle that zeroes a_pq.
            zero = a_pq == 0.0
            theta = (a_qq - a_pp) / (2.0 * tl.where(zero, 1.0, a_pq))
            t = tl.where(theta >= 0.0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
            t = tl.where(zero, 0.0, t)
            c = 1.0 / tl.sqrt(t * t + 1.0)
            # J[p, p] = J[q, q] = c, J[p, q] = s, J[q, p] = -s: column j of A J is
            # c A[:, j] + sgn_j s A[:, partner_j] with sgn = -1 on the low member, +1 on the high.
            sgn_s = tl.where(is_low, -1.0, 1.0) * t * c
            by_col = tl.broadcast_to(partner[None, :], (K, K))
            by_row = tl.broadcast_to(partner[:, None], (K, K))
            A = A * c[None, :] + tl.gather(A, by_col, axis=1) * sgn_s[None, :]
            A = A * c[:, None] + tl.gather(A, by_row, axis=0) * sgn_s[:, None]
            A = tl.where(cols == partner[:, None], 0.0, A)  # the zeroed pair, exactly
            V = V * c[None, :] + tl.gather(V, by_col, axis=1) * sgn_s[None, :]
        off = tl.sum(tl.sum(tl.where(diag, 0.0, A * A), axis=1), axis=0)
        sweep += 1
    lam = tl.sum(tl.where(diag, A, 0.0), axis=1) / scale
    # Descending order, padding last: rank_i = #{j before i in the order}; order[r] = the i of
    # rank r. Ties keep index order, so the permutation is exact.
    key = tl.where(idx < k, lam, float("-inf"))
    before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (cols < rows))
    rank = tl.sum(before.to(tl.int32), axis=1)
    order = tl.sum(tl.where(rank[:, None] == cols, rows, 0), axis=0)
    lam_sorted = tl.sum(tl.where(rank[:, None] == cols, lam[:, None], 0.0), axis=0)
    V_sorted = tl.gather(V, tl.broadcast_to(order[None, :], (K, K)), axis=1)
    # A non-finite input gives NaN everywhere, not a mix of numbers and NaN that could pass for
    # a spectrum (its stopping test is false on NaN and Inf: no sweep ran). After the scaling a
    # finite input has a finite total.
    bad = (total != total) | (total == float("inf"))  # noqa: PLR0124 (a NaN test in Triton)
    lam_sorted = tl.where(bad, float("nan"), lam_sorted)
    V_sorted = tl.where(bad, float("nan"), V_sorted)
    tl.store(evals_ptr + b * k + idx, lam_sorted, mask=idx < k)
    tl.store(evecs_ptr + base + rows * k + cols, V_sorted, mask=inside)
    tl.store(sweeps_ptr + b, sweep)


def _pad(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def shared_bytes(k: int) -> int:
    """Shared memory of the eigensolver at width k: one K x K float64 buffer (its gathers and
    layout conversions; ptxas through Triton 3.6 and 3.9 reports 8 K^2 bytes, K = 16 .. 128)."""
    return 8 * _pad(k) ** 2


@functools.cache
def _shared_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 49152))


def fits(k: int, device: torch.device) -> bool:
    """Whether the eigensolver takes width k on ``device``: k <= MAX_K and its shared memory
    within the device's per-block limit (K = 128 needs 128 KB: H100 and A100 yes, sm_86/89
    GPUs with about 100 KB no)."""
    if k > MAX_K:
        return False
    if device.type != "cuda":
        return True  # the interpreter
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_bytes(k) <= _shared_limit(index)


def _num_warps(K: int) -> int:
    """Warps for a K x K solve: the fewest that compile for sm_90 without register spills
    (ptxas through Triton 3.6 and 3.9: 4 at K <= 16, 8 at 32, 16 at 64; K = 128 spills at any
    count). Not yet timed on a GPU."""
    return min(16, max(4, K * K // 128))


def gram_eigh_triton(A: torch.Tensor, *, max_sweeps: int = MAX_SWEEPS, return_sweeps: bool = False):
    """Op ``gram_eigh``: eigenvalues in descending order and eigenvectors of a batch of symmetric
    k x k matrices (b, k, k), in float64, without a host synchronisation; reads the lower
    triangle. Contract and reference: :func:`lowrank.postprocess.gram_eigh_torch`. The
    eigenvectors agree with the reference's up to the sign of each column (and a rotation
    within a cluster of equal eigenvalues). Returns (evals (b, k), evecs (b, k, k)), and with
    ``return_sweeps`` the Jacobi sweeps each matrix took, (b,) int32 (tests, benchmarks)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"gram_eigh_triton: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 3 or A.shape[-1] != A.shape[-2] or A.shape[-1] < 1:
        raise ValueError(f"gram_eigh_triton: A must be (b, k, k); got shape {tuple(A.shape)}")
    k = A.shape[-1]
    if k > MAX_K:
        raise ValueError(f"gram_eigh_triton: k={k} exceeds the one-program solver's {MAX_K}")
    if not A.is_floating_point():
        raise TypeError(f"gram_eigh_triton: A must be floating point; got {A.dtype}")
    check_device(A, names=("A",))
    A = A.to(torch.float64).contiguous()
    b = A.shape[0]
    evals = torch.empty((b, k), dtype=torch.float64, device=A.device)
    evecs = torch.empty((b, k, k), dtype=torch.float64, device=A.device)
    sweeps = torch.zeros((b,), dtype=torch.int32, device=A.device)
    if b > 0:
        K = _pad(k)
        _gram_eigh_kernel[(b,)](A, evals, evecs, sweeps, k, JACOBI_TOL**2, max_sweeps, K=K,
                                num_warps=_num_warps(K))
    return (evals, evecs, sweeps) if return_sweeps else (evals, evecs)


# One compiled variant for every call: an int step and a device step run the same binary (the
# branch is a runtime one), and no argument is specialised on its value (1, multiples of 16).
# A CUDA graph capture that met a variant for the first time would have to load it, which a
# capture does not allow: eager steps pass an int step, captured ones the device counter.
@triton.jit(do_not_specialize=["seed", "step", "step_on_device", "side"])
def _refill_kernel(r_ptr, seed, step, step_ptr, step_on_device, side, p, k, BLOCK: tl.constexpr):
    """Standard normal candidates R[b] (p x k) from Philox keyed by (seed, 2 step + side, b);
    the step is read from ``step_ptr`` (int64) where ``step_on_device`` is nonzero."""
    b = tl.program_id(1).to(tl.int64)
    # int64 throughout: a small int argument arrives as int32, and the key must not depend on
    # whether the step came as an int or from the device.
    zero = tl.zeros((), dtype=tl.int64)
    step = zero + step
    if step_on_device != 0:
        step = tl.load(step_ptr).to(tl.int64)
    seed = zero + seed
    # One 64-bit Philox key per matrix and side: refill_candidates' mix of seed and
    # 2 step + side, then the index in the group (distinct below a million matrices a group).
    key = (seed * 7919 + 2 * step + side) * 1000003 + b
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < p * k
    values = tl.randn(key, offs).to(tl.float64)
    tl.store(r_ptr + b * p * k + offs, values, mask=mask)


REFILL_BLOCK = 1024


def refill_candidates_triton(shape, seed: int, step, side: int, device) -> torch.Tensor:
    """Op ``refill_candidates`` on the device: (b, p, k) float64 standard normals, deterministic
    in (seed, step, side, index in the batch), drawn without a generator's host state, so the
    call can be captured in a CUDA graph. ``step``: an int, or a 1-element integer tensor on
    ``device`` that the kernel reads (a replayed graph advances it). The numbers differ from
    :func:`lowrank.postprocess.refill_candidates`' (another generator); any Gaussian candidates
    serve the refill."""
    b, p, k = (int(x) for x in shape)
    if p * k >= 2**31:
        raise ValueError(f"refill_candidates_triton: p * k = {p * k} needs 64-bit counters")
    R = torch.empty((b, p, k), dtype=torch.float64, device=device)
    if R.numel() == 0:
        return R
    on_device = isinstance(step, torch.Tensor)
    if on_device:
        if step.numel() != 1 or step.device != R.device or step.is_floating_point():
            raise ValueError("refill_candidates_triton: a tensor step must be one integer on the "
                             f"candidates' device; got {tuple(step.shape)} {step.dtype} on {step.device}")
        step_ptr = step.reshape(1).to(torch.int64)  # a device op (no sync) where not int64
    else:
        step_ptr = R.view(torch.int64)  # not read: any int64 pointer of the same alignment
    grid = (triton.cdiv(p * k, REFILL_BLOCK), b)
    _refill_kernel[grid](R, int(seed) % 2**62, 0 if on_device else int(step), step_ptr,
                         int(on_device), int(side), p, k, BLOCK=REFILL_BLOCK)
    return R


def postprocess_triton(Y: torch.Tensor, Z: torch.Tensor, U_old: torch.Tensor,
                       V_old: torch.Tensor, *, seed: int = 0, step=0, refill=None) -> PostOut:
    """Op ``postprocess`` with no host synchronisation and nothing a CUDA graph cannot capture:
    the torch reference's math (:func:`lowrank.postprocess.postprocess_torch`) with
    :func:`gram_eigh_triton` for its eigendecompositions and :func:`refill_candidates_triton`
    for its refill candidates (``step`` may be a device scalar). ``refill`` = (Ry, Rz) tensors
    gives the candidates instead (the tests pass the reference's). Needs k <= :data:`MAX_K`."""
    b, m, k = Y.shape
    n = Z.shape[-2]
    if refill is None:
        refill = (lambda: refill_candidates_triton((b, m, k), seed, step, 0, Y.device),
                  lambda: refill_candidates_triton((b, n, k), seed, step, 1, Z.device))
    return postprocess_torch(Y, Z, U_old, V_old, seed=seed, refill=refill, eigh=gram_eigh_triton)

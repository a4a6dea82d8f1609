"""CuPy launcher of op ``postprocess``: batched float64 spectra, Ritz bases, refill, overlaps.

Kernels: ``postprocess.cu`` (its header comment gives the pipeline and the numerics). Contract
and reference: :func:`lowrank.postprocess.postprocess_torch`; returns the same
:class:`lowrank.postprocess.PostOut`.

Differences from the reference, by design:

- Refill candidates for rank-deficient directions come from a counter-based hash (splitmix64 +
  Box-Muller) of (seed, 2 step + side, batch, row, column), not from a torch.Generator: no
  generator state, so the call is safe inside CUDA graph capture, and ``step`` may be a CUDA
  tensor read by the kernel (a replayed graph then advances it). The candidates differ from the
  reference's, so refilled columns agree with it only as a subspace (the orthogonal complement
  of the kept directions). Pass ``refill=(Ry, Rz)`` to use given candidates instead (the tests
  pass the reference's to compare column by column).
- Eigenvectors come from a Jacobi solver, cuSOLVER's from another algorithm: columns of U/V (and
  of the overlaps) may differ in sign from the reference, and within clusters of (nearly) equal
  singular values by a rotation. Sigma, the spanned subspaces, orthonormality and the singular
  values of the overlaps are the same to float64 rounding.

No host synchronisation, no data-dependent branch on the host, no CuPy allocation: every buffer
is a torch tensor on the caller's current stream, so the function can be captured in a CUDA
graph once it has run eagerly (compilation and module loading happen on the first call).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from lowrank.postprocess import PostOut

from . import _loader

CU = "postprocess.cu"
THREADS, TILE = 256, 32  # PP_THREADS, PP_T in the .cu
# Jacobi stops when ||offdiag(A)||_F <= JACOBI_TOL ||A||_F (backward-stable level, reached in
# 6-10 sweeps for k <= 64); MAX_SWEEPS only guards against a pathological stall.
JACOBI_TOL = 1e-15
MAX_SWEEPS = 40
_SKETCH = {torch.float32: "f32", torch.float64: "f64"}
_BASIS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def eig_shared_bytes(k: int, v_shared: bool) -> int:
    """Dynamic shared memory of pp_eig (layout in the kernel: A, [V], lam, scale, 6 pair arrays,
    32 reduction slots, then int pair indices and the permutation)."""
    npairs = (k + 1) // 2
    return 8 * (k * k * (2 if v_shared else 1) + 2 * k + 6 * npairs + 32) + 4 * (2 * npairs + k)


def _ceil_div(a: int, b: int) -> int:
    return -(a // -b)


def _tiles(rows: int) -> int:
    """Whole TILE-row tiles that hold ``rows``."""
    return _ceil_div(rows, TILE)


def _rows_per_chunk(rows: int, k: int, sms: int) -> int:
    """Most rows of a Gram chunk, one bound for every problem of a call: about 4 blocks per SM
    over all the call's rows (a Gram block computes one 32 x 32 tile of one of 2 terms), and
    >= 256 rows, so a chunk's partial k x k sums stay few beside its rows. A multiple of TILE.
    A problem of p rows gets ceil(p / bound) chunks of equal rows (:func:`_problem_chunks`)."""
    nt = _tiles(k)
    chunks = max(1, _ceil_div(4 * sms, 2 * nt * nt))
    return max(256, _tiles(_ceil_div(rows, chunks)) * TILE)


NULL = np.uint64(0)
EIG_HEADROOM = 1024  # bytes kept below the device's opt-in shared memory limit
_ALIGN = 32  # workspace offsets in doubles: 256-byte aligned, as an allocation of its own is


class _Plan(NamedTuple):
    rows_per_chunk: int  # the bound on a Gram chunk's rows (every pass, every problem)
    tiles: int  # 32-row tiles of all problems: the grid of refill and apply
    chunks: int  # Gram chunks of all problems: the grid of the Gram passes
    offsets: dict  # workspace name -> offset in doubles
    total: int  # doubles in the workspace


# Columns of the problem table (TAB_* in the .cu): p, first workspace row, old basis address,
# refill seed, index in the group, first tile, first Gram chunk, number of Gram chunks, rows
# of a Gram chunk.
TAB_P, TAB_ROW0, TAB_OLD, TAB_SEED, TAB_INDEX, TAB_TILE0, TAB_CHUNK0, TAB_NCHUNK, TAB_CROWS = range(9)


def _problem_chunks(p: int, bound: int) -> tuple[int, int]:
    """A problem's Gram chunks: their number and their rows (equal, whole tiles, the last one
    cut at p), so that a chunk just over the bound does not leave one long and one short."""
    chunks = _ceil_div(p, bound)
    return chunks, _tiles(_ceil_div(p, chunks)) * TILE


@functools.lru_cache(maxsize=256)
def _plan(dims: tuple, k: int, sketch_bytes: int, v_shared: bool, sms: int) -> _Plan:
    """Grid split and workspace layout of one set of problem sizes (host arithmetic, cached).
    ``dims``: (b, m, n) of each group; ``sketch_bytes``: the size of a sketch entry."""
    b = sum(g[0] for g in dims)
    rows = sum(g[0] * (g[1] + g[2]) for g in dims)  # every problem's rows, stacked
    z2 = 2 * b
    per_chunk = _rows_per_chunk(rows, k, sms)
    tiles = sum(g[0] * (_tiles(g[1]) + _tiles(g[2])) for g in dims)
    chunks = sum(g[0] * (_problem_chunks(g[1], per_chunk)[0] + _problem_chunks(g[2], per_chunk)[0])
                 for g in dims)
    sizes = {
        # p x k per problem, stacked: the sketches S (in their dtype), refill candidates R
        # (then R1), Q, X1.
        "S": -(-rows * k * sketch_bytes // 8), "R": rows * k, "Q": rows * k, "X": rows * k,
        # k x k, stacked over the 2b problems.
        "C1": z2 * k * k, "M1": z2 * k * k, "N1": z2 * k * k, "good": z2 * k,
        "W1": z2 * 2 * k * k, "scratch": z2 * 2 * k * k, "T": z2 * k * k,
        # Per-chunk partial Gram matrices of passes A, C, E.
        "part_a": chunks * 2 * k * k, "part_c": chunks * 3 * k * k, "part_e": chunks * 2 * k * k,
    }
    if not v_shared:  # eigenvectors in global memory when shared memory cannot hold them
        sizes["Vg"] = z2 * k * k
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // _ALIGN) * _ALIGN
    return _Plan(per_chunk, tiles, chunks, offsets, total)


def _eig_fits(k: int, v_shared: bool, device: torch.device) -> bool:
    return eig_shared_bytes(k, v_shared) <= _loader.max_shared_bytes(device) - EIG_HEADROOM


def supports(k: int, device: torch.device, batch: int = 1) -> bool:
    """Whether the kernels take ``batch`` matrices of width k on ``device``: the one-block eigen
    solver's shared memory (any batch: every grid is flattened into its x dimension)."""
    return _eig_fits(k, False, device)


def postprocess_cupy(Y: torch.Tensor, Z: torch.Tensor, U_old: torch.Tensor, V_old: torch.Tensor,
                     *, seed: int = 0, step=0, refill=None) -> PostOut:
    """Post-process one step's sketches of b matrices on the GPU (see the module docstring).

    Y (b, m, k), Z (b, n, k): sketches (float32 or float64; others are converted to float64).
    U_old (b, m, k), V_old (b, n, k): the bases that made them (one dtype: float32, float64,
    bfloat16 or float16; the new bases get it). Needs m >= k and n >= k (k <= ~160: the Jacobi
    matrix lives in shared memory). ``seed`` (int) and ``step`` (int, or a 1-element integer
    CUDA tensor read on the device) fix the refill candidates; ``refill`` optionally gives them
    as float64 (b, m, k) and (b, n, k) tensors. Returns PostOut (sigma, sigma_y, sigma_z: (b, k)
    float64 descending; U, V; overlap_u, overlap_v: (b, k, k) float64).
    """
    return postprocess_cupy_many([(Y, Z, U_old, V_old, seed)], step=step,
                                 refills=None if refill is None else [refill],
                                 op="postprocess_cupy")[0]


def postprocess_cupy_many(groups, *, step=0, refills=None,
                          op: str = "postprocess_cupy_many") -> list[PostOut]:
    """:func:`postprocess_cupy` of several groups of matrices, of any shapes but one sketch
    width k, in ONE launch sequence: the kernels are latency-bound at a model's sizes, so a
    model whose tracked matrices have several shapes pays the sequence once, not once per shape.

    ``groups``: (Y, Z, U_old, V_old, seed) per group, each as :func:`postprocess_cupy` takes
    them; one basis dtype for all. The sketches are copied into one workspace, in their dtype
    where they share float32 or float64, else as float64. ``step``: shared by every group (int or a 1-element
    integer CUDA tensor). ``refills``: None, or (Ry, Rz) per group. Returns one PostOut per
    group, in order, whose tensors are views of shared outputs. Each group's results are those
    of its own :func:`postprocess_cupy` call up to float64 rounding (the Gram sums are split
    into row chunks of one size for the call, set by all its rows).
    """
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"{op}: groups must be a non-empty list of (Y, Z, U_old, V_old, seed)")
    tensors = {}
    for g, (Y, Z, U_old, V_old, _) in enumerate(groups):
        tensors.update({f"Y{g}": Y, f"Z{g}": Z, f"U_old{g}": U_old, f"V_old{g}": V_old})
    device = _loader.check_cuda(op, **tensors)
    k = groups[0][0].shape[-1] if groups[0][0].dim() == 3 else -1
    for Y, Z, U_old, V_old, _ in groups:
        if Y.dim() != 3 or Z.dim() != 3 or U_old.shape != Y.shape or V_old.shape != Z.shape \
                or Y.shape[0] != Z.shape[0] or Y.shape[2] != Z.shape[2]:
            raise ValueError(f"{op}: expected Y (b, m, k), Z (b, n, k), U_old like Y, V_old like Z; got "
                             f"{tuple(Y.shape)}, {tuple(Z.shape)}, {tuple(U_old.shape)}, {tuple(V_old.shape)}")
        _, m_, k_ = Y.shape
        if k_ < 1 or m_ < k_ or Z.shape[1] < k_:
            raise ValueError(f"{op}: need 1 <= k <= min(m, n); got m={m_}, n={Z.shape[1]}, k={k_}")
        if k_ != k:
            raise ValueError(f"{op}: every group needs the same sketch width; got k={k} and {k_}")
        if U_old.dtype != V_old.dtype or U_old.dtype not in _BASIS:
            raise TypeError(f"{op}: U_old and V_old must share one dtype of float32, float64, bfloat16, "
                            f"float16; got {U_old.dtype}, {V_old.dtype}")
        if U_old.dtype != groups[0][2].dtype:
            raise TypeError(f"{op}: every group needs the same basis dtype; got "
                            f"{groups[0][2].dtype} and {U_old.dtype}")
    if refills is not None and len(refills) != len(groups):
        raise ValueError(f"{op}: refills needs one (Ry, Rz) per group")
    dims = tuple((Y.shape[0], Y.shape[1], Z.shape[1]) for Y, Z, *_ in groups)
    b = sum(d[0] for d in dims)
    dtypes = {t.dtype for Y, Z, *_ in groups for t in (Y, Z)}
    sdt = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_SKETCH) else torch.float64
    basis_dtype = groups[0][2].dtype

    step_t = None
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype.is_complex:
            raise ValueError(f"{op}: a tensor step must be one integer, got {step.dtype} {tuple(step.shape)}")
        if step.device.type == "cuda":
            step_t = step.detach().reshape(()).to(device=device, dtype=torch.int64)
            step = 0
        else:
            step = int(step)  # a CPU tensor: no device sync

    if not _eig_fits(k, False, device):
        raise ValueError(f"{op}: k = {k} is too large for the one-block eigen solver "
                         f"({eig_shared_bytes(k, False)} bytes of shared memory, limit "
                         f"{_loader.max_shared_bytes(device)})")
    v_shared = _eig_fits(k, True, device)  # the eigenvectors in shared memory too

    plan = _plan(dims, k, torch.finfo(sdt).bits // 8, v_shared, _loader.sm_count(device))
    per_chunk = plan.rows_per_chunk
    _loader.grid_dim_check(op, "row tiles", plan.tiles, 2**31 - 1)
    # The problem table: the Y sides of every group's matrices, then their Z sides, each
    # problem's rows stacked in that order in the workspaces (so a group's Y or Z rows, and
    # its new bases, are one contiguous range), and its tiles and Gram chunks in that order in
    # the flattened grids. Its entries stay the same from step to step where the old bases do
    # (a TrackedSet's packs): then it is uploaded once (device_table).
    bases = [[g[2].detach().contiguous() for g in groups],
             [g[3].detach().contiguous() for g in groups]]
    rows, row0, tile0, chunk0, starts = [], 0, 0, 0, [[], []]  # starts[side][g]: first row
    for side in (0, 1):
        for g, B in enumerate(bases[side]):
            bg, p = B.shape[0], B.shape[1]
            p_tiles, (p_chunks, chunk_rows) = _tiles(p), _problem_chunks(p, per_chunk)
            starts[side].append(row0)
            seed = int(groups[g][4]) % 2**64
            seed = seed - 2**64 if seed >= 2**63 else seed  # the uint64's bits as an int64
            for i in range(bg):
                rows.append((p, row0, B.data_ptr() + i * p * k * B.element_size(), seed, i,
                             tile0, chunk0, p_chunks, chunk_rows))
                row0, tile0, chunk0 = row0 + p, tile0 + p_tiles, chunk0 + p_chunks
    table = _loader.device_table(tuple(v for row in rows for v in row), device)

    def group_rows(stacked: torch.Tensor, side: int, g: int) -> torch.Tensor:
        """Group g's side of a stacked (rows, k) tensor, as (b, p, k)."""
        bg, p = bases[side][g].shape[:2]
        return stacked[starts[side][g]:starts[side][g] + bg * p].view(bg, p, k)

    f64 = dict(device=device, dtype=torch.float64)
    z2, nt = 2 * b, _tiles(k)
    # All float64 workspaces in one allocation, passed as addresses (no tensor per workspace:
    # each costs host time, and this call is host-bound at small k).
    work = torch.empty(plan.total, **f64)
    base = work.data_ptr()
    ws = {name: np.uint64(base + 8 * off) for name, off in plan.offsets.items()}
    S = work[plan.offsets["S"]:].view(sdt)[:row0 * k].view(row0, k)
    for side in (0, 1):  # one copy per group and side (read as the kernels' dtype)
        for g, group in enumerate(groups):
            group_rows(S, side, g).copy_(group[side].detach())
    if refills is not None:
        R = work[plan.offsets["R"]:plan.offsets["R"] + row0 * k].view(row0, k)
        for g, refill in enumerate(refills):
            for side in (0, 1):
                group_rows(R, side, g).copy_(refill[side])
    # Outputs: real tensors, kept by the caller (views per group).
    sigma = torch.empty((b, k), **f64)
    sigma_y = torch.empty((b, k), **f64)
    sigma_z = torch.empty((b, k), **f64)
    new_bases = torch.empty((row0, k), device=device, dtype=basis_dtype)
    overlap_u = torch.empty((b, k, k), **f64)
    overlap_v = torch.empty((b, k, k), **f64)

    fn = lambda name: _loader.function(CU, name, device)  # noqa: E731
    refill_k = fn("pp_refill")
    gram_s, gram_64, gram_u = fn(f"pp_gram_{_SKETCH[sdt]}"), fn("pp_gram_f64"), fn(f"pp_gram_{_BASIS[basis_dtype]}")
    apply_s, apply_64 = fn(f"pp_apply_{_SKETCH[sdt]}_f64"), fn("pp_apply_f64_f64")
    apply_u = fn(f"pp_apply_f64_{_BASIS[basis_dtype]}")
    eig_k, mid_k, fin_k = fn("pp_eig"), fn("pp_mid"), fn("pp_fin")

    i64, i32 = np.int64, np.int32
    c = _loader.pointer
    tab, nb = c(table), i64(b)
    block = (THREADS, 1, 1)
    kk = i64(k * k)
    with _loader.on_torch_stream(device):
        if refills is None:
            refill_k((plan.tiles, 1, 1), block, (ws["R"], tab, nb, i32(k), i64(step), c(step_t)))
        # Pass A: [S^T S, S^T R]  (sel: term 1 takes B from R -> bit 3)
        gram_s((plan.chunks, 2 * nt * nt, 1), block,
               (tab, i32(-1), ws["S"], ws["R"], nb, i32(k), i32(2), i32(0b1000), ws["part_a"]))
        eig_k((z2, 1, 1), block,
              (ws["part_a"], tab, nb, i32(k), ws.get("Vg", NULL), i32(v_shared), ws["C1"],
               ws["M1"], ws["N1"], ws["good"], c(sigma_y), c(sigma_z), i32(MAX_SWEEPS), np.float64(JACOBI_TOL)),
              shared_mem=eig_shared_bytes(k, v_shared))
        # Pass B: Q = S C1 ; R1 = R - S N1 (in place over R)
        grid_apply = (plan.tiles, nt, 1)
        apply_s(grid_apply, block, (tab, i32(-1), ws["S"], ws["C1"], kk, NULL, NULL, i64(0), NULL,
                                    np.float64(1.0), ws["Q"], nb, i32(k)))
        apply_s(grid_apply, block, (tab, i32(-1), ws["S"], ws["N1"], kk, NULL, NULL, i64(0), ws["R"],
                                    np.float64(-1.0), ws["R"], nb, i32(k)))
        # Pass C: [Q^T Q, Q^T R1, R1^T R1]  (sel: term 1 B from R1 -> bit 3; term 2 both -> bits 4, 5)
        gram_64((plan.chunks, 3 * nt * nt, 1), block,
                (tab, i32(-1), ws["Q"], ws["R"], nb, i32(k), i32(3), i32(0b111000), ws["part_c"]))
        mid_k((z2, 1, 1), block,
              (ws["part_c"], tab, nb, i32(k), ws["good"], ws["scratch"], ws["W1"],
               c(sigma_y), c(sigma_z), c(sigma)),
              shared_mem=8 * k * k)
        # Pass D: X1 = Q W1_top + R1 W1_bottom
        # The bottom half of W1 (z2, 2k, k): its rows k.. of each problem, k * k doubles in.
        w1_low = np.uint64(int(ws["W1"]) + 8 * k * k)
        apply_64(grid_apply, block, (tab, i32(-1), ws["Q"], ws["W1"], i64(2 * k * k), ws["R"], w1_low,
                                     i64(2 * k * k), NULL, np.float64(1.0), ws["X"], nb, i32(k)))
        # Pass E: [X1^T X1, U_old^T X1]  (sel: term 0 both from X1 -> bits 0, 1; term 1 B from X1 -> bit 3)
        gram_u((plan.chunks, 2 * nt * nt, 1), block,
               (tab, i32(TAB_OLD), NULL, ws["X"], nb, i32(k), i32(2), i32(0b1011), ws["part_e"]))
        fin_k((z2, 1, 1), block,
              (ws["part_e"], tab, nb, i32(k), ws["scratch"], ws["T"], c(overlap_u),
               c(overlap_v)),
              shared_mem=8 * k * k)
        # Pass F: U_next = X1 T in the basis dtype
        apply_u(grid_apply, block, (tab, i32(-1), ws["X"], ws["T"], kk, NULL, NULL, i64(0), NULL,
                                    np.float64(1.0), c(new_bases), nb, i32(k)))
    outs, first = [], 0
    for g, (bg, _, _) in enumerate(dims):
        part = slice(first, first + bg)
        outs.append(PostOut(sigma[part], sigma_y[part], sigma_z[part], group_rows(new_bases, 0, g),
                            group_rows(new_bases, 1, g), overlap_u[part], overlap_v[part]))
        first += bg
    return outs

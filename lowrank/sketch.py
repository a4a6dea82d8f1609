"""The sketch pass (reference and CPU backend) and the seeded start bases.

Op ``sketch``: for W (b, m, n) and thin orthonormal bases U (b, m, k), V (b, n, k):

    Y = W V          (b, m, k)   sketch of the column space
    Z = W^T U        (b, n, k)   sketch of the row space
    fro2 = ||W||_F^2 (b,)        exact up to rounding, returned in float64
    row_sq           (b, m)      sums of squares of each row of W (vanishing neurons), float64

The Triton and CuPy kernels implement the same contract; ``kernels/`` holds them and the tests
compare each against :func:`sketch_torch`.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from . import _checks
from ._checks import sketch_dtype


class SketchOut(NamedTuple):
    Y: torch.Tensor | None  # (b, m, k) in the sketch dtype (float32; float64 for float64 weights)
    Z: torch.Tensor | None  # (b, n, k); one of the two is None for a one-sided sketch
    fro2: torch.Tensor  # (b,) float64
    row_sq: torch.Tensor  # (b, m) float64
    # sides="power" only (Z is None then): P = W^T Y = W^T W V (b, n, k), the second half of a
    # power step taken in the same read of W. With U_next = Y T (T the k x k factor of the
    # post-processing), W^T U_next = P T: the sequential schedule without a second pass.
    P: torch.Tensor | None = None


def cat_sketches(outs) -> SketchOut:
    """The both-sided sketches ``outs`` (each (b_i, ...)) as one batch, in order."""
    return SketchOut(*(torch.cat([getattr(o, f) for o in outs]) for f in ("Y", "Z", "fro2", "row_sq")))


def as_batched(W: torch.Tensor) -> torch.Tensor:
    """View a weight as a batch of one matrix, shaped as :func:`matrix_shape` says.

    (m, n) -> (1, m, n); any parameter with more dims, conv1d (o, i, kw) and conv2d
    (o, i, kh, kw) alike, -> (1, o, i*kw*...). A view when W's layout allows it, else a copy.
    A 3-D tensor is a Conv1d weight here, never a batch: to sketch an explicit batch of matrices
    (b, m, n), pass it to :func:`sketch_torch` directly.
    """
    if W.dim() < 2:
        raise ValueError(f"a weight to track needs >= 2 dims, got shape {tuple(W.shape)}")
    return W.reshape(1, *matrix_shape(W.shape))  # explicit n: reshape cannot infer -1 for 0 rows


def matrix_shape(shape) -> tuple[int, int]:
    """(m, n) that a parameter of ``shape`` is tracked as: conv kernels become (out, in*kh*kw)."""
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return m, n


def name_seed(seed: int, name: str) -> int:
    """A per-matrix seed that is the same in every process (crc32, not Python's salted hash)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def gaussian(shape, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Seeded standard normal numbers drawn on the CPU in float64, so any device gets the same."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def orthonormal_columns(X: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns of a batch (b, p, k), p >= k, by Householder QR in float64."""
    Q, R = torch.linalg.qr(X.to(torch.float64))
    # Fix the sign so the result is a function of X alone (positive diagonal of R).
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (Q * sign.unsqueeze(-2)).to(X.dtype)


def init_bases(m: int, n: int, k: int, *, seed: int = 0, batch: int = 1, device=None,
               dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian start bases U (batch, m, k) and V (batch, n, k), orthonormal columns.

    Identical for a given (seed, shape) on every device and process: drawn on the CPU in float64.
    Needs 1 <= k <= min(m, n) (a QR of an m x k matrix with m < k would return only m columns).
    """
    if not 1 <= k <= min(m, n):
        raise ValueError(f"init_bases needs 1 <= k <= min(m, n) = {min(m, n)}, got k={k}")
    U = orthonormal_columns(gaussian((batch, m, k), seed, dtype=torch.float64))
    V = orthonormal_columns(gaussian((batch, n, k), seed + 1, dtype=torch.float64))
    return U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)


SIDES = ("both", "y", "z", "power")


def sketch_torch(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *,
                 sides: str = "both") -> SketchOut:
    """Reference sketch pass over W with bases U (b, m, k), V (b, n, k).

    ``sides``: "both" (the kernel contract), or only Y ("y") or only Z ("z"), the other
    returned as None (the alternating schedule), or "power": Y and P = W^T Y, Z None (the
    sequential schedule, :data:`lowrank.trackset.SCHEDULES`).

    W is a batch of matrices (b, m, n) or one matrix (m, n) (read as b = 1); to sketch a
    parameter of any shape, pass ``as_batched(W)``. Products run in float32 (float64 for
    float64 weights), whatever the weight dtype. Row sums of squares are accumulated in the
    sketch dtype (a vectorised norm, relative error ~3e-7 in float32) and returned in float64;
    where float32 squares may overflow or underflow (weights scaled by 1e30 or 1e-30) they are
    recomputed in float64. (A float64 copy of W every step made this the slowest part of a CPU
    step: 78 ms against 0.8 ms at 2048^2.)
    """
    if W.dim() == 2:
        W = W.unsqueeze(0)
    elif W.dim() != 3:
        raise ValueError(f"sketch_torch takes W as (m, n) or (b, m, n), got shape "
                         f"{tuple(W.shape)}; view a parameter with as_batched(W) first")
    if sides not in SIDES:
        raise ValueError(f"sides must be one of {', '.join(SIDES)}; got {sides!r}")
    cdt = sketch_dtype(W.dtype)
    Wc = W.to(cdt)
    Y = torch.matmul(Wc, V.to(cdt)) if sides != "z" else None  # "both", "y", "power"
    # W^T U through the transposed view, not (U^T W)^T: with W fresh from memory, as in a
    # training step, it measured 1.5-1.7x faster on the CPU (0.88 vs 1.32 ms at 1024^2, 2.98 vs
    # 5.05 ms at 2048^2, k = 16); with W already in cache the two are within 20%.
    Z = torch.matmul(Wc.transpose(-2, -1), U.to(cdt)) if sides in ("both", "z") else None
    P = torch.matmul(Wc.transpose(-2, -1), Y) if sides == "power" else None
    if not _checks.host_reads_are_free(W):
        # Device path, no data-dependent branch: the reduction casts to float64 on the fly.
        row_sq = torch.linalg.vector_norm(W, dim=-1, dtype=torch.float64).square()
        return SketchOut(Y, Z, row_sq.sum(dim=-1), row_sq, P)
    # The norm kernel streams W once (an einsum here took 2.6 ms against 0.3 ms at 2048^2);
    # squaring the float32 norm adds one rounding to a sum already carrying ~1e-7.
    row_sq = torch.linalg.vector_norm(Wc, dim=-1).to(torch.float64).square()
    if cdt != torch.float64 and not bool((torch.isfinite(row_sq) & (row_sq >= 1e-30)).all()):
        # float32 squares overflowed (entries past ~1e19) or may have underflowed (a row this
        # small, e.g. weights scaled by 1e-30, or an all-zero row): redo exactly in float64.
        # Non-finite W also lands here and keeps its NaN/Inf.
        row_sq = W.to(torch.float64).square().sum(dim=-1)
    return SketchOut(Y, Z, row_sq.sum(dim=-1), row_sq, P)


# Elements per float64 chunk of inner_and_square_norm_torch: two 512 KiB temporaries on the CPU
# (cache-sized); 128 MiB ones on a GPU, where a launch costs more than fresh memory but whole
# float64 copies of a vocabulary embedding (50257 x 768: 0.3 GB each) would be a spike.
INNER_CHUNK = 1 << 16
INNER_CHUNK_GPU = 1 << 24


def inner_and_square_norm_torch(G: torch.Tensor, W: torch.Tensor):
    """Op ``inner_and_square_norm`` (gradient tracking): <G, W> and ||W||_F^2 in float64, as 0-d
    tensors. Each product of two float32 (or 16-bit) entries is exact in float64; only the sums
    round. In chunks of float64 copies: whole copies of a large G and W cost more in fresh
    pages than in arithmetic on the CPU (8 of 16 ms of an MLP step with gradient tracking, 3
    matrices of 1024 x 1024). The cpu backend's kernel computes the same from one read of G
    and W (:func:`lowrank.backends.inner_and_square_norm`). No host synchronisation."""
    chunk = INNER_CHUNK if G.device.type == "cpu" else INNER_CHUNK_GPU
    if G.numel() <= chunk:
        W64 = W.to(torch.float64)
        return (G.to(torch.float64) * W64).sum(), W64.square().sum()
    g, w = G.reshape(-1), W.reshape(-1)
    inner, square = [], []
    for start in range(0, g.numel(), chunk):
        wc = w[start:start + chunk].to(torch.float64)
        inner.append(torch.dot(g[start:start + chunk].to(torch.float64), wc))
        square.append(torch.dot(wc, wc))
    return torch.stack(inner).sum(), torch.stack(square).sum()

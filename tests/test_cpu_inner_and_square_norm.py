"""Op inner_and_square_norm on the CPU kernel (gradient tracking's <G, W> and ||W||_F^2 in
float64), against the correctly rounded sums (math.fsum of the exact float64 products) and the
torch reference; its determinism across thread counts; NaN and Inf; the dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank import backends
from lowrank.sketch import inner_and_square_norm_torch

if not backends.cpu_kernel_available():
    pytest.skip("the CPU kernel does not build here", allow_module_level=True)

KERNEL = backends.kernel_module("cpu", "inner_and_square_norm")
BLOCK = 16384  # BLOCK of inner_and_square_norm.c
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def rand(n, *, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)


def exact(G, W):
    """Correctly rounded <G, W>, ||W||^2 and sum |g w| (every product is exact in float64)."""
    g, w = G.double().reshape(-1).tolist(), W.double().reshape(-1).tolist()
    return (math.fsum(a * b for a, b in zip(g, w)), math.fsum(b * b for b in w),
            math.fsum(abs(a * b) for a, b in zip(g, w)))


def rounding_bound(n: int, magnitude: float) -> float:
    """A priori bound of the kernel's float64 summation error: each lane adds at most BLOCK / 8
    terms in sequence, then 8 lanes, a tail and the blocks in order, each addition rounding by
    at most 2^-53 of the partial sums' magnitudes (<= sum |terms|)."""
    blocks = -(-n // BLOCK)
    return (BLOCK // 8 + 8 + 8 + blocks) * 2.0 ** -53 * magnitude


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3])
def test_sums_match_the_correctly_rounded_ones(dtype, n):
    """Vector lanes, the scalar tail, one block, several (threaded from 4 on); 16-bit entries
    widened in pieces of 512."""
    G, W = rand(n, seed=n, dtype=dtype), rand(n, seed=n + 1, dtype=dtype, scale=0.1)
    inner, square = KERNEL.inner_and_square_norm_cpu(G, W)
    assert inner.dtype == square.dtype == torch.float64 and inner.dim() == 0
    true_inner, true_square, magnitude = exact(G, W)
    assert abs(float(inner) - true_inner) <= rounding_bound(n, magnitude)
    assert abs(float(square) - true_square) <= rounding_bound(n, true_square)
    ref_inner, ref_square = inner_and_square_norm_torch(G, W)  # another summation order
    assert abs(float(ref_inner) - true_inner) <= rounding_bound(n, magnitude)
    assert abs(float(ref_square) - true_square) <= rounding_bound(n, true_square)


def test_empty_arrays_sum_to_zero():
    inner, square = KERNEL.inner_and_square_norm_cpu(torch.empty(0, 5), torch.empty(0, 5))
    assert float(inner) == 0.0 and float(square) == 0.0


def test_thread_count_does_not_change_the_bits():
    """Blocks are summed in block order whatever the threads: one thread and two agree bit for
    bit (a matrix of 8 blocks takes the threaded path)."""
    G, W = rand(8 * BLOCK + 11, seed=5), rand(8 * BLOCK + 11, seed=6)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(KERNEL.inner_and_square_norm_cpu(G, W))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_nan_and_inf_propagate():
    G, W = rand(3 * BLOCK, seed=7), rand(3 * BLOCK, seed=8)
    G[BLOCK + 5] = float("nan")
    inner, square = KERNEL.inner_and_square_norm_cpu(G, W)
    assert math.isnan(float(inner)) and math.isfinite(float(square))
    W[17] = float("inf")
    G[BLOCK + 5] = 1.0
    inner, square = KERNEL.inner_and_square_norm_cpu(G, W)
    assert math.isinf(float(square))


def test_dispatch_takes_the_kernel_where_it_reads_the_pair_and_the_reference_elsewhere():
    """backend="cpu": a contiguous pair of one dtype on the kernel (the same bits as a direct
    call); a transposed gradient, mixed dtypes and float64 on the reference. Other backends
    always on the reference."""
    G, W = rand(300 * 70, seed=9).view(300, 70), rand(300 * 70, seed=10).view(300, 70)
    direct = KERNEL.inner_and_square_norm_cpu(G, W)
    via = backends.inner_and_square_norm(G, W, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(direct, via))
    assert all(torch.equal(a, b) for a, b in zip(
        backends.inner_and_square_norm(G, W, backend="torch"), inner_and_square_norm_torch(G, W)))
    Gt = G.t().contiguous().t()  # same values, column-major
    assert not KERNEL.takes(Gt, W)
    torch.testing.assert_close(backends.inner_and_square_norm(Gt, W, backend="cpu")[0],
                               direct[0], rtol=1e-13, atol=0)
    for G2, W2 in ((G.double(), W.double()), (G.half(), W)):
        assert not KERNEL.takes(G2, W2)
        ref = inner_and_square_norm_torch(G2, W2)
        got = backends.inner_and_square_norm(G2, W2, backend="cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_direct_call_refuses_what_it_cannot_read():
    G, W = rand(64, seed=11), rand(64, seed=12)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        KERNEL.inner_and_square_norm_cpu(G.double(), W)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        KERNEL.inner_and_square_norm_cpu(G[:32], W)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        KERNEL.inner_and_square_norm_cpu(G.view(8, 8).t(), W.view(8, 8))

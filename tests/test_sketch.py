"""Op ``sketch`` (torch reference): Y = W V, Z = W^T U, fro2, row_sq against float64 products,
and the seeded start bases.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.sketch import (as_batched, gaussian, init_bases, matrix_shape, name_seed,
                            sketch_torch)

# --- tolerance table ---------------------------------------------------------------------------
# Products: the rigorous componentwise bound of a length-n dot product in any summation order,
# |fl(W V) - W V| <= gamma_n |W| |V| with gamma_n = n u / (1 - n u), u the unit roundoff of the
# sketch dtype (float32 for float32/bfloat16/float16 weights, float64 for float64 weights). The
# reference point is the float64 product of the SAME rounded W (rounding W to its dtype is not an
# error of the sketch). No widening.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# fro2 / row_sq: sums of n nonnegative squares, compared with math.fsum (correctly rounded).
# For float64 weights, or float32 weights at extreme scales (where the reference falls back to
# float64), they are float64 sums: relative error <= n * 2^-53 ~ 1e-11 here, checked at 1e-12.
# Widened for the float32 sketch dtype: the reference accumulates in float32 like the sketch
# products (a float64 copy of W cost 14-78 ms per step at 2048^2 on the CPU, 7-40x the SGD step
# itself), so the rigorous bound is gamma_{n+1} with u = 2^-24 (n additions plus the rounded square).
FRO2_RTOL = 1e-12


def fro2_rtol(cdt: torch.dtype, n: int) -> float:
    if cdt == torch.float64:
        return FRO2_RTOL
    u = UNIT_ROUNDOFF[torch.float32]
    return (n + 1) * u / (1 - (n + 1) * u)
# Start bases: Householder QR in float64, then rounded to the basis dtype (half an ulp per entry,
# times sqrt(k)-ish growth in U^T U).
ORTHO_ATOL = {torch.float32: 1e-6, torch.float64: 1e-13}

SHAPES = [
    pytest.param(1, 1, id="1x1"),
    pytest.param(1, 7, id="1x7"),
    pytest.param(7, 1, id="7x1"),
    pytest.param(7, 123, id="7x123"),
    pytest.param(123, 257, id="123x257"),
    pytest.param(257, 7, id="257x7"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def _randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _assert_product_close(actual: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: float):
    """|actual - A B| <= gamma_n |A| |B| (float64 reference, n = inner dimension)."""
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    n = A.shape[-1]
    gamma = n * u / (1 - n * u)
    exact = A64 @ B64
    bound = gamma * (A64.abs() @ B64.abs())
    err = (actual.to(torch.float64) - exact).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3e}"


def _assert_sketch_matches_float64(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, out):
    """W (b, m, n) as passed; U, V the bases the sketch multiplied (in the sketch dtype)."""
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    assert out.Y.dtype == cdt and out.Z.dtype == cdt
    assert out.fro2.dtype == torch.float64 and out.row_sq.dtype == torch.float64
    u = UNIT_ROUNDOFF[cdt]
    _assert_product_close(out.Y, W, V.to(cdt), u)
    _assert_product_close(out.Z, W.transpose(-2, -1), U.to(cdt), u)
    W64 = W.to(torch.float64)
    n_total = W.shape[-2] * W.shape[-1]
    for b in range(W.shape[0]):
        exact = math.fsum((W64[b].flatten() ** 2).tolist())
        assert float(out.fro2[b]) == pytest.approx(exact, rel=fro2_rtol(cdt, n_total), abs=0.0)
        rows = [math.fsum((row ** 2).tolist()) for row in W64[b]]
        torch.testing.assert_close(out.row_sq[b], torch.tensor(rows, dtype=torch.float64),
                                   rtol=fro2_rtol(cdt, W.shape[-1]), atol=0.0)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_matches_float64_products(m, n, dtype):
    k = min(5, m, n)
    W = _randn(m, n, seed=m * 1000 + n).to(dtype)
    U, V = init_bases(m, n, k, seed=3)
    out = sketch_torch(W, U, V)
    assert out.Y.shape == (1, m, k) and out.Z.shape == (1, n, k)
    assert out.fro2.shape == (1,) and out.row_sq.shape == (1, m)
    _assert_sketch_matches_float64(W.unsqueeze(0), U, V, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_batched_equals_each_matrix(dtype):
    b, m, n, k = 3, 17, 11, 4
    W = _randn(b, m, n, seed=1).to(dtype)
    U, V = init_bases(m, n, k, seed=2, batch=b)
    out = sketch_torch(W, U, V)
    _assert_sketch_matches_float64(W, U, V, out)
    for i in range(b):
        # Batched and single products may block the sums differently (not bitwise equal); both
        # obey the float64 bound, and the float64 norms are the same sums.
        one = sketch_torch(W[i], U[i:i + 1], V[i:i + 1])
        _assert_sketch_matches_float64(W[i:i + 1], U[i:i + 1], V[i:i + 1], one)
        for name in ("fro2", "row_sq"):
            torch.testing.assert_close(getattr(out, name)[i], getattr(one, name)[0],
                                       rtol=2 * fro2_rtol(out.Y.dtype, m * n), atol=0, msg=name)


@pytest.mark.parametrize("shape", [
    pytest.param((6, 3, 3, 3), id="conv2d-6x3x3x3"),
    pytest.param((5, 4, 3), id="conv1d-5x4x3"),
    pytest.param((4, 2, 2, 3, 1), id="conv3d-4x2x2x3x1"),
])
def test_sketch_of_conv_weight_as_matrix(shape):
    # Regression: as_batched used to pass any 3-D tensor through as a batch, so a Conv1d weight
    # (o, i, kw) was not viewed as the o x (i*kw) matrix that matrix_shape tracks.
    W = _randn(*shape, seed=4, dtype=torch.float32)
    m, n = matrix_shape(W.shape)
    assert (m, n) == (shape[0], math.prod(shape[1:]))
    Wb = as_batched(W)
    assert Wb.shape == (1, m, n)
    assert Wb.data_ptr() == W.data_ptr()  # a view, not a copy, for a contiguous weight
    U, V = init_bases(m, n, min(3, m, n), seed=5)
    out = sketch_torch(Wb, U, V)
    _assert_sketch_matches_float64(W.reshape(1, m, n), U, V, out)


def test_as_batched_rejects_vectors():
    with pytest.raises(ValueError, match="needs >= 2 dims"):
        as_batched(torch.zeros(5))


def test_sketch_rejects_ambiguous_rank():
    with pytest.raises(ValueError, match=r"\(m, n\) or \(b, m, n\)"):
        sketch_torch(torch.zeros(2, 3, 4, 5), torch.zeros(1, 2, 1), torch.zeros(1, 60, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided-slice", "transposed-batch"])
def test_sketch_non_contiguous(dtype, view):
    base = _randn(40, 30, seed=6).to(dtype)
    if view == "transposed":
        W = base.T  # (30, 40)
    elif view == "strided-slice":
        W = base[1::2, ::3]  # (20, 10)
    else:
        W = _randn(2, 30, 40, seed=7).to(dtype).transpose(-2, -1)  # (2, 40, 30)
    assert not W.is_contiguous()
    Wb = W if W.dim() == 3 else W.unsqueeze(0)
    b, m, n = Wb.shape
    U, V = init_bases(m, n, 4, seed=8, batch=b)
    out = sketch_torch(W, U, V)
    _assert_sketch_matches_float64(Wb, U, V, out)
    ref = sketch_torch(Wb.contiguous(), U, V)
    torch.testing.assert_close(out.fro2, ref.fro2, rtol=2 * fro2_rtol(out.Y.dtype, m * n), atol=0)


@pytest.mark.parametrize("scale", [pytest.param(1e30, id="1e30"), pytest.param(1e-30, id="1e-30")])
def test_fro2_exact_for_extreme_fp32_scales(scale):
    # In float32, sum(W^2) would overflow (1e60 > 3.4e38) or underflow (1e-60 < 1.4e-45).
    W = (_randn(33, 65, seed=9) * scale).to(torch.float32)
    assert bool(torch.isfinite(W).all()) and bool((W != 0).all())
    U, V = init_bases(33, 65, 4, seed=10)
    out = sketch_torch(W, U, V)
    assert bool(torch.isfinite(out.Y).all()) and bool(torch.isfinite(out.Z).all())
    assert float(out.fro2[0]) > 0.0
    _assert_sketch_matches_float64(W.unsqueeze(0), U, V, out)


def test_zero_weight_sketch_is_zero():
    U, V = init_bases(9, 4, 3, seed=0)
    out = sketch_torch(torch.zeros(9, 4), U, V)
    assert out.P is None
    for t in (out.Y, out.Z, out.fro2, out.row_sq):
        assert bool((t == 0).all())


# --- start bases -------------------------------------------------------------------------------

BASIS_SHAPES = [
    pytest.param(1, 1, 1, id="1x1-k1"),
    pytest.param(7, 123, 7, id="7x123-k7"),
    pytest.param(123, 7, 5, id="123x7-k5"),
    pytest.param(257, 123, 32, id="257x123-k32"),
]


@pytest.mark.parametrize("m,n,k", BASIS_SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float64, id="fp64")])
def test_init_bases_orthonormal(m, n, k, dtype):
    U, V = init_bases(m, n, k, seed=11, batch=2, dtype=dtype)
    assert U.shape == (2, m, k) and V.shape == (2, n, k)
    assert U.dtype == dtype and V.dtype == dtype
    eye = torch.eye(k, dtype=torch.float64)
    for B in (U, V):
        B64 = B.to(torch.float64)
        gram = B64.transpose(-2, -1) @ B64
        assert float((gram - eye).abs().max()) <= ORTHO_ATOL[dtype]


def test_init_bases_reproducible_and_independent_of_global_rng():
    torch.manual_seed(123)
    U1, V1 = init_bases(31, 17, 6, seed=42)
    torch.manual_seed(456)
    torch.randn(100)
    U2, V2 = init_bases(31, 17, 6, seed=42)
    assert torch.equal(U1, U2) and torch.equal(V1, V2)


def test_init_bases_device_and_dtype_agnostic():
    # Drawn and orthonormalised on the CPU in float64, then cast: the device/dtype requested only
    # changes the final cast, so every device (and every rank of a job) starts from the same bases.
    U64, V64 = init_bases(20, 9, 4, seed=7, dtype=torch.float64)
    U32, V32 = init_bases(20, 9, 4, seed=7, dtype=torch.float32, device="cpu")
    assert torch.equal(U32, U64.to(torch.float32)) and torch.equal(V32, V64.to(torch.float32))
    meta_U, meta_V = init_bases(20, 9, 4, seed=7, device="meta")
    assert meta_U.device.type == "meta" and meta_U.shape == U32.shape
    g1 = gaussian((3, 4), seed=5, dtype=torch.float64)
    g2 = gaussian((3, 4), seed=5, dtype=torch.float32)
    assert torch.equal(g2, g1.to(torch.float32))


def test_init_bases_differ_by_seed_and_left_right():
    U1, V1 = init_bases(16, 16, 4, seed=1)
    U2, _ = init_bases(16, 16, 4, seed=2)
    assert not torch.equal(U1, U2)
    assert not torch.equal(U1, V1)  # U and V use different streams even for a square matrix


def test_name_seed_distinguishes_names_and_is_pinned():
    names = ["layer1.weight", "layer2.weight", "layer1.weight#grad", ""]
    seeds = [name_seed(0, nm) for nm in names]
    assert len(set(seeds)) == len(seeds)
    assert name_seed(1, "a") != name_seed(0, "a")
    assert all(0 <= s < 2**63 - 1 for s in seeds)
    U_a, _ = init_bases(12, 10, 3, seed=name_seed(0, "layer1.weight"))
    U_b, _ = init_bases(12, 10, 3, seed=name_seed(0, "layer2.weight"))
    assert not torch.equal(U_a, U_b)
    # Pinned values: crc32, not Python's per-process salted str hash, so every process of a
    # distributed job (and every later version) derives the same start bases from a name.
    assert name_seed(3, "blocks.0.attn.qkv.weight") == 1282329811
    assert name_seed(0, "layer1.weight") == 617916561


def test_init_bases_rejects_k_beyond_the_matrix():
    with pytest.raises(ValueError, match=r"1 <= k <= min\(m, n\) = 3"):
        init_bases(3, 10, 4)
    with pytest.raises(ValueError, match=r"got k=0"):
        init_bases(3, 10, 0)

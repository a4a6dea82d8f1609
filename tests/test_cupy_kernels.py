"""CuPy backend on the CPU: the CUDA C sources compile, and the kernels run right under emulation.

Nothing here needs a GPU or CuPy:

1. ``nvcc -arch=sm_90 -cubin`` compiles every ``kernels/cupy/*.cu`` (skipped without nvcc). Every
   dtype variant is an explicit ``extern "C"`` entry point, so one nvcc call per file compiles
   every template instance; the launchers only ask for entry points that exist.
2. The CUDA kernels themselves run on the CPU. The test builds each ``.cu`` as the loader builds
   it for NVRTC (common.cuh pasted in) and compiles it with g++ against a small emulation of the
   CUDA subset the kernels use: the threads of a block are ucontext coroutines switched at
   ``__syncthreads``, run in forward or reverse order (a missing barrier then reads stale or
   garbage data in one of the two orders), dynamic shared memory starts as NaN bytes, atomics
   are plain adds, blocks run one after the other. The Python launchers run unchanged with CPU
   tensors standing in for CuPy arrays (only the loader's CuPy, stream and device plumbing is
   replaced), and every result is compared with the torch reference.
3. Without CuPy or a GPU the modules import, and every entry point raises BackendUnavailable.

Not visible here, left to tests/test_cupy_gpu.py: concurrency between blocks (atomics), NVRTC,
DLPack and stream handling, CUDA graph capture, speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank import backends
from lowrank.backends import BackendUnavailable, kernel_module, resolve_backend
from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch, sgd_update_torch
from lowrank.postprocess import GRAM_RELATIVE_FLOOR, postprocess_torch, refill_candidates
from lowrank.sketch import as_batched, sketch_torch

F64 = torch.float64
CUPY_DIR = Path(__file__).resolve().parent.parent / "kernels" / "cupy"
CU_FILES = sorted(p.name for p in CUPY_DIR.glob("*.cu"))
LOADER = kernel_module("cupy", "_loader")
FS = kernel_module("cupy", "fused_sgd_sketch")
SK = kernel_module("cupy", "sketch")
PP = kernel_module("cupy", "postprocess")

# ---------------------------------------------------------------------------------------------
# Tolerance table (shared with tests/test_cupy_gpu.py)
# ---------------------------------------------------------------------------------------------
U32, U64 = 2.0**-24, 2.0**-53
# Unit roundoff of each weight dtype: rounding the stored result alone costs half an ulp.
UNIT = {torch.float32: U32, torch.float64: U64, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Singular values: the Gram matrix squares the condition number, so an eigenvalue is known to
# ~eps l_1 absolutely: sigma_i to ~eps (s_1/s_i)^2 relatively. Above 1e-3 s_1 that is < 1e-10;
# below, the absolute error is at most sqrt(eps l_1) ~ 1.5e-8 s_1 (bound 1e-7 s_1, with margin).
SIGMA_RTOL, SIGMA_RTOL_FROM = 1e-10, 1e-3
SIGMA_ATOL_REL_TO_S1 = 1e-7
# Bases: two rounds of Cholesky-QR give orthonormality to float64 rounding; then the basis is
# stored in its dtype (float32: ~6e-8 per entry, k of them in a column's dot products).
ORTHO_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 5e-2}
# A Ritz vector of an isolated singular value is determined to ~eps l_1 / gap; clusters whose
# relative gap is below CLUSTER_GAP are compared as subspaces (their projectors).
CLUSTER_GAP = 1e-6


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: |fl(x.y) - x.y| <= gamma_n |x|.|y| for any summation order."""
    return n * u / (1 - n * u)


def check_sketch(out, W3, U, V):
    """Kernel sketch vs the torch reference of the same W: rigorous rounding bounds."""
    ref = sketch_torch(W3, U, V)
    n, m = W3.shape[-1], W3.shape[-2]
    u = U64 if W3.dtype == F64 else U32
    Wa = W3.double().abs()
    by = (gamma(n, u) * 2) * (Wa @ V.double().abs()) + 1e-300  # kernel's and reference's error
    bz = (gamma(m, u) * 2) * (Wa.transpose(-2, -1) @ U.double().abs()) + 1e-300
    assert out.Y.dtype == ref.Y.dtype and out.Y.shape == ref.Y.shape
    assert ((out.Y.double() - ref.Y.double()).abs() <= by).all()
    assert ((out.Z.double() - ref.Z.double()).abs() <= bz).all()
    # The kernel sums exact float64 squares: against the float64 truth only the summation order
    # differs. The CPU reference accumulates float32 weights in float32 (lowrank/sketch.py), so
    # against it the bound is its own float32 one.
    true_rows = W3.double().square().sum(-1)
    torch.testing.assert_close(out.row_sq, true_rows, rtol=gamma(n, U64) * 2, atol=0)
    torch.testing.assert_close(out.fro2, true_rows.sum(-1), rtol=gamma(m * n, U64) * 2, atol=0)
    u_ref = U64 if ref.Y.dtype == F64 else U32
    torch.testing.assert_close(out.row_sq, ref.row_sq, rtol=gamma(n + 1, u_ref) * 2, atol=0)


def clusters(sigma: torch.Tensor) -> list[list[int]]:
    """Index groups of (nearly) equal singular values, relative gap below CLUSTER_GAP."""
    s = sigma.tolist()
    groups = [[0]]
    scale = max(s[0], 1e-300)
    for i in range(1, len(s)):
        if abs(s[i - 1] - s[i]) <= CLUSTER_GAP * scale:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def check_postprocess(out, ref, U_old, V_old, *, same_refill: bool):
    """CuPy post-processing vs the torch reference (see the tolerance table).

    Columns may differ in sign (Jacobi vs cuSOLVER), and within clusters of equal singular values
    by a rotation, so single columns are compared up to sign and clusters by their projectors.
    With different refill candidates (same_refill False) the refilled columns are only checked
    for orthonormality against the kept ones.
    """
    b, k = out.sigma.shape
    for name in ("sigma", "sigma_y", "sigma_z", "U", "V", "overlap_u", "overlap_v"):
        a = getattr(out, name)
        r = getattr(ref, name)
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert torch.isfinite(a).all(), name
    assert torch.equal(out.sigma, torch.maximum(out.sigma_y, out.sigma_z))
    for side, Uo, Qk, Qr, sk, sr, ok, orf in (
            ("u", U_old, out.U, ref.U, out.sigma_y, ref.sigma_y, out.overlap_u, ref.overlap_u),
            ("v", V_old, out.V, ref.V, out.sigma_z, ref.sigma_z, out.overlap_v, ref.overlap_v)):
        I = torch.eye(k, dtype=F64, device=Qk.device)
        for i in range(b):
            s1 = float(sr[i, 0])
            err = (sk[i] - sr[i]).abs()
            assert (err <= SIGMA_ATOL_REL_TO_S1 * s1).all(), (side, i, err.max())
            big = sr[i] >= SIGMA_RTOL_FROM * s1
            assert (err[big] <= SIGMA_RTOL * sr[i][big]).all(), (side, i, (err[big] / sr[i][big]).max())
            assert torch.equal(sk[i] == 0, sr[i] == 0), (side, i, "refilled directions differ")
            Q, R = Qk[i].double(), Qr[i].double()
            assert (Q.T @ Q - I).abs().max() <= ORTHO_ATOL[Qk.dtype], (side, i)
            tol = ORTHO_ATOL[Qk.dtype]
            good = (sr[i] > 0).nonzero().flatten().tolist()
            kept = set(range(k)) if same_refill else set(good)
            lam = sr[i].double() ** 2
            drift = 0.0  # perturbation carried to later columns by the Cholesky-QR mixing
            for group in clusters(sr[i]):
                others = [j for j in range(k) if j not in group]
                gap = min((abs(float(lam[a] - lam[c])) for a in group for c in others),
                          default=math.inf)
                smin = float(sr[i][group].min())
                if smin > 0:
                    # Eigenvector error ~ eps l_1 / gap, amplified by s_1 / s_j in U = S E / s.
                    drift = max(drift, 1e3 * U64 * float(lam[0]) / max(gap, 1e-300) * s1 / smin)
                g = [j for j in group if j in kept]
                bound = 10 * tol + 1e-12 + drift
                if not g or bound >= 0.5:
                    continue
                if len(group) == 1:
                    j = g[0]
                    sign = 1.0 if float(Q[:, j] @ R[:, j]) >= 0 else -1.0
                    assert (sign * Q[:, j] - R[:, j]).abs().max() <= bound, (side, i, j)
                else:
                    Pk = Q[:, g] @ Q[:, g].T
                    Pr = R[:, g] @ R[:, g].T
                    assert (Pk - Pr).abs().max() <= 2 * bound, (side, i, g)
            if not same_refill:
                bad = [j for j in range(k) if j not in good]
                if bad and good:
                    assert (Q[:, good].T @ Q[:, bad]).abs().max() <= 10 * tol
            # Overlap = U_old^T U_next (from the float64 basis before its rounding).
            ov = Uo[i].double().T @ Q
            assert (ok[i] - ov).abs().max() <= 10 * tol + 1e-12, (side, i)
            # Principal-angle cosines do not depend on signs or rotations within clusters.
            if same_refill:
                torch.testing.assert_close(torch.linalg.svdvals(ok[i].cpu()),
                                           torch.linalg.svdvals(orf[i].cpu()), rtol=0,
                                           atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 1. nvcc
# ---------------------------------------------------------------------------------------------
def _entry_points(cu_name: str) -> set[str]:
    src = (CUPY_DIR / cu_name).read_text()
    names = set(re.findall(r'extern "C" __global__ void __launch_bounds__\(\w+\) (\w+)\(', src))
    names |= set(re.findall(r"^(?:PP_GRAM_ENTRY|PP_APPLY_ENTRY|FS_ENTRY|UP_ENTRY)\((\w+)", src, re.M))
    # FS_ENTRIES(SUFFIX, D, MINB) expands to the entries named in its definition, one per chunk width.
    chunked = re.findall(r"FS_ENTRY\((fused_sgd_sketch)_##SUFFIX##(_k\d+)", src)
    for suffix in re.findall(r"^FS_ENTRIES\((\w+)", src, re.M):
        names |= {f"{stem}_{suffix}{kc}" for stem, kc in chunked}
    return names - {"NAME"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("cu", CU_FILES)
def test_cu_compiles_with_nvcc_for_sm90(cu, tmp_path):
    """Every kernel and every dtype instance compiles (one nvcc call: explicit entry points)."""
    out = tmp_path / (cu + ".cubin")
    proc = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(out), cu],
                          cwd=CUPY_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Each entry point is a global symbol of the cubin.
    data = out.read_bytes()
    for name in _entry_points(cu):
        assert name.encode() in data, name


def test_launchers_only_ask_for_existing_entry_points():
    fused = _entry_points("fused_sgd_sketch.cu")
    assert {FS.entry_point(dt, k) for dt in FS._SUFFIX for k in (1, 8, 9, 16, 17, 64)} <= fused
    post = _entry_points("postprocess.cu")
    wanted = {"pp_refill", "pp_eig", "pp_mid", "pp_fin", "pp_gram_f64", "pp_apply_f64_f64"}
    wanted |= {f"pp_gram_{s}" for s in PP._SKETCH.values()}
    wanted |= {f"pp_gram_{s}" for s in PP._BASIS.values()}
    wanted |= {f"pp_apply_{s}_f64" for s in PP._SKETCH.values()}
    wanted |= {f"pp_apply_f64_{s}" for s in PP._BASIS.values()}
    assert wanted <= post, wanted - post


def test_loader_source_inlines_common_header():
    for cu in CU_FILES:
        text = LOADER.source(cu)
        assert '#include "common.cuh"' not in text
        assert "struct BF16" in text and "mix64" in text


# ---------------------------------------------------------------------------------------------
# 2. Host emulation of the kernels
# ---------------------------------------------------------------------------------------------
EMU_HEADER = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <utility>
#include <algorithm>
#include <ucontext.h>
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
static unsigned char* emu_dyn_smem = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static  /* blocks run one at a time: a static is block-shared */
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline double __longlong_as_double(unsigned long long u) { double d; std::memcpy(&d, &u, 8); return d; }
static inline double cospi(double x) { return std::cos(M_PI * x); }
static inline float emu_h2f(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
static inline unsigned short emu_f2h(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }
static inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
static inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
static ucontext_t emu_main;
static std::vector<ucontext_t> emu_ctx;
static std::vector<std::vector<char>> emu_stacks;
static std::vector<int> emu_state;  /* 0 runnable, 1 at a barrier, 2 finished */
static int emu_cur = 0, emu_reverse = 0;
static void (*emu_body)() = nullptr;
static inline void __syncthreads() { emu_state[emu_cur] = 1; swapcontext(&emu_ctx[emu_cur], &emu_main); }
static double emu_slot[1024];
static inline double __shfl_down_sync(unsigned, double v, int off) {
    /* only ever called by all threads of the block together (warp_sum) */
    const int t = threadIdx.x;
    emu_slot[t] = v;
    __syncthreads();
    const double r = (t & 31) + off < 32 ? emu_slot[t + off] : v;
    __syncthreads();
    return r;
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int mask) {
    /* only ever called by all threads of the block together (the kernels' split sums) */
    const int t = threadIdx.x;
    emu_slot[t] = (double)v;
    __syncthreads();
    const T r = (T)emu_slot[t ^ mask];
    __syncthreads();
    return r;
}
static void emu_entry() { emu_body(); emu_state[emu_cur] = 2; }
static void emu_run_block(int nthreads) {
    emu_ctx.assign(nthreads, ucontext_t());
    emu_stacks.resize(nthreads);
    emu_state.assign(nthreads, 0);
    for (int t = 0; t < nthreads; ++t) {
        emu_stacks[t].resize(1 << 16);
        getcontext(&emu_ctx[t]);
        emu_ctx[t].uc_stack.ss_sp = emu_stacks[t].data();
        emu_ctx[t].uc_stack.ss_size = emu_stacks[t].size();
        emu_ctx[t].uc_link = &emu_main;
        makecontext(&emu_ctx[t], emu_entry, 0);
    }
    for (;;) {
        for (int i = 0; i < nthreads; ++i) {
            const int t = emu_reverse ? nthreads - 1 - i : i;
            if (emu_state[t] != 0) continue;
            emu_cur = t;
            threadIdx.x = t;
            swapcontext(&emu_main, &emu_ctx[t]);
        }
        bool done = true;
        for (int t = 0; t < nthreads; ++t)
            if (emu_state[t] == 1) { emu_state[t] = 0; done = false; }
        if (done) break;
    }
}
template <class... Args> struct EmuCall {
    static inline void (*fn)(Args...) = nullptr;
    static inline void** params = nullptr;
    template <size_t... I> static void call(std::index_sequence<I...>) { fn(*reinterpret_cast<Args*>(params[I])...); }
    static void entry() { call(std::index_sequence_for<Args...>{}); }
};
template <class... Args>
static void emu_launch(void (*fn)(Args...), int gx, int gy, int gz, int bx, long smem, void** params) {
    EmuCall<Args...>::fn = fn;
    EmuCall<Args...>::params = params;
    emu_body = &EmuCall<Args...>::entry;
    std::vector<unsigned char> dyn(smem > 0 ? smem : 1);
    emu_dyn_smem = dyn.data();
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz; blockDim.x = bx;
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                std::memset(dyn.data(), 0xff, dyn.size());  /* NaN bytes: uninitialised reads show */
                emu_run_block(bx);
            }
}
extern "C" void emu_set_reverse(int r) { emu_reverse = r; }
"""
# The two PTX conversions of common.cuh, replaced by their host equivalents.
EMU_ASM = {
    'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));': "f = emu_h2f(h);",
    'asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));': "h = emu_f2h(v);",
}
EMU_SCALARS = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
               np.float32: ctypes.c_float, np.float64: ctypes.c_double}
EMU_SHARED_LIMIT = 227 * 1024  # H100's opt-in shared memory per block
EMU_SM_COUNT = 2  # few "SMs": the launchers then split columns/rows into several chunks


class EmuKernel:
    """Stands in for a cupy RawKernel: same call signature, strict argument types."""

    shared_size_bytes = 0

    def __init__(self, lib, name):
        self.fn = getattr(lib, "emu_" + name)
        self.name = name

    def __call__(self, grid, block, args, shared_mem=0):
        assert shared_mem <= EMU_SHARED_LIMIT, (self.name, shared_mem)
        objs = []
        for a in args:
            if a is None:
                objs.append(ctypes.c_void_p(0))
            elif isinstance(a, torch.Tensor):
                objs.append(ctypes.c_void_p(a.data_ptr()))
            elif type(a) in EMU_SCALARS:  # the launchers must pass the kernel's C types
                objs.append(EMU_SCALARS[type(a)](a.item()))
            else:
                raise TypeError(f"{self.name}: argument of type {type(a).__name__}")
        params = (ctypes.c_void_p * len(objs))(
            *[ctypes.cast(ctypes.pointer(o), ctypes.c_void_p) for o in objs])
        g = tuple(grid) + (1,) * (3 - len(grid))
        self.fn(*(ctypes.c_int(v) for v in g), ctypes.c_int(block[0]), ctypes.c_long(shared_mem),
                params)


def _build_emulation(cu: str, workdir: Path):
    text = LOADER.source(cu).replace("#pragma once", "")
    for a, b in EMU_ASM.items():
        assert a in text, a
        text = text.replace(a, b)
    ext = "extern __shared__ __align__(16) unsigned char smem_raw[];"
    assert ext in text
    text = text.replace(ext, "unsigned char* smem_raw = emu_dyn_smem;")
    exports = "\n".join(
        f'extern "C" void emu_{n}(int gx, int gy, int gz, int bx, long smem, void** p) '
        f"{{ emu_launch({n}, gx, gy, gz, bx, smem, p); }}" for n in sorted(_entry_points(cu)))
    cpp = workdir / (cu + ".cpp")
    so = workdir / (cu + ".so")
    cpp.write_text(EMU_HEADER + "\n" + text + "\n" + exports + "\n")
    proc = subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                           "-o", str(so), str(cpp)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="session")
def emu_libs(tmp_path_factory):
    if shutil.which("g++") is None or not sys.platform.startswith("linux"):
        pytest.skip("the kernel emulation needs g++ and ucontext (Linux)")
    work = tmp_path_factory.mktemp("cupy_emu")
    return {cu: _build_emulation(cu, work) for cu in CU_FILES}


def _emulate(order, emu_libs, monkeypatch):
    """Run the launchers on CPU tensors with the emulated kernels (threads in the given order)."""
    for lib in emu_libs.values():
        lib.emu_set_reverse(1 if order == "reverse" else 0)

    def check_cuda(op, **tensors):
        devices = {t.device for t in tensors.values() if t is not None}
        assert devices == {torch.device("cpu")}, devices
        return torch.device("cpu")

    monkeypatch.setattr(LOADER, "function", lambda cu, name, device: EmuKernel(emu_libs[cu], name))
    monkeypatch.setattr(LOADER, "check_cuda", check_cuda)
    monkeypatch.setattr(LOADER, "on_torch_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(LOADER, "max_shared_bytes", lambda device: EMU_SHARED_LIMIT)
    monkeypatch.setattr(LOADER, "sm_count", lambda device: EMU_SM_COUNT)
    return order


@pytest.fixture
def emulated(emu_libs, monkeypatch):
    """Emulated kernels, threads of a block in forward order."""
    return _emulate("forward", emu_libs, monkeypatch)


@pytest.fixture(params=["forward", "reverse"])
def emulated_both(request, emu_libs, monkeypatch):
    """Emulated kernels in both thread orders: a missing __syncthreads fails one of them."""
    return _emulate(request.param, emu_libs, monkeypatch)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 70, 45, 5), (2, 33, 97, 37), (1, 1, 7, 1)],
                         ids=["70x45_k5", "b2_33x97_k37", "1x7_k1"])
def test_emulated_sketch_matches_reference(emulated, dtype, shape):
    b, m, n, k = shape
    W = torch.randn(b, m, n, generator=_gen(1), dtype=F64).to(dtype)
    U = torch.randn(b, m, k, generator=_gen(2))
    V = torch.randn(b, n, k, generator=_gen(3))
    check_sketch(SK.sketch_cupy(W, U, V), W, U, V)


@pytest.mark.parametrize("k", [8, 13, 16, 24, 32, 64])
def test_emulated_sketch_every_chunk_width(emulated_both, k):
    """Every sketch chunk (KC = 8, 16, 32; padded, exact and several chunks) and its thread
    layout, over 3 row bands and 4 column tiles split into column chunks, in both thread orders."""
    assert FS.chunk_layout(k)[0] == (8 if k <= 8 else 16 if k <= 16 else 32)
    W = torch.randn(1, 130, 100, generator=_gen(7))
    U = torch.randn(1, 130, k, generator=_gen(8))
    V = torch.randn(1, 100, k, generator=_gen(9))
    check_sketch(SK.sketch_cupy(W, U, V), W, U, V)


def test_emulated_sketch_strided_and_broadcast_bases(emulated_both):
    W = torch.randn(45, 70, generator=_gen(4)).T  # (70, 45), column-major: strided rows
    U = torch.randn(70, 3, generator=_gen(5))
    V = torch.randn(1, 45, 3, generator=_gen(6))
    out = SK.sketch_cupy(W, U, V)
    assert out.Y.shape == (1, 70, 3)
    check_sketch(out, W.unsqueeze(0), U.unsqueeze(0), V)


HYPERS = {
    "plain": dict(lr=0.1),
    "wd_momentum": dict(lr=0.05, weight_decay=0.01, momentum=0.9),
    "all": dict(lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.1, nesterov=True, maximize=True),
    "lr_cpu_tensor": dict(lr=torch.tensor(0.03, dtype=F64), momentum=0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
def test_emulated_fused_step_matches_torch_sgd(emulated, dtype, hyper):
    """Two steps (first-step buffer init, then the update) against torch, and the sketch.

    Low precision: error vs a float64 run <= 2 x torch's own error in that dtype + one ulp per
    step (the kernel computes in fp32 and rounds once; torch rounds after every operation; and the
    kernel's w - lr g may be one fused multiply-add where torch rounds the product first, which
    also makes float64 differ from the float64 reference by up to an ulp per step).
    """
    cfg = HYPERS[hyper]
    m, n, k = 37, 70, 6
    W0 = torch.randn(m, n, generator=_gen(7), dtype=F64)
    Gs = [torch.randn(m, n, generator=_gen(8 + s), dtype=F64) for s in range(2)]
    U = torch.randn(1, m, k, generator=_gen(11))
    V = torch.randn(1, n, k, generator=_gen(12))
    Wk, Wt, W64 = W0.to(dtype).clone(), W0.to(dtype).clone(), W0.clone()
    bk = bt = b64 = None
    for G in Gs:
        version = Wk._version
        out, bk = FS.fused_sgd_sketch_cupy(Wk, G.to(dtype), bk, U, V, **cfg)
        assert Wk._version > version  # autograd sees the in-place update
        _, bt = fused_sgd_sketch_torch(Wt, G.to(dtype), bt, U, V, **cfg)
        b64 = sgd_update_torch(W64, G, b64, **cfg)
        check_sketch(out, Wk.unsqueeze(0), U, V)  # the sketch of the weight as stored
    for got, mine, exact in ((Wk, Wt, W64), (bk, bt, b64)):
        if exact is None:
            assert got is None and mine is None
            continue
        assert got.dtype == dtype and got.shape == exact.shape and got.stride() == exact.stride()
        err = (got.double() - exact).abs().max()
        err_torch = (mine.double() - exact).abs().max()
        ulp = 2 * UNIT[dtype] * exact.abs().max()
        assert err <= 2 * err_torch + len(Gs) * ulp, (err, err_torch)


def test_emulated_fused_conv_weight_and_strided_gradient(emulated_both):
    W0 = torch.randn(8, 3, 3, 3, generator=_gen(13))
    G = torch.randn(3, 3, 3, 8, generator=_gen(14)).permute(3, 0, 1, 2)  # non-contiguous
    U = torch.randn(8, 4, generator=_gen(15))
    V = torch.randn(1, 27, 4, generator=_gen(16))
    Wk, Wt = W0.clone(), W0.clone()
    out, bk = FS.fused_sgd_sketch_cupy(Wk, G, None, U, V, lr=0.1, momentum=0.5)
    _, bt = fused_sgd_sketch_torch(Wt, G, None, U.unsqueeze(0), V, lr=0.1, momentum=0.5)
    torch.testing.assert_close(Wk, Wt, rtol=2 * U32, atol=2 * U32)
    torch.testing.assert_close(bk, bt, rtol=0, atol=0)  # buf = g: no arithmetic on the first step
    check_sketch(out, as_batched(Wk), U.unsqueeze(0), V)


def test_emulated_fused_without_sketch_and_without_momentum(emulated):
    W0 = torch.randn(20, 33, generator=_gen(17))
    G = torch.randn(20, 33, generator=_gen(18))
    Wk, Wt = W0.clone(), W0.clone()
    out, buf = FS.fused_sgd_sketch_cupy(Wk, G, None, None, None, lr=0.2)
    sgd_update_torch(Wt, G, None, lr=0.2)
    assert out is None and buf is None
    torch.testing.assert_close(Wk, Wt, rtol=2 * U32, atol=2 * U32)


@pytest.mark.parametrize("shape", [(37, 70), (6, 3, 3, 3)], ids=["matrix", "conv_kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_many_matches_one_launch_per_matrix(emulated_both, shape, dtype):
    """Three separate parameters of one shape in one launch (the kernel reads their addresses
    from a table) against one launch each: the update is elementwise, so weights and buffers
    agree bit for bit (first step: buffers initialised; second: read); the sketches agree to
    rounding (the batched launch splits the columns into fewer chunks)."""
    b, k = 3, 4
    m, n = shape[0], math.prod(shape[1:])
    hyper = dict(lr=0.05, weight_decay=0.01, momentum=0.9, nesterov=True)
    Ws = [torch.randn(*shape, generator=_gen(40 + i)).to(dtype) for i in range(b)]
    Wone = [W.clone() for W in Ws]
    U = torch.randn(b, m, k, generator=_gen(50))
    V = torch.randn(b, n, k, generator=_gen(51))
    bufs = bones = None
    for step in range(2):
        Gs = [torch.randn(*shape, generator=_gen(60 + 10 * step + i)).to(dtype) for i in range(b)]
        out, bufs = FS.fused_sgd_sketch_cupy_many(Ws, Gs, bufs, U, V, **hyper)
        ones = [FS.fused_sgd_sketch_cupy(Wone[i], Gs[i], None if bones is None else bones[i],
                                         U[i], V[i], **hyper) for i in range(b)]
        bones = [buf for _, buf in ones]
        for i in range(b):
            assert torch.equal(Ws[i], Wone[i]) and torch.equal(bufs[i], bones[i])
            for f in ("Y", "Z", "fro2", "row_sq"):
                torch.testing.assert_close(getattr(out, f)[i], getattr(ones[i][0], f)[0],
                                           rtol=1e-5, atol=1e-5)
        check_sketch(out, torch.stack([as_batched(W)[0] for W in Ws]), U, V)


def test_emulated_sketch_many_matches_one_launch_per_matrix(emulated_both):
    """The sketch-only pass of three separate matrices in one launch (SpectrumTracker's)."""
    b, m, n, k = 3, 20, 33, 5
    Ws = [torch.randn(m, n, generator=_gen(80 + i)) for i in range(b)]
    before = [W.clone() for W in Ws]
    U = torch.randn(b, m, k, generator=_gen(90))
    V = torch.randn(b, n, k, generator=_gen(91))
    out = SK.sketch_cupy_many(Ws, U, V)
    assert all(torch.equal(W, w0) for W, w0 in zip(Ws, before))  # read only
    check_sketch(out, torch.stack(Ws), U, V)
    for i in range(b):
        one = SK.sketch_cupy(Ws[i], U[i:i + 1], V[i:i + 1])
        for f in ("Y", "Z", "fro2", "row_sq"):
            torch.testing.assert_close(getattr(out, f)[i], getattr(one, f)[0], rtol=1e-5, atol=1e-5)


def test_emulated_many_rejects_mixed_operands(emulated):
    Ws = [torch.randn(8, 5) for _ in range(2)]
    Gs = [torch.randn(8, 5) for _ in range(2)]
    U, V = torch.randn(2, 8, 2), torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="momentum buffer or none"):
        FS.fused_sgd_sketch_cupy_many(Ws, Gs, [torch.zeros(8, 5), None], U, V, lr=0.1,
                                      momentum=0.9)
    with pytest.raises(ValueError, match="contiguous"):
        FS.fused_sgd_sketch_cupy_many(Ws, [Gs[0], torch.randn(5, 8).T], None, U, V, lr=0.1)
    with pytest.raises(ValueError, match="contiguous"):
        FS.fused_sgd_sketch_cupy_many([Ws[0], torch.randn(8, 6)], Gs, None, U, V, lr=0.1)
    with pytest.raises(ValueError, match="U has shape"):
        FS.fused_sgd_sketch_cupy_many(Ws, Gs, None, U[:1, :7], V, lr=0.1)


@pytest.mark.parametrize("shape", [(20, 1100), (50, 3), (4, 3, 5, 5)],
                         ids=["two_column_blocks", "thin", "conv_kernel"])
@pytest.mark.parametrize("hyper", [dict(lr=0.1, momentum=0.9, dampening=0.6, weight_decay=0.01),
                                   dict(lr=0.05, momentum=0.5, nesterov=True, maximize=True)],
                         ids=["dampening", "nesterov_maximize"])
def test_emulated_plain_update_matches_torch_sgd(emulated, shape, hyper, monkeypatch):
    """The untracked step (elementwise sgd_update kernel) against torch.optim.SGD, three steps
    (the first creates the buffer), a transposed gradient, more rows than grid rows (the grid
    limit, 65535 on a GPU, lowered to 7 here: the kernel's row loop). Each step starts both
    from the same state: torch's CPU kernels contract a * b + c into FMAs and the emulation
    (g++ -O2, no -mfma) does not, so results agree to an ulp or two per step, not bit for bit
    (the GPU tests compare the kernel with torch's CUDA SGD)."""
    monkeypatch.setattr(FS, "GRID_Y", 7)
    W0 = torch.randn(*shape, generator=_gen(19))
    p = torch.nn.Parameter(W0.clone())
    opt = torch.optim.SGD([p], foreach=False, **hyper)
    W, buf = W0.clone(), None
    for step in range(3):
        G = torch.randn(*reversed(shape), generator=_gen(30 + step)).permute(
            *reversed(range(len(shape))))  # same shape, transposed strides
        out, buf = FS.fused_sgd_sketch_cupy(W, G, buf, None, None, **hyper)
        p.grad = G.clone()
        opt.step()
        assert out is None
        for mine, theirs in ((W, p.detach()), (buf, opt.state[p]["momentum_buffer"])):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=2 * U32 * theirs.abs().max())
            theirs.copy_(mine)  # the next step from the same state


def test_launcher_forms_one_minus_dampening_in_double(emulated, monkeypatch):
    """torch passes alpha = 1 - dampening computed in double, rounded once to float32; 1 - 0.6
    formed in float32 is a different float (0.39999998 against 0.4)."""
    seen = []
    real = LOADER.function

    def spy(cu, name, device):
        fn = real(cu, name, device)
        return lambda grid, block, args, **kw: (seen.append((name, args)), fn(grid, block, args, **kw))

    monkeypatch.setattr(LOADER, "function", spy)
    W, G = torch.randn(8, 40, generator=_gen(40)), torch.randn(8, 40, generator=_gen(41))
    U, V = torch.randn(8, 4, generator=_gen(42)), torch.randn(40, 4, generator=_gen(43))
    buf = torch.zeros_like(W)
    FS.fused_sgd_sketch_cupy(W, G, buf, None, None, lr=0.1, momentum=0.9, dampening=0.6)
    FS.fused_sgd_sketch_cupy(W, G, buf, U, V, lr=0.1, momentum=0.9, dampening=0.6)
    assert np.float32(1.0 - 0.6) != np.float32(1.0) - np.float32(0.6)
    assert [name for name, _ in seen] == ["sgd_update_f32", "fused_sgd_sketch_f32_k8"]  # k = 4
    for _, args in seen:
        keep = [a for a in args if type(a) is np.float32][3]  # lr, weight_decay, momentum, keep
        assert keep == np.float32(1.0 - 0.6)


def _orth(p, k, seed):
    return torch.linalg.qr(torch.randn(p, k, generator=_gen(seed), dtype=F64))[0]


def _spectrum(p, k, s, seed):
    """p x k sketch with singular values s (float64)."""
    return _orth(p, k, seed) @ torch.diag(torch.as_tensor(s, dtype=F64)) @ _orth(k, k, seed + 1).T


def _postprocess_case(case):
    """(Y, Z, U_old, V_old) of a named test case."""
    if case == "random_f32":
        b, m, n, k = 2, 70, 50, 6
        Y = torch.randn(b, m, k, generator=_gen(20))
        Z = torch.randn(b, n, k, generator=_gen(21))
        U = torch.stack([_orth(m, k, 22 + i) for i in range(b)]).float()
        V = torch.stack([_orth(n, k, 24 + i) for i in range(b)]).float()
        return Y, Z, U, V
    if case == "deficient_f32":  # zero columns, duplicated columns, a zero sketch
        Y, Z, U, V = _postprocess_case("random_f32")
        Y[0, :, 3:] = 0
        Y[1, :, 2] = Y[1, :, 0]
        return Y, torch.zeros_like(Z), U, V
    if case == "zero_f64":
        m, n, k = 40, 33, 5
        return (torch.zeros(1, m, k, dtype=F64), torch.zeros(1, n, k, dtype=F64),
                _orth(m, k, 26)[None], _orth(n, k, 27)[None])
    if case == "rank3_k40_f64":  # k > 32: several tiles; exact rank 3 in float64
        m, n, k = 90, 75, 40
        Y = (torch.randn(m, 3, generator=_gen(28), dtype=F64)
             @ torch.randn(3, k, generator=_gen(29), dtype=F64))[None]
        Z = torch.randn(1, n, k, generator=_gen(30), dtype=F64)
        return Y, Z, _orth(m, k, 31)[None], _orth(n, k, 32)[None]
    if case == "clustered_f64":  # repeated and 1e-9-split singular values, a graded tail
        m, n, k = 64, 48, 16
        s = [1, 1, 1 + 1e-9, 1 - 1e-9, 0.5, 0.5, 0.5, 0.1] + [1e-2] * 4 + [1e-4, 1e-5, 1e-5, 1e-6]
        Y = _spectrum(m, k, s, 33)[None]
        Z = _spectrum(n, k, s[::-1], 35)[None]
        return Y, Z, _orth(m, k, 37)[None], _orth(n, k, 38)[None]
    if case == "odd_k7_f64":  # odd k: the Jacobi rounds pair one index with a dummy
        m, n, k = 50, 40, 7
        Y = _spectrum(m, k, [3, 2, 2, 1, 0.5, 0.25, 0.1], 39)[None]
        Z = torch.randn(1, n, k, generator=_gen(40), dtype=F64)
        return Y, Z, _orth(m, k, 41)[None], _orth(n, k, 42)[None]
    if case == "random_bf16_bases":
        Y, Z, U, V = _postprocess_case("random_f32")
        return Y, Z, U.to(torch.bfloat16), V.to(torch.bfloat16)
    raise KeyError(case)


PP_CASES = ["random_f32", "deficient_f32", "zero_f64", "rank3_k40_f64", "clustered_f64",
            "odd_k7_f64", "random_bf16_bases"]


@pytest.mark.parametrize("case", PP_CASES)
def test_emulated_postprocess_matches_reference(emulated, case):
    """Same refill candidates as the reference: every column comparable (up to sign/cluster)."""
    _compare_with_reference(case)


def _compare_with_reference(case):
    Y, Z, U, V = _postprocess_case(case)
    b, m, k = Y.shape
    n = Z.shape[1]
    seed, step = 3, 5
    ref = postprocess_torch(Y, Z, U, V, seed=seed, step=step)
    refill = (refill_candidates((b, m, k), seed, 2 * step, "cpu"),
              refill_candidates((b, n, k), seed, 2 * step + 1, "cpu"))
    out = PP.postprocess_cupy(Y, Z, U, V, seed=seed, step=step, refill=refill)
    check_postprocess(out, ref, U, V, same_refill=True)


@pytest.mark.parametrize("case", ["deficient_f32", "zero_f64"])
def test_emulated_postprocess_hash_refill(emulated, case):
    """Own (hashed) refill candidates: kept directions as the reference, refilled ones orthogonal
    to them; deterministic in (seed, step); a CPU tensor step is the same as the int."""
    Y, Z, U, V = _postprocess_case(case)
    ref = postprocess_torch(Y, Z, U, V, seed=3, step=5)
    out = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=5)
    check_postprocess(out, ref, U, V, same_refill=False)
    again = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=torch.tensor(5))
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    other = PP.postprocess_cupy(Y, Z, U, V, seed=3, step=6)
    refilled = (out.sigma_y[0] == 0).nonzero().flatten()
    assert not torch.equal(out.U[0][:, refilled], other.U[0][:, refilled])


@pytest.mark.parametrize("case", ["deficient_f32", "rank3_k40_f64"])
def test_emulated_postprocess_thread_order(emulated_both, case):
    """Both thread orders give the reference's result (every barrier of the pipeline is needed)."""
    _compare_with_reference(case)


def _many_groups():
    """Three groups of one k and basis dtype but different shapes (the largest p is not in the
    first group), one of them rank-deficient (refilled directions) and one with float32 sketches
    converted to float64 alongside float64 ones."""
    Y0, Z0, U0, V0 = _postprocess_case("random_f32")  # b = 2, 70 x 50, k = 6
    Y1, Z1, U1, V1 = _postprocess_case("deficient_f32")
    m2, n2, k = 40, 96, 6
    Y2 = _spectrum(m2, k, [4, 3, 2, 1, 0.5, 0.1], 43)[None].float()
    Z2 = torch.randn(1, n2, k, generator=_gen(44))
    U2 = _orth(m2, k, 45)[None].float().contiguous()  # (QR's Q comes column-major)
    V2 = _orth(n2, k, 46)[None].float().contiguous()
    return [(Y0, Z0, U0, V0, 3), (Y1, Z1, U1, V1, 11), (Y2, Z2, U2, V2, 7)]


def _assert_post_close(a, b, what):
    """Two post-processings of the same group: equal up to float64 rounding of the Gram sums
    (their row chunks follow the call's rows), then the basis dtype's rounding."""
    for name in ("sigma", "sigma_y", "sigma_z", "overlap_u", "overlap_v"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, (what, name)
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12 * float(y.abs().max())), (what, name)
    for name in ("U", "V"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, (what, name)
        # one float32 rounding apart at most (float64 values that differ by rounding)
        assert (x.double() - y.double()).abs().max() <= 2e-7, (what, name)


def test_emulated_postprocess_many_matches_one_call_per_group(emulated):
    """Groups of different shapes in one launch sequence give each group's own call's results,
    for given refill candidates (compared with the reference) and for hashed ones (each group
    keeps its seed; the refilled directions are those of its own call)."""
    groups = _many_groups()
    outs = PP.postprocess_cupy_many(groups, step=5)
    assert len(outs) == len(groups)
    for g, ((Y, Z, U, V, seed), out) in enumerate(zip(groups, outs)):
        alone = PP.postprocess_cupy(Y, Z, U, V, seed=seed, step=5)
        _assert_post_close(out, alone, f"group {g}")
        check_postprocess(out, postprocess_torch(Y, Z, U, V, seed=seed, step=5), U, V,
                          same_refill=False)
    assert (outs[1].sigma_y[0] == 0).any()  # the deficient group was refilled
    # its two zero Z sketches: all of V refilled, from candidates hashed per matrix
    assert (outs[1].sigma_z == 0).all()
    assert not torch.allclose(outs[1].V[0], outs[1].V[1], atol=1e-2)
    refills = [(refill_candidates(Y.shape, seed, 10, "cpu"),
                refill_candidates(Z.shape, seed, 11, "cpu")) for Y, Z, _, _, seed in groups]
    outs = PP.postprocess_cupy_many(groups, step=5, refills=refills)
    for (Y, Z, U, V, seed), out in zip(groups, outs):
        check_postprocess(out, postprocess_torch(Y, Z, U, V, seed=seed, step=5), U, V,
                          same_refill=True)


def test_emulated_postprocess_table_does_not_change_with_the_sketches(emulated, monkeypatch):
    """The problem table holds sizes, seeds and the old bases' addresses, not the sketches'
    (new tensors every step, and inside a CUDA graph capture from the graph's own pool): with
    static bases (a TrackedSet's packs) it is uploaded once, before any capture."""
    loader = kernel_module("cupy", "_loader")
    seen = []
    real = loader.device_table
    def spy(values, device):
        seen.append(values)
        return real(values, device)

    monkeypatch.setattr(loader, "device_table", spy)
    groups = _many_groups()
    assert all(t.is_contiguous() for g in groups for t in g[2:4])
    PP.postprocess_cupy_many(groups, step=1)
    fresh = [(Y.clone(), Z.clone(), U, V, seed) for Y, Z, U, V, seed in groups]
    PP.postprocess_cupy_many(fresh, step=2)
    assert len(seen) == 2 and seen[0] == seen[1], [(i, a, b) for i, (a, b) in enumerate(zip(*seen)) if a != b][:5]


def _with_tall_group(groups):
    """Add a tall matrix (p = 600 beside <= 96: several Gram chunks, as a vocabulary embedding
    beside a model's layers)."""
    gen = _gen(47)
    return groups + [(torch.randn(1, 600, 6, generator=gen), torch.randn(1, 30, 6, generator=gen),
                      _orth(600, 6, 48)[None].float().contiguous(),
                      _orth(30, 6, 49)[None].float().contiguous(), 5)]


def test_emulated_postprocess_many_gram_chunks_of_a_tall_problem(emulated):
    """The tall problem's Gram rows are split into chunks (summed by the consumers in their
    chunk range) while the short ones are one chunk each: results equal each group's own call."""
    groups = _with_tall_group(_many_groups())
    dims = tuple((Y.shape[0], Y.shape[1], Z.shape[1]) for Y, Z, *_ in groups)
    plan = PP._plan(dims, 6, 4, True, EMU_SM_COUNT)
    problems = 2 * sum(d[0] for d in dims)
    assert -(-600 // plan.rows_per_chunk) > 1 and plan.chunks > problems  # the tall one: several
    outs = PP.postprocess_cupy_many(groups, step=3)
    for g, ((Y, Z, U, V, seed), out) in enumerate(zip(groups, outs)):
        _assert_post_close(out, PP.postprocess_cupy(Y, Z, U, V, seed=seed, step=3), f"group {g}")


def test_postprocess_gram_chunks_split_each_problem_evenly():
    """A problem's Gram chunks have equal rows (whole tiles, <= the call's bound) and cover its
    rows with a non-empty last chunk: 4096 rows under a bound of 4000 are two chunks of 2048
    (not 4000 and 96, whose long chunk would double the pass's critical path)."""
    assert PP._problem_chunks(4096, 4000) == (2, 2048)
    for bound in (256, 320, 768, 4000):
        for p in list(range(1, 2 * bound + 70, 7)) + [50257]:
            n, rows = PP._problem_chunks(p, bound)
            assert rows % PP.TILE == 0 and rows <= bound and n == -(-p // bound), (p, bound)
            assert (n - 1) * rows < p <= n * rows, (p, bound, n, rows)


def test_emulated_postprocess_many_grids_hold_no_empty_blocks(emulated, monkeypatch):
    """The row kernels launch one block per 32-row tile (refill, apply) or per Gram chunk of
    each problem, whatever the largest p: a tall matrix beside short ones does not launch its
    tile count for every problem. The older grids, largest p by number of problems, made GPT-2
    small's post-processing (a 50257-row embedding beside 768-row layers) 3x slower on an H100
    than one call per shape."""
    seen = []
    real = LOADER.function

    def spy(cu, name, device):
        fn = real(cu, name, device)
        return lambda grid, block, args, **kw: (seen.append((name, tuple(grid))), fn(grid, block, args, **kw))

    monkeypatch.setattr(LOADER, "function", spy)
    groups = _with_tall_group(_many_groups())
    PP.postprocess_cupy_many(groups, step=3)
    ps = [p for Y, Z, *_ in groups for p in [Y.shape[1]] * Y.shape[0] + [Z.shape[1]] * Z.shape[0]]
    dims = tuple((Y.shape[0], Y.shape[1], Z.shape[1]) for Y, Z, *_ in groups)
    per_chunk = PP._plan(dims, 6, 4, True, EMU_SM_COUNT).rows_per_chunk
    tiles = sum(-(-p // PP.TILE) for p in ps)
    chunks = sum(-(-p // per_chunk) for p in ps)
    grids = {name: grid for name, grid in seen}
    assert grids["pp_refill"] == (tiles, 1, 1)
    assert all(grid[0] == tiles and grid[2] == 1 for name, grid in seen if name.startswith("pp_apply"))
    assert all(grid[0] == chunks and grid[2] == 1 for name, grid in seen if name.startswith("pp_gram"))
    assert grids["pp_eig"] == (len(ps), 1, 1)


def test_emulated_postprocess_many_mixed_sketch_dtypes(emulated):
    """float32 and float64 sketches in one call: all are read as float64, as one group's
    float64 call would."""
    groups = _many_groups()
    Y, Z, U, V, seed = groups[2]
    groups[2] = (Y.double(), Z.double(), U, V, seed)
    outs = PP.postprocess_cupy_many(groups, step=2)
    for g, ((Y, Z, U, V, seed), out) in enumerate(zip(groups, outs)):
        alone = PP.postprocess_cupy(Y.double(), Z.double(), U, V, seed=seed, step=2)
        _assert_post_close(out, alone, f"group {g}")


def test_emulated_postprocess_many_rejects_mixed_groups(emulated):
    groups = _many_groups()
    Y, Z, U, V, seed = groups[2]
    with pytest.raises(ValueError, match="same sketch width"):
        PP.postprocess_cupy_many(groups[:2] + [(Y[..., :5], Z[..., :5], U[..., :5], V[..., :5], 0)])
    with pytest.raises(TypeError, match="same basis dtype"):
        PP.postprocess_cupy_many(groups[:2] + [(Y, Z, U.double(), V.double(), seed)])
    with pytest.raises(ValueError, match="non-empty"):
        PP.postprocess_cupy_many([])
    with pytest.raises(ValueError, match="one \\(Ry, Rz\\) per group"):
        PP.postprocess_cupy_many(groups, refills=[])


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-shortcut", "masked-gpu-path"])
def test_emulated_absorb_groups_one_launch_sequence_for_every_shape(emulated, monkeypatch,
                                                                     host_reads):
    """A step of trackers of three shapes with one k and one of another k, on the CuPy kernel:
    the three share one postprocess_cupy_many call, the odd one has its own; every tracker's
    state is that of its group's own absorb_group, a non-finite sketch included."""
    from lowrank import _checks
    from lowrank.tracking import MatrixTracker, absorb_group, absorb_groups

    if not host_reads:
        monkeypatch.setattr(_checks, "host_reads_are_free", lambda t: False)
    calls = []
    real = PP.postprocess_cupy_many

    def spy(groups, **kw):
        calls.append([g[0].shape for g in groups])
        return real(groups, **kw)

    monkeypatch.setattr(PP, "postprocess_cupy_many", spy)
    gen = torch.Generator().manual_seed(7)
    shapes = [((24, 40), 6, 2), ((50, 30), 6, 1), ((36, 36), 6, 2), ((20, 16), 4, 1)]
    weights = [[torch.randn(s, generator=gen) for _ in range(b)] for s, _, b in shapes]
    weights[1][0][:, 2:] = 0.0  # rank 2 < k: refilled directions

    def trackers():
        return [[MatrixTracker(f"g{g}.{i}", s, k, seed=g) for i in range(b)]
                for g, (s, k, b) in enumerate(shapes)]

    alone, together = trackers(), trackers()
    for step in range(3):
        mats = [[W.clone() for W in ws] for ws in weights]
        if step == 1:
            mats[2][1][0, 0] = float("nan")
        for trs, ws in zip(alone, mats):
            absorb_group(trs, [sketch_torch(W, t.U, t.V) for t, W in zip(trs, ws)],
                         backend="cupy")
        calls.clear()
        absorb_groups([(trs, [sketch_torch(W, t.U, t.V) for t, W in zip(trs, ws)], None, None,
                        None, "cupy") for trs, ws in zip(together, mats)])
        # one launch sequence for the k = 6 groups; the k = 4 group has its own
        assert calls == [[(2, 24, 6), (1, 50, 6), (2, 36, 6)], [(1, 20, 4)]]
        for a_trs, t_trs in zip(alone, together):
            for a, t in zip(a_trs, t_trs):
                assert a.step == t.step == step + 1
                post = _committed(t)
                _assert_post_close(post, _committed(a), f"{a.name} step {step}")
                assert torch.equal(t.fro2, a.fro2) and torch.equal(t.row_sq, a.row_sq)
                assert bool(t.nonfinite) == bool(a.nonfinite) == (step == 1 and a.name == "g2.1")


def _committed(tracker):
    """A tracker's committed state as the fields _assert_post_close compares."""
    from lowrank.postprocess import PostOut
    return PostOut(tracker.sigma, tracker.sigma_y, tracker.sigma_z, tracker.U, tracker.V,
                   tracker.overlap_u, tracker.overlap_u)


def test_emulated_postprocess_rejects_bad_shapes(emulated):
    Y = torch.randn(1, 4, 6)  # m < k
    with pytest.raises(ValueError, match="k <= min"):
        PP.postprocess_cupy(Y, torch.randn(1, 9, 6), torch.randn(1, 4, 6), torch.randn(1, 9, 6))
    with pytest.raises(TypeError, match="one dtype"):
        PP.postprocess_cupy(torch.randn(1, 9, 3), torch.randn(1, 9, 3), torch.randn(1, 9, 3),
                            torch.randn(1, 9, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# 3. No CuPy, no GPU
# ---------------------------------------------------------------------------------------------
def test_modules_import_without_cupy():
    """Importing the CuPy backend's modules never imports CuPy (run with CuPy blocked)."""
    code = (
        "import sys\n"
        "sys.modules['cupy'] = None\n"  # any 'import cupy' now raises ImportError
        "from lowrank.backends import kernel_module\n"
        "for op in ('postprocess', 'fused_sgd_sketch', 'sketch', '_loader'):\n"
        "    kernel_module('cupy', op)\n"
        "import lowrank.kernels.cupy.postprocess as pp\n"
        "from lowrank.backends import BackendUnavailable\n"
        "try:\n"
        "    pp._loader.require_cupy()\n"
        "except BackendUnavailable as exc:\n"
        "    print('unavailable:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "unavailable:" in proc.stdout and "pip install" in proc.stdout


def test_cpu_tensors_raise_backend_unavailable():
    W = torch.randn(8, 6)
    U, V = torch.randn(1, 8, 2), torch.randn(1, 6, 2)
    calls = [
        lambda: SK.sketch_cupy(W, U, V),
        lambda: FS.fused_sgd_sketch_cupy(W, torch.randn(8, 6), None, U, V, lr=0.1),
        lambda: PP.postprocess_cupy(torch.randn(1, 8, 2), torch.randn(1, 6, 2), U, V, seed=0, step=0),
        lambda: backends.postprocess(torch.randn(1, 8, 2), torch.randn(1, 6, 2), U, V, seed=0,
                                     step=0, backend="cupy"),
        lambda: backends.sketch(W, U, V, backend="cupy"),
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            call()


def test_missing_cupy_raises_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendUnavailable, match="needs CuPy"):
        LOADER.require_cupy()


def test_resolve_backend_cupy_on_cpu_raises():
    with pytest.raises(BackendUnavailable):
        resolve_backend("cupy", "cpu")


def test_cluster_helper_groups_near_equal_values():
    s = torch.tensor([1.0, 1.0, 1 + 1e-9, 0.5, 0.5 - 1e-12, 0.1], dtype=F64)
    assert clusters(s) == [[0, 1, 2], [3, 4], [5]]
    assert math.isclose(gamma(10), 10 * U32 / (1 - 10 * U32))


def test_cu_floors_match_the_reference():
    """postprocess.cu hard-codes the rank-deficiency floors of lowrank/postprocess.py."""
    from lowrank.postprocess import GRAM_ABSOLUTE_FLOOR

    src = (CUPY_DIR / "postprocess.cu").read_text()
    rel = float(re.search(r"#define GRAM_RELATIVE_FLOOR (\S+)", src).group(1))
    absf = float(re.search(r"#define GRAM_ABSOLUTE_FLOOR (\S+)", src).group(1))
    assert (rel, absf) == (GRAM_RELATIVE_FLOOR, GRAM_ABSOLUTE_FLOOR)

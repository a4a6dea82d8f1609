"""Backend dispatch for the ops: ``sketch``, ``fused_sgd_sketch``, ``postprocess`` (and
``inner_and_square_norm`` of gradient tracking).

``backend`` is one of "auto", "torch", "triton", "cupy", "cpu". "auto" picks the fastest available
for the tensor's device and dtype: on CUDA, CuPy where it runs (Triton for its TF32 and
deterministic modes, or without CuPy); on the CPU, the C kernel ("cpu", compiled on first use)
for float32, bfloat16 and float16 weights when a C compiler is found; else torch.
Asking explicitly for a backend that is not available raises :class:`BackendUnavailable`;
nothing falls back silently.

The kernels live in the repository's top-level ``kernels/`` folder, installed as
``lowrank.kernels``. From a plain source checkout (no install, as on the GPU machine) that
folder is mapped onto ``lowrank.kernels`` on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .fused_sgd_sketch import fused_sgd_sketch_torch
from .postprocess import postprocess_torch
from .sketch import cat_sketches, inner_and_square_norm_torch, sketch_torch

BACKENDS = ("auto", "torch", "triton", "cupy", "cpu")
# Weight dtypes of the "cpu" backend (kernels/cpu: float32 updated in the pass; the 16-bit ones
# updated by torch's ops, then sketched by the kernel). float64 weights stay on torch.
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Precision of the sketch products (``precision=``): exact fp32, or TF32 tensor cores with three
# (~fp32 accuracy) or one (~1e-3 relative error per product) term. Only the Triton kernels offer
# the TF32 modes; the torch and CuPy products are always exact fp32 (fp64 for fp64 weights).
PRECISIONS = ("fp32", "tf32x3", "tf32")
# Widest sketch the Triton backend post-processes with its own kernels (its one-program
# eigensolver: kernels/triton/postprocess.py MAX_K); wider ones take the torch reference.
TRITON_POST_MAX_K = 128


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package missing, or no GPU)."""


def _kernels_package():
    """Import ``lowrank.kernels``, mapping the source tree's ``kernels/`` when not installed."""
    name = "lowrank.kernels"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    src = Path(__file__).resolve().parent.parent / "kernels"
    if not (src / "__init__.py").exists():
        raise BackendUnavailable("lowrank.kernels is not installed and no kernels/ folder was found")
    spec = importlib.util.spec_from_file_location(name, src / "__init__.py",
                                                  submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_kernel_modules: dict = {}


def kernel_module(backend: str, op: str):
    """The module of ``op`` for ``backend`` (e.g. lowrank.kernels.triton.sketch). Kept once
    imported: the import machinery's lookup cost a few microseconds on every call of an op."""
    module = _kernel_modules.get((backend, op))
    if module is None:
        _kernels_package()
        module = _kernel_modules[backend, op] = importlib.import_module(
            f"lowrank.kernels.{backend}.{op}")
    return module


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None


_cupy_runs: dict = {}


def cupy_runs(device: torch.device) -> bool:
    """Whether the CuPy kernels compile and load on ``device`` (probed once per device by
    loading both modules, which the first step would do anyway): "auto" and the Triton
    backend's post-processing use CuPy only where it runs, and an installed CuPy may lack a
    matching CUDA runtime or NVRTC."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _cupy_runs:
        ok = False
        if cupy_available():
            try:
                loader = kernel_module("cupy", "_loader")
                loader.function("postprocess.cu", "pp_refill", device)
                fs = kernel_module("cupy", "fused_sgd_sketch")
                loader.function(fs.CU, fs.entry_point(torch.float32, 16), device)
                ok = True
            except Exception:  # noqa: BLE001 - any failure means "does not run here"
                ok = False
        _cupy_runs[device] = ok
    return _cupy_runs[device]


def _cupy_takes_width(k: int | None, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether the CuPy pass and post-processing take sketch width k on ``device`` (their
    shared memory); None: the width is not known, any width the kernels take by design."""
    if k is None:
        return True
    pp = kernel_module("cupy", "postprocess")
    fs = kernel_module("cupy", "fused_sgd_sketch")
    return pp.supports(k, device) and fs.supports(k, dtype or torch.float32, device)


def cpu_kernel_available() -> bool:
    """Whether the CPU C kernel builds and loads here (compiles it on the first call, ~1 s).
    ``LOWRANK_CPU_KERNEL=0`` in the environment turns it off for "auto"."""
    if os.environ.get("LOWRANK_CPU_KERNEL", "1") == "0":
        return False
    return kernel_module("cpu", "_loader").available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    *, precision: str = "fp32", deterministic: bool = False,
                    width: int | None = None) -> str:
    """Map "auto" to a concrete backend for ``device`` (and weight ``dtype``) and check that the
    choice can run.

    "auto" on CUDA (16/32-bit weights): CuPy where it runs, for exact fp32 products and
    non-deterministic sketches, where its kernels take the sketch ``width`` (k; their shared
    memory bounds it, k <= ~160 on an H100); Triton for the TF32 ``precision`` modes and
    ``deterministic`` sketches, which only it offers, for wider sketches, and where CuPy does
    not run; torch for float64 weights or without either. (H100, 2026-11-22: the CuPy pass was
    as fast as Triton's or up to 2.2x faster in 23 of 24 fp32 configurations, and its launch
    costs less host time, which bounds a GPU step: 0.97 against 1.18 ms at 4096^2, k = 16.)
    The Triton kernels have no float64 path: an explicit "triton" raises TypeError for float64
    weights."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if dtype in CPU_KERNEL_DTYPES and cpu_kernel_available() else "torch"
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"
        if (precision == "fp32" and not deterministic and cupy_runs(device)
                and _cupy_takes_width(width, device, dtype)):
            return "cupy"
        return "triton" if triton_available() else "torch"
    if backend == "torch":
        return backend
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailable(f"backend='cpu' runs on CPU tensors; this one is on {device}")
        if dtype is not None and dtype not in CPU_KERNEL_DTYPES:
            raise TypeError(f"backend='cpu' takes float32, bfloat16 or float16 weights, got "
                            f"{dtype}; use backend='torch' or 'auto'")
        kernel_module("cpu", "_loader").library()  # raises BackendUnavailable with the reason
        return backend
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' does not support float64 weights; "
                            "use backend='torch' or 'auto'")
        if not triton_available():
            raise BackendUnavailable("backend='triton' needs Triton: pip install 'lowrank-spectra[triton]'")
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailable(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        return backend
    # cupy
    if not cupy_available():
        raise BackendUnavailable("backend='cupy' needs CuPy: pip install 'lowrank-spectra[cupy]'")
    if device.type != "cuda":
        raise BackendUnavailable("backend='cupy' needs CUDA tensors")
    return backend


def kernel_options(requested: str, resolved: str, *, precision: str = "fp32",
                   deterministic: bool = False) -> dict:
    """The keyword options that the ``resolved`` backend's kernels take for these settings.

    ``precision`` other than "fp32" selects TF32 tensor cores where the Triton kernels run; under
    ``backend="auto"`` a matrix that lands on torch (CPU, float64) is computed exactly instead,
    while an explicit "torch" or "cupy" raises (they have no TF32 path). ``deterministic``: the
    torch and cpu backends are always deterministic (the C kernel sums its per-chunk partials in
    a fixed order, for a given thread count), Triton sums its cross-program partials in a fixed
    order, and the CuPy kernel (atomics) raises.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if resolved == "triton":
        return {"precision": precision, "deterministic": deterministic}
    if precision != "fp32" and requested != "auto":
        raise ValueError(f"precision={precision!r} needs the Triton kernels; backend={resolved!r} "
                         "computes the products in exact fp32 (use precision='fp32')")
    if deterministic and resolved == "cupy":
        raise ValueError("deterministic=True is not offered by the CuPy kernel (it reduces Z with "
                         "atomics); use backend='triton' or 'torch'")
    return {}


def sketch(W, U, V, *, backend: str = "torch", sides: str = "both", **options):
    """Op ``sketch`` on the given concrete backend; see :func:`lowrank.sketch.sketch_torch`."""
    if backend == "torch":
        return sketch_torch(W, U, V, sides=sides)
    if backend == "cpu":
        return kernel_module("cpu", "sketch").sketch_cpu(W, U, V, sides=sides)
    _both_sides(backend, sides)
    return getattr(kernel_module(backend, "sketch"), f"sketch_{backend}")(W, U, V, **options)


def sketch_many(Ws, U, V, *, backend: str = "torch", **options):
    """Op ``sketch`` (both sides) of b separate matrices of one shape and dtype (each (m, n),
    contiguous for "cupy" and "triton") with the batched bases U (b, m, k), V (b, n, k): one
    launch on CuPy and Triton (:func:`sketch_cupy_many`, :func:`sketch_triton_many`), one call
    per matrix elsewhere. Returns SketchOut (b, ...)."""
    if backend == "cupy":
        return kernel_module("cupy", "sketch").sketch_cupy_many(Ws, U, V)
    if backend == "triton" and len(Ws) > 1:
        return kernel_module("triton", "sketch").sketch_triton_many(Ws, U, V, **options)
    outs = [sketch(W, U[i:i + 1], V[i:i + 1], backend=backend, **options)
            for i, W in enumerate(Ws)]
    return outs[0] if len(outs) == 1 else cat_sketches(outs)


def _both_sides(backend: str, sides: str) -> None:
    if sides != "both":
        raise ValueError(f"backend={backend!r} always sketches both sides (sides='both'); "
                         "one-sided and power sketches serve the CPU backends' sequential and "
                         "alternating schedules")


def fused_sgd_sketch(W, G, buf, U, V, *, backend: str = "torch", options=None,
                     sides: str = "both", **hyper):
    """Op ``fused_sgd_sketch``; see :func:`lowrank.fused_sgd_sketch.fused_sgd_sketch_torch`.
    ``options``: kernel options from :func:`kernel_options` (none for torch); ``sides``: "y" or
    "z" for a one-sided sketch, "power" for Y and W^T Y (torch and cpu backends only)."""
    if backend == "torch":
        return fused_sgd_sketch_torch(W, G, buf, U, V, sides=sides, **hyper)
    if backend == "cpu":
        return kernel_module("cpu", "fused_sgd_sketch").fused_sgd_sketch_cpu(
            W, G, buf, U, V, sides=sides, **hyper)
    _both_sides(backend, sides)
    fn = getattr(kernel_module(backend, "fused_sgd_sketch"), f"fused_sgd_sketch_{backend}")
    return fn(W, G, buf, U, V, **hyper, **(options or {}))


def fused_sgd_sketch_many(Ws, Gs, bufs, U, V, *, backend: str = "torch", options=None,
                          **hyper):
    """Op ``fused_sgd_sketch`` over b separate matrices of one shape and dtype (each (m, n),
    contiguous for "cupy"), sketched with the batched bases U (b, m, k) and V (b, n, k), both
    sides. ``bufs``: a list of b momentum buffers (or of b None: first step). CuPy and Triton
    make one launch for all (:func:`fused_sgd_sketch_cupy_many`,
    :func:`fused_sgd_sketch_triton_many`: the kernels read the matrices' addresses from a
    device table); the torch backend one call per matrix. Returns (SketchOut (b, ...), list of
    b buffers, None entries without momentum)."""
    if backend == "cupy":
        return kernel_module("cupy", "fused_sgd_sketch").fused_sgd_sketch_cupy_many(
            Ws, Gs, bufs, U, V, **hyper)
    if backend == "triton" and len(Ws) > 1:
        return kernel_module("triton", "fused_sgd_sketch").fused_sgd_sketch_triton_many(
            Ws, Gs, bufs, U, V, **hyper, **(options or {}))
    outs, new_bufs = [], []
    for i, (W, G, buf) in enumerate(zip(Ws, Gs, bufs)):
        sk, buf = fused_sgd_sketch(W, G, buf, U[i:i + 1], V[i:i + 1], backend=backend,
                                   options=options, **hyper)
        outs.append(sk)
        new_bufs.append(buf)
    return (outs[0] if len(outs) == 1 else cat_sketches(outs)), new_bufs


def fused_sgd_sketch_list(Ws, Gs, bufs, Us, Vs, sides, *, backend: str = "cpu", **hyper):
    """Op ``fused_sgd_sketch`` over matrices of any shapes (one param group's tracked
    parameters), each with its own bases U (1, m, k), V (1, n, k) and ``sides``, in one call of
    the cpu kernel (the GPU backends batch same-shape matrices instead:
    :func:`fused_sgd_sketch_many`). Returns (list of SketchOut, list of buffers, None entries
    without momentum)."""
    if backend != "cpu":
        raise ValueError(f"fused_sgd_sketch_list runs on the cpu backend, not {backend!r}")
    return kernel_module("cpu", "fused_sgd_sketch").fused_sgd_sketch_cpu_list(
        Ws, Gs, bufs, Us, Vs, sides, **hyper)


def fused_sequential_step_list(Ws, Gs, bufs, states, *, backend: str = "cpu", **hyper):
    """A whole tracked step of the sequential schedule over matrices of any shapes, on the cpu
    kernel: op ``fused_sgd_sketch`` (power sketch; ``Gs`` None: sketch only), both sides of the
    post-processing, and each matrix's new state written into ``states[i]`` (its tracker's own
    tensors) in place. Returns (list of buffers, {index: SketchOut} of the matrices left for the
    reference path); see :func:`lowrank.kernels.cpu.sequential_step.
    fused_sequential_step_cpu_list`."""
    if backend != "cpu":
        raise ValueError(f"fused_sequential_step_list runs on the cpu backend, not {backend!r}")
    return kernel_module("cpu", "sequential_step").fused_sequential_step_cpu_list(
        Ws, Gs, bufs, states, **hyper)


def inner_and_square_norm(G, W, *, backend: str = "torch"):
    """Op ``inner_and_square_norm``: (<G, W>, ||W||_F^2) in float64 (0-d tensors) for gradient
    tracking; see :func:`lowrank.sketch.inner_and_square_norm_torch`. The cpu backend reads a
    contiguous pair of one dtype in its kernel (one read of each, no float64 copies); the other
    backends, and other layouts, take the reference."""
    if backend == "cpu":
        kernel = kernel_module("cpu", "inner_and_square_norm")
        if kernel.takes(G, W):
            return kernel.inner_and_square_norm_cpu(G, W)
    return inner_and_square_norm_torch(G, W)


def postprocess(Y, Z, U, V, *, seed: int, step: int, refill=None, backend: str = "torch"):
    """Op ``postprocess``. CuPy and cpu have kernels (the cpu one for the common case only,
    falling back to the torch reference); Triton on a GPU uses the CuPy kernel where CuPy runs
    on the device (see :func:`_cupy_post_for_triton`), else its own (the reference's math with
    Triton kernels for the eigensolver and the refill: :func:`_triton_post`), and the torch
    reference beyond that kernel's width.

    ``refill`` (see :func:`lowrank.postprocess.postprocess_torch`) is used by the torch path;
    the CuPy and Triton kernels draw their own candidates from (seed, step) on the device.
    """
    if backend == "cpu":
        return kernel_module("cpu", "postprocess").postprocess_cpu(Y, Z, U, V, seed=seed,
                                                                  step=step, refill=refill)
    if _post_on_cupy(backend, Y.device, Y.shape[-1], Y.shape[0]):
        return kernel_module("cupy", "postprocess").postprocess_cupy(Y, Z, U, V, seed=seed, step=step)
    if backend == "triton" and _triton_post(Y.device, Y.shape[-1]):
        return kernel_module("triton", "postprocess").postprocess_triton(Y, Z, U, V, seed=seed,
                                                                         step=step)
    return postprocess_torch(Y, Z, U, V, seed=seed, step=step, refill=refill)


def _post_on_cupy(backend: str, device: torch.device, k: int, batch: int) -> bool:
    """Whether :func:`postprocess` of this backend runs the CuPy kernel."""
    return backend == "cupy" or (backend == "triton" and _cupy_post_for_triton(device, k, batch))


def postprocess_many(groups, *, step, backend: str = "torch") -> list:
    """:func:`postprocess` of several groups ``(Y, Z, U, V, seed, refill)`` of one step and
    backend. Where they all run the CuPy kernel with one sketch width and basis dtype on one
    device, whatever their shapes, they share one launch sequence
    (:func:`postprocess_cupy_many`: its kernels are latency-bound at a model's sizes); else
    one call per group. Returns one PostOut per group."""
    first = groups[0][0]
    k, batch = first.shape[-1], sum(g[0].shape[0] for g in groups)
    if len(groups) > 1 and _post_on_cupy(backend, first.device, k, batch):
        kernel = kernel_module("cupy", "postprocess")
        if kernel.supports(k, first.device, batch) and all(
                g[0].device == first.device and g[0].shape[-1] == k
                and g[2].dtype == groups[0][2].dtype for g in groups):
            return kernel.postprocess_cupy_many([g[:5] for g in groups], step=step)
    return [postprocess(Y, Z, U, V, seed=seed, step=step, refill=refill, backend=backend)
            for Y, Z, U, V, seed, refill in groups]


def capture_safe(backend: str, device: torch.device, k: int, batch: int = 1) -> bool:
    """Whether a tracked step of ``batch`` width-k matrices post-processed together on
    ``backend`` makes no host synchronisation, as a CUDA graph capture needs: the pass and the
    CuPy post-processing kernel (backends cupy, and triton where CuPy takes the batch) are
    sync-free, and so is the Triton backend's own (:func:`_triton_post`); the torch reference
    post-processing is not (``torch.linalg.eigh`` reads cuSOLVER's flags on the host)."""
    if device.type != "cuda" or backend == "cupy":
        return True
    return backend == "triton" and (_cupy_post_for_triton(device, k, batch)
                                    or _triton_post(device, k))


def _cupy_post_for_triton(device: torch.device, k: int, batch: int = 1) -> bool:
    """The Triton backend post-processes with the CuPy kernel where CuPy runs on ``device`` and
    takes ``batch`` problems of width k: it is sync-free and, at small k, several times faster
    than the torch reference, whose dozens of small launches and cuSOLVER calls (with their
    host synchronisations) made the GPU step host-bound (H100, 4096^2, k = 16: 2.9 ms of host
    time a step against 0.8 ms). Else (no CuPy, or widths beyond its shared memory) the Triton
    backend's own kernels where they take the width (:func:`_triton_post`), else the torch
    reference."""
    if device.type != "cuda" or _interpreting() or not cupy_runs(device):
        return False
    return kernel_module("cupy", "postprocess").supports(k, device, batch)


def _triton_post(device: torch.device, k: int) -> bool:
    """Whether the Triton backend post-processes with its own kernels
    (:func:`lowrank.kernels.triton.postprocess.postprocess_triton`) where CuPy does not take
    the batch: on a GPU, up to the one-program eigensolver's width and shared memory (k <= 64
    everywhere, up to 128 on GPUs with 128 KB a block); wider ones take the torch reference.
    Under the interpreter the steps keep the torch reference (on CPU tensors its CPU fast
    path); the tests call the kernels directly."""
    if device.type != "cuda" or _interpreting():
        return False
    return kernel_module("triton", "postprocess").fits(k, device)  # (k <= TRITON_POST_MAX_K too)

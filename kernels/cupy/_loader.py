"""Lazy CuPy plumbing shared by the CUDA C kernels of this folder.

Nothing here imports CuPy or touches a GPU at import time. On first use a ``.cu`` source is read
with :mod:`importlib.resources`, compiled by NVRTC through ``cupy.RawModule`` and cached per
(source, device); its functions are looked up once per name. Tensors cross to CuPy through
DLPack (no copy), and every launch goes to torch's current stream, so the kernels order
correctly with torch work and can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import threading
import warnings

import numpy as np
import torch

from lowrank.backends import BackendUnavailable

# Address tables, shared with the Triton launchers; the CuPy launchers call _loader.device_table.
from ..device_table import device_table  # noqa: F401

_INCLUDE = '#include "common.cuh"'
# NVRTC options: C++17, no fast math (the fp32/fp64 arithmetic must be IEEE: rsqrt/sqrt/div of
# the float64 eigen solver and the fp32 SGD update are compared with the torch reference).
# CuPy itself appends -ftz=true to every NVRTC compile (cupy/cuda/compiler.py), so float32
# subnormals (|x| < 1.2e-38) flush to zero in these kernels where torch keeps them: an update of
# such weights may differ from torch.optim.SGD. float64 arithmetic is not affected.
_OPTIONS = ("-std=c++17",)

_lock = threading.Lock()
_modules: dict = {}
_functions: dict = {}
_streams: dict = {}  # (device index, torch stream handle) -> CuPy stream wrapper


def require_cupy():
    """Import CuPy, or raise :class:`BackendUnavailable` with what to install."""
    try:
        import cupy  # noqa: PLC0415 (lazy on purpose: importing lowrank must not need CuPy)
    except Exception as exc:  # ImportError, or a CuPy build that cannot find its CUDA libraries
        raise BackendUnavailable(
            "backend='cupy' needs CuPy and a CUDA GPU: pip install 'lowrank-spectra[cupy-cuda13]' "
            f"(or [cupy-cuda12]); importing cupy failed: {exc}") from exc
    return cupy


def check_cuda(op: str, **tensors: torch.Tensor) -> torch.device:
    """Raise :class:`BackendUnavailable` unless every tensor is on one CUDA device; return it."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise BackendUnavailable(
                f"{op} (backend='cupy') needs CUDA tensors; {name} is on {t.device}. "
                "Use backend='torch' on the CPU.")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device; {name} is on {t.device}, "
                             f"expected {device}")
    return device


def source(name: str) -> str:
    """The text of ``name`` (a .cu file of this package) with common.cuh pasted in."""
    root = importlib.resources.files(__package__)
    text = root.joinpath(name).read_text(encoding="utf-8")
    common = root.joinpath("common.cuh").read_text(encoding="utf-8")
    if _INCLUDE not in text:
        raise RuntimeError(f"{name} does not include common.cuh")
    return text.replace(_INCLUDE, common, 1)


def function(cu_name: str, func_name: str, device: torch.device):
    """The compiled kernel ``func_name`` of ``cu_name`` for ``device`` (compiled on first use).

    Its dynamic shared memory limit is raised once to the device's opt-in maximum, so callers
    only check their request against :func:`max_shared_bytes`. Call this outside CUDA graph
    capture the first time (an eager warm-up step does it): compiling and loading a module are
    not stream operations.
    """
    cupy = require_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (cu_name, func_name, index)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        with cupy.cuda.Device(index):
            module = _modules.get((cu_name, index))
            if module is None:
                module = cupy.RawModule(code=source(cu_name), options=_OPTIONS)
                _modules[(cu_name, index)] = module
            fn = module.get_function(func_name)
            fn.max_dynamic_shared_size_bytes = max_shared_bytes(device) - fn.shared_size_bytes
        _functions[key] = fn
    return fn


# cudaDevAttrMaxSharedMemoryPerBlockOptin in the CUDA runtime's cudaDeviceAttr enum: used if
# CuPy's runtime module does not export the name.
_ATTR_SHARED_OPTIN = 97


@functools.lru_cache(maxsize=None)
def _optin_shared_bytes(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    if getattr(props, "shared_memory_per_block_optin", 0):
        return int(props.shared_memory_per_block_optin)
    runtime = require_cupy().cuda.runtime
    attr = getattr(runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", _ATTR_SHARED_OPTIN)
    return int(runtime.deviceGetAttribute(attr, index))


def max_shared_bytes(device: torch.device) -> int:
    """Opt-in maximum of shared memory per block (227 KiB on H100), static part included."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _optin_shared_bytes(index)


def sm_count(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@contextlib.contextmanager
def on_torch_stream(device: torch.device):
    """Make CuPy launch on ``device`` and on torch's current stream there (no sync, no event)."""
    cupy = require_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index):
        key = (index, stream.cuda_stream)
        external = _streams.get(key)
        if external is None:  # one CuPy wrapper per torch stream: making it costs host time
            if hasattr(stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
                external = cupy.cuda.Stream.from_external(stream)  # stream protocol (CuPy >= 14)
            else:
                with warnings.catch_warnings():  # deprecated in CuPy 14, the only way before it
                    warnings.simplefilter("ignore", DeprecationWarning)
                    external = cupy.cuda.ExternalStream(stream.cuda_stream, index)
            _streams[key] = external
        with external:
            yield cupy


def pointer(t: torch.Tensor | None) -> np.uint64:
    """A tensor as a kernel argument: its device address (storage offset included) as the 8-byte
    integer a pointer parameter takes; None is the null pointer.

    No CuPy array is made: a DLPack view per argument cost ~20 us of host time a launch, which
    made the post-processing (~40 arguments) host-bound. The kernels index with the strides they
    are given (RawKernel ignores an array's strides anyway). The tensor must stay alive until the
    launch returns (the callers hold it); the kernel runs on torch's current stream, in order
    with the caching allocator's reuse of the memory.
    """
    return np.uint64(0 if t is None else t.data_ptr())


GRID_YZ = 65535  # CUDA's limit on a grid's y and z dimensions


def grid_dim_check(op: str, name: str, value: int, limit: int = GRID_YZ) -> None:
    if value > limit:
        raise ValueError(f"{op}: {name} = {value} exceeds the CUDA grid limit {limit}")



"""Build and load the CPU kernel library (``sgd_sketch.c``, ``postprocess.c`` and
``inner_and_square_norm.c``).

On first use the sources are compiled with the system C compiler (``$CC``, default ``cc``) for
this machine's instruction set (``-march=native``) and OpenMP, into a cache folder
(``$LOWRANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowrank``, else ``~/.cache/lowrank``) under a
name that hashes the sources, the flags, the compiler and the CPU's feature flags, so a shared
home folder never serves a library built for another CPU. A build takes about a second; later
processes load the cached file. No compiler, or a failed build, raises
:class:`~lowrank.backends.BackendUnavailable` (``backend="auto"`` then uses the torch backend).

The library links ``libgomp.so.1`` by its soname: torch's CPU wheels load their own copy first,
and the dynamic linker hands ours the same one, so the kernel and torch share one thread pool
(two pools spinning on two cores would slow both).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from lowrank.backends import BackendUnavailable

SOURCES = ("sgd_sketch.c", "postprocess.c", "inner_and_square_norm.c")
HEADERS = ("widen.h",)  # included by the sources: written beside them, hashed with them
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")

_lock = threading.Lock()
_library = None


class SgdHyper(ctypes.Structure):
    """``sgd_hyper`` of sgd_sketch.c."""
    _fields_ = [("lr", ctypes.c_float), ("weight_decay", ctypes.c_float),
                ("momentum", ctypes.c_float), ("keep", ctypes.c_float),  # 1 - dampening
                ("nesterov", ctypes.c_int), ("maximize", ctypes.c_int), ("buf_init", ctypes.c_int)]


def ptr(t) -> int | None:
    """The address a kernel argument is passed as: a tensor's data pointer, or NULL for None."""
    return None if t is None else t.data_ptr()


def cache_dir() -> Path:
    explicit = os.environ.get("LOWRANK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform  # noqa: PLC0415
    return platform.processor() or platform.machine()


def _build(compiler: str, sources: dict[str, str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_files = []
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
            if name.endswith(".c"):
                c_files.append(Path(tmp) / name)
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, c_files)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendUnavailable(f"backend='cpu': compiling {', '.join(sources)} with "
                                     f"{compiler} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the old file or the new one


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first use, then cached on disk and in memory)."""
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is not None:
            return _library
        compiler = os.environ.get("CC", "cc")
        path = shutil.which(compiler)
        if path is None:
            raise BackendUnavailable(f"backend='cpu' needs a C compiler with OpenMP ({compiler!r} "
                                     "not found; set CC); use backend='torch'")
        here = importlib.resources.files(__package__)
        sources = {name: here.joinpath(name).read_text(encoding="utf-8")
                   for name in (*SOURCES, *HEADERS)}
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([*sources.values(), " ".join(FLAGS), version,
                                        _cpu_features()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"lowrank_cpu-{key}.so"
        if not target.exists():
            try:
                _build(path, sources, target)
            except OSError as exc:  # cache folder not writable: build in a temporary one
                raise BackendUnavailable(f"backend='cpu': cannot build in {target.parent}: {exc}; "
                                         "set LOWRANK_CACHE_DIR to a writable folder") from exc
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:  # e.g. a cache folder mounted noexec
            raise BackendUnavailable(f"backend='cpu': cannot load {target}: {exc}; set "
                                     "LOWRANK_CACHE_DIR to another folder") from exc
        fn = lib.lowrank_sgd_sketch_f32
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ctypes.POINTER(SgdHyper), ptr, ptr, ptr,
                       ptr, ptr, ctypes.c_int, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = lib.lowrank_sgd_sketch_many_f32
        fn.argtypes = [i64, ptr, ctypes.POINTER(SgdHyper)]
        fn.restype = ctypes.c_int
        fn = lib.lowrank_postprocess_side
        fn.argtypes = [i64, i64, i64, ptr, ctypes.c_int, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                       i64, ptr, ctypes.c_double, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = lib.lowrank_postprocess_sequential_many
        fn.argtypes = [i64, ptr, ctypes.c_double, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = lib.lowrank_postprocess_sequential_commit
        fn.argtypes = [i64, ptr, ptr, ctypes.c_double, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = lib.lowrank_inner_and_square_norm
        fn.argtypes = [i64, ptr, ptr, ctypes.c_int, ctypes.c_int, ptr]
        fn.restype = ctypes.c_int
        _library = lib
        return lib


def available() -> bool:
    """Whether the kernel library builds and loads here (builds it on the first call)."""
    try:
        library()
    except BackendUnavailable:
        return False
    return True

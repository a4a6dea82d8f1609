"""Where and with what a measurement ran: device name, library versions, commit, date.

Every result row carries these columns, so a row read alone says what produced it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model (the thread count is a column of its own)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. cpu-amd-epyc or cuda-nvidia-h100-80gb-hbm3."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}"


def peak_gbps(device: torch.device) -> float:
    """Peak memory bandwidth in GB/s of a CUDA device (LOWRANK_PEAK_GBPS overrides); NaN on the
    CPU or for a GPU missing from the vendor table of bench/gpu_check.py."""
    if device.type != "cuda":
        return float("nan")
    if os.environ.get("LOWRANK_PEAK_GBPS"):
        return float(os.environ["LOWRANK_PEAK_GBPS"])
    from .gpu_check import PEAK_GBPS  # the vendor table of the GPU check, one copy

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_GBPS:
        if key in name:
            return value
    return float("nan")


_PROBE_BUFFERS: dict = {}


def machine_probe(device: torch.device, calls: int = 3) -> dict:
    """How fast this machine runs right now: a float32 1024^3 matmul (compute-bound, GFLOP/s)
    and a 64 MiB copy (memory-bound, GB/s read plus written, past a 32 MiB cache), medians of
    ``calls`` calls. The suite takes it before each group and writes it in the group's rows: on
    a shared machine the compute-bound and memory-bound rates drift apart between runs (and with
    them the ratio of a tracked step to the memory-bound SGD step), so rows are comparable across
    runs only at similar probe values. About 0.1 s on 2 CPU cores."""
    key = (device.type, device.index)
    if key not in _PROBE_BUFFERS:
        a = torch.ones(1024, 1024, device=device)
        src = torch.ones(16 * 2**20, device=device)  # 64 MiB of float32
        _PROBE_BUFFERS[key] = (a, torch.empty_like(a), src, torch.empty_like(src))
    a, prod, src, dst = _PROBE_BUFFERS[key]

    def median_s(fn) -> float:
        times = []
        for _ in range(calls + 1):  # the first call warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    mm = median_s(lambda: torch.mm(a, a, out=prod))
    copy = median_s(lambda: dst.copy_(src))
    return {"probe_matmul_gflops": 2 * 1024**3 / mm / 1e9,
            "probe_copy_gbps": 2 * src.numel() * src.element_size() / copy / 1e9}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_info(device: torch.device) -> dict:
    """The columns shared by every row of one run."""
    import lowrank

    now = _dt.datetime.now(_dt.timezone.utc)
    cupy = _version("cupy-cuda12x") or _version("cupy-cuda13x") or _version("cupy")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch_version": torch.__version__,
        "lowrank_version": lowrank.__version__,
        "python_version": platform.python_version(),
        "triton_version": _version("triton"),
        "cupy_version": cupy,
        "cuda_version": torch.version.cuda or "",
        # LOWRANK_COMMIT names the commit of a tree copied to another machine (the GPU machine's
        # copy carries a stale .git): it wins over git there, and the sender vouches it is clean.
        "commit": os.environ.get("LOWRANK_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
        # Uncommitted changes in the working tree: the numbers may not match the commit.
        "commit_dirty": (not os.environ.get("LOWRANK_COMMIT")
                         and bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}",
    }

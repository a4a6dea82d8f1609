"""Fixtures shared by several test modules (each module opts in with ``pytest.mark.usefixtures``)."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_sessionstart(session):
    """Where the CPU kernel must build (``make test`` and CI set LOWRANK_REQUIRE_CPU_KERNEL=1),
    a failed build stops the run with the compiler's message; elsewhere (no C compiler) the
    CPU-kernel tests skip. Without this, a kernel that no longer compiled skipped ~100 tests
    and left the run green."""
    if os.environ.get("LOWRANK_REQUIRE_CPU_KERNEL") != "1":
        return
    from lowrank.backends import BackendUnavailable, kernel_module
    try:
        kernel_module("cpu", "_loader").library()
    except BackendUnavailable as exc:
        pytest.exit(f"LOWRANK_REQUIRE_CPU_KERNEL=1 but the CPU kernel does not build:\n{exc}",
                    returncode=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread is several times faster than two (no OpenMP
    hand-offs), and the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_tf32_matmul():
    """GPU references in true fp32: torch's own matmuls must not silently use TF32 (the kernels
    they are compared with compute exact fp32 unless told otherwise)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old

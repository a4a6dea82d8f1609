"""Fixtures shared by several test modules (each module opts in with ``pytest.mark.usefixtures``)."""

from __future__ import annotations

import pytest
import torch


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

"""CPU launcher of op ``inner_and_square_norm`` (kernel: ``inner_and_square_norm.c``): <G, W> and
||W||_F^2 in float64 for gradient tracking, from one read of G and W.

Reference and contract: :func:`lowrank.sketch.inner_and_square_norm_torch` (the same exact
products, summed in another order: equal to float64 rounding of sum |g w|)."""

from __future__ import annotations

import torch

from . import _loader
from .fused_sgd_sketch import WEIGHT_DTYPES


def takes(G: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether the kernel reads this pair: CPU tensors of one dtype it widens, same number of
    elements, both contiguous (a gradient in another layout takes the reference)."""
    return (G.device.type == "cpu" and W.device.type == "cpu" and G.dtype == W.dtype
            and W.dtype in WEIGHT_DTYPES and G.numel() == W.numel()
            and G.is_contiguous() and W.is_contiguous())


def inner_and_square_norm_cpu(G: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(<G, W>, ||W||_F^2) as float64 0-d tensors; G and W as :func:`takes` requires."""
    if not takes(G, W):
        raise ValueError("inner_and_square_norm_cpu takes contiguous CPU tensors of one dtype "
                         f"(float32, bfloat16 or float16) and size; got G {G.dtype} "
                         f"{tuple(G.shape)} on {G.device}, W {W.dtype} {tuple(W.shape)} on "
                         f"{W.device}")
    out = torch.empty(2, dtype=torch.float64)
    # the kernel runs fewer than PARALLEL_BLOCKS blocks (64K elements) on the calling thread
    rc = _loader.library().lowrank_inner_and_square_norm(
        G.numel(), G.data_ptr(), W.data_ptr(), WEIGHT_DTYPES[W.dtype], torch.get_num_threads(),
        out.data_ptr())
    if rc != 0:
        raise (MemoryError if rc == -1 else RuntimeError)(
            f"inner_and_square_norm_cpu: kernel status {rc}")
    return out[0], out[1]

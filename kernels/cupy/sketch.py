"""CuPy launcher of op ``sketch``: Y = W V, Z = W^T U, fro2, row_sq (no update).

Runs the kernel of ``fused_sgd_sketch.cu`` with its update switched off (W is only read).
Reference and contract: :func:`lowrank.sketch.sketch_torch`.
"""

from __future__ import annotations

import torch

from lowrank.sketch import SketchOut

from .fused_sgd_sketch import launch, launch_many


def sketch_cupy(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> SketchOut:
    """Sketch W (m, n), (b, m, n) or conv (o, i, kh, kw) with U (b, m, k) and V (b, n, k).

    Products in fp32 (fp64 for float64 weights); fro2 (b,) and row_sq (b, m) in float64.
    CUDA tensors only; runs on torch's current stream without host synchronisation.
    """
    out, _ = launch(W, None, None, U, V, update=False, op="sketch_cupy")
    return out


def sketch_cupy_many(Ws, U: torch.Tensor, V: torch.Tensor) -> SketchOut:
    """:func:`sketch_cupy` of b separate contiguous matrices of one shape and dtype (each
    sketched as (m, n), m = shape[0]) in one launch, with U (b, m, k) and V (b, n, k); the
    results are batched (b, ...)."""
    out, _ = launch_many(Ws, None, None, U, V, update=False, op="sketch_cupy_many")
    return out

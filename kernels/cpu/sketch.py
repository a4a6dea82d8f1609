"""CPU launcher of op ``sketch`` (no update; kernel ``sgd_sketch.c``, W is only read).
Reference and contract: :func:`lowrank.sketch.sketch_torch`."""

from __future__ import annotations

import torch

from lowrank.sketch import SketchOut

from .fused_sgd_sketch import launch


def sketch_cpu(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *,
               sides: str = "both") -> SketchOut:
    """Sketch W (m, n) or (b, m, n), float32, bfloat16 or float16, with float32 U (b, m, k) and
    V (b, n, k) on the CPU (float32 sketches).
    ``sides``: "both", "y", "z" or "power" (see :class:`lowrank.sketch.SketchOut`)."""
    if isinstance(W, torch.Tensor) and W.dim() not in (2, 3):
        raise ValueError(f"sketch_cpu takes W as (m, n) or (b, m, n), got shape {tuple(W.shape)}; "
                         "view a parameter with lowrank.sketch.as_batched(W) first")
    out, _ = launch(W.detach() if isinstance(W, torch.Tensor) else W, None, None, U, V,
                    sides=sides, op="sketch_cpu")
    return out

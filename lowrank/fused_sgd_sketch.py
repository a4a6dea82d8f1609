"""Op ``fused_sgd_sketch``: the torch.optim.SGD update followed by the sketch of the updated W.

Reference and CPU backend of the fused kernels in ``kernels/``. The update follows
``torch.optim.SGD`` exactly (same operation order, so trajectories match bit for bit on the CPU):

    g = -G if maximize else G
    g = g + wd * W                                  (coupled weight decay)
    if momentum != 0:
        buf = clone(g)                              (first step, buf is None)
        buf = momentum * buf + (1 - dampening) * g  (later steps)
        g = g + momentum * buf if nesterov else buf
    W = W - lr * g

then ``sketch`` of the updated W (see :mod:`lowrank.sketch`).
"""

from __future__ import annotations

import torch

from .sketch import SketchOut, as_batched, sketch_torch


def sgd_update_torch(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None, *, lr,
                     weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
                     nesterov: bool = False, maximize: bool = False,
                     lr_on_device: bool = False) -> torch.Tensor | None:
    """In-place SGD update of W; returns the momentum buffer (new one on the first step).

    ``lr`` may be a float or a 0-d tensor. Mirrors ``torch.optim.sgd._single_tensor_sgd``,
    which reads a tensor lr on the host; ``lr_on_device`` (a CUDA graph capture, where a host
    read is not allowed) multiplies by it on the device instead (W - g * lr, the product
    rounded before the subtraction, as torch's differentiable-lr path does).
    """
    g = G if not maximize else -G
    if weight_decay != 0:
        g = g.add(W, alpha=weight_decay)
    if momentum != 0:
        if buf is None:
            buf = g.detach().clone()
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    if isinstance(lr, torch.Tensor):
        if lr.requires_grad or lr_on_device:
            W.addcmul_(g, lr, value=-1)
        else:
            W.add_(g, alpha=-lr.item())  # torch.optim.SGD also reads a tensor lr as a scalar
    else:
        W.add_(g, alpha=-lr)
    return buf


def foreach_applies(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None, lr) -> bool:
    """Whether :func:`sgd_update_torch_many` may update W: a float32 or float64 CPU or CUDA
    tensor with a dense gradient (and buffer) of its dtype and a plain float lr. There torch's
    ``_foreach_*`` ops compute each element as the single-tensor ops do, so the update is
    bitwise that of :func:`sgd_update_torch` (tested on the CPU, and on CUDA in
    tests/test_eager_gpu.py), in a few launches for all tensors instead of a few per tensor
    (an eager GPU step is host-bound: GPT-2 small has 98 biases and norms); not for 16-bit
    tensors (torch 2.13: ``_foreach_mul_`` of a bfloat16 or float16 buffer by the momentum
    rounds otherwise than ``mul_``), whose steps keep the single-tensor ops."""
    return (W.device.type in ("cpu", "cuda") and W.dtype in (torch.float32, torch.float64)
            and not G.is_sparse and G.device == W.device
            and G.dtype == W.dtype and (buf is None or buf.dtype == W.dtype)
            and not isinstance(lr, torch.Tensor))


def sgd_update_torch_many(Ws: list, Gs: list, bufs: list, *, lr, weight_decay: float = 0.0,
                          momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                          maximize: bool = False) -> list:
    """:func:`sgd_update_torch` of several tensors, each op once for the list (torch's
    ``_foreach_*``, the way ``torch.optim.SGD(foreach=True)`` steps): a model's biases and
    norms cost one Python call per op, not per tensor. Only where :func:`foreach_applies`
    holds for every tensor. Returns the momentum buffers (new ones on the first step)."""
    if not Ws:
        return []
    g = torch._foreach_neg(Gs) if maximize else list(Gs)
    if weight_decay != 0:
        g = torch._foreach_add(g, Ws, alpha=weight_decay)
    if momentum != 0:
        old = [i for i, b in enumerate(bufs) if b is not None]
        bufs = [b if b is not None else g[i].detach().clone() for i, b in enumerate(bufs)]
        if old:
            kept = [bufs[i] for i in old]
            torch._foreach_mul_(kept, momentum)
            torch._foreach_add_(kept, [g[i] for i in old], alpha=1 - dampening)
        g = torch._foreach_add(g, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(Ws, g, alpha=-lr)
    return bufs


def fused_sgd_sketch_torch(W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None,
                           U: torch.Tensor, V: torch.Tensor, *, lr, weight_decay: float = 0.0,
                           momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                           maximize: bool = False, sides: str = "both"
                           ) -> tuple[SketchOut, torch.Tensor | None]:
    """Update W in place (and buf), then sketch the updated W. Returns (sketch, buf).
    ``sides``: as :func:`lowrank.sketch.sketch_torch`."""
    buf = sgd_update_torch(W, G, buf, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           dampening=dampening, nesterov=nesterov, maximize=maximize)
    return sketch_torch(as_batched(W), U, V, sides=sides), buf

"""SpectralSGD: a drop-in ``torch.optim.SGD`` that tracks the spectrum of every weight matrix."""

from __future__ import annotations

import torch

from . import backends
from .fused_sgd_sketch import sgd_update_torch
from .sketch import as_batched
from .trackset import TrackedSet, check_positive_int


def _named_groups(params):
    """Split ``params`` into (param_groups for torch, names per group).

    Accepts an iterable of tensors, of (name, tensor) pairs (``model.named_parameters()``), or of
    dicts with a "params" entry holding either.
    """
    params = list(params)
    if len(params) == 0:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    torch_groups, names, counter = [], [], 0
    for gi, group in enumerate(groups):
        if not isinstance(group, dict):
            raise TypeError("param groups must all be dicts when the first one is")
        items = group["params"]
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        group_names, tensors = [], []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
            else:
                name, p = f"param{counter}", item
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
            group_names.append(name)
            tensors.append(p)
            counter += 1
        torch_groups.append({**group, "params": tensors})
        names.append(group_names)
    return torch_groups, names


class SpectralSGD(torch.optim.Optimizer):
    """Stochastic gradient descent exactly as ``torch.optim.SGD``, plus spectral tracking.

    Same arguments, validation, param groups and ``momentum_buffer`` state as ``torch.optim.SGD``.
    Every parameter with 2 or more dimensions (conv kernels viewed as (out, in*kh*kw)) is tracked:
    each ``track_every``-th step, the pass that applies the update also sketches the updated
    weights, and the top ``rank`` singular values and the metrics of :mod:`lowrank.metrics` are
    available from :meth:`spectra`.

    Tracking arguments:
        rank: number of singular values reported per matrix (r).
        sketch_rank: sketch width k >= rank (default min(2 * rank, min(m, n))).
        track_every: track every N-th step (others are plain updates).
        track_grad: also track the spectrum of each gradient and its alignment with W.
        audit_every: every N tracked steps, exact ``torch.linalg.svdvals`` (float64) of each
            matrix; the error of the estimates is recorded (results' ``extra`` and the log).
        backend: "auto" | "torch" | "triton" | "cupy" (see :mod:`lowrank.backends`).
        seed: seed of the start bases (the same on every device and process).
        include / exclude: parameter names or glob patterns to track / not track.
        rank_tol: relative tolerance of the numerical rank (default 1e-3).
        skip_nonfinite: skip (leave unchanged) any parameter whose gradient has NaN/Inf, at the
            cost of one host synchronisation per parameter and step. Without it the weights do
            exactly what ``torch.optim.SGD`` does and the tracker flags the matrix as non-finite.
        log: a :class:`lowrank.RunLog` receiving every tracked step's metrics.

    AMP: works with ``torch.amp.GradScaler`` (``_step_supports_amp_scaling``): gradients are
    unscaled inside the step, and a step with ``found_inf`` leaves parameters, buffers, tracker
    state and step counts unchanged (reading ``found_inf`` costs one host sync per step).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, rank=8, sketch_rank=None, track_every=1,
                 track_grad=False, audit_every=0, backend="auto", seed=0, include=None,
                 exclude=None, rank_tol=1e-3, skip_nonfinite=False, log=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.track_every = check_positive_int(track_every, "track_every")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        torch_groups, names = _named_groups(params)
        super().__init__(torch_groups, defaults)
        self._names = {id(p): n for g, ns in zip(self.param_groups, names)
                       for p, n in zip(g["params"], ns)}
        named = [(self._names[id(p)], p) for g in self.param_groups for p in g["params"]]
        if len({n for n, _ in named}) != len(named):
            raise ValueError("parameter names must be unique")
        self.skip_nonfinite = bool(skip_nonfinite)
        self.steps = 0  # optimizer steps taken (skipped AMP steps excluded)
        self.tracked = TrackedSet(named, rank=rank, sketch_rank=sketch_rank, seed=seed,
                                  backend=backend, rank_tol=rank_tol, audit_every=audit_every,
                                  track_grad=track_grad, include=include, exclude=exclude, log=log)
        if log is not None:
            log.update_config({"optimizer": "SpectralSGD", **defaults, "rank": rank,
                               "sketch_rank": sketch_rank, "track_every": track_every,
                               "seed": seed, "backend": backend, "rank_tol": rank_tol,
                               "tracked": {n: list(t.shape) for n, t in self.tracked.trackers.items()}})

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step; on tracking steps also the sketch of every tracked matrix."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item() != 0):
            return loss  # AMP overflow: nothing changes, not even the step count
        track = self.steps % self.track_every == 0
        tracked_now = []
        for group in self.param_groups:
            hyper = {k: group[k] for k in ("lr", "weight_decay", "momentum", "dampening",
                                           "nesterov", "maximize")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SpectralSGD does not support sparse gradients")
                grad = p.grad if grad_scale is None else p.grad / grad_scale.to(p.grad.dtype)
                if self.skip_nonfinite and not bool(torch.isfinite(grad).all()):
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                name = self._names[id(p)]
                if track and name in self.tracked.trackers:
                    self.tracked.before_update(name, grad, p)
                    buf = self._fused_step(name, p, grad, buf, hyper)
                    tracked_now.append(name)
                else:
                    buf = sgd_update_torch(p, grad, buf, **hyper)
                if hyper["momentum"] != 0:
                    state["momentum_buffer"] = buf
        if tracked_now:
            self.tracked.after_step(self.steps, tracked_now)
        self.steps += 1
        return loss

    def _fused_step(self, name, p, grad, buf, hyper):
        tr = self.tracked.trackers[name]
        backend = self.tracked.backend[name]
        if backend != "torch" and not (p.is_contiguous() and grad.is_contiguous()):
            # The kernels update a (m, n) view in place; a non-contiguous parameter has none.
            backend = "torch"
        if backend == "torch":
            W, G = p, grad
        else:
            W, G = as_batched(p).view(tr.shape), grad.reshape(tr.shape)
            if buf is not None:
                buf = buf.view(tr.shape)
        sk, buf = backends.fused_sgd_sketch(W, G, buf, tr.U, tr.V, backend=backend, **hyper)
        self.tracked.absorb(name, sk)
        return buf.view(p.shape) if buf is not None else None

    # -- results ------------------------------------------------------------------------------

    def spectra(self):
        """Mapping parameter name -> :class:`lowrank.SpectrumResult` of its latest tracked step."""
        return self.tracked.spectra()

    def state_dict(self):
        """``torch.optim.SGD``'s state dict plus a "lowrank" entry (tensors and numbers only)."""
        out = super().state_dict()
        out["lowrank"] = {"steps": self.steps, **self.tracked.state_dict()}
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("lowrank", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.steps = int(extra["steps"])
            self.tracked.load_state_dict(extra)

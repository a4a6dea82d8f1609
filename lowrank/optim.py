"""SpectralSGD: a drop-in ``torch.optim.SGD`` that tracks the spectrum of every weight matrix."""

from __future__ import annotations

import torch

from . import backends, trackset
from .fused_sgd_sketch import foreach_applies, sgd_update_torch, sgd_update_torch_many
from .trackset import TrackedSet, check_positive_int


def _unscale(grad: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """grad / grad_scale (GradScaler's scale) in float32 or float64 arithmetic: the scale (2^16
    by default) overflows float16, and a power-of-two scale divides exactly."""
    opmath = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = grad.to(opmath) / grad_scale.to(device=grad.device, dtype=opmath)
    return out.to(grad.dtype)


def _all_finite(grad: torch.Tensor) -> bool:
    """One host sync: whether every stored entry of grad is finite (sparse grads included)."""
    values = grad.coalesce().values() if grad.is_sparse else grad
    return bool(torch.isfinite(values).all())


def _matrix(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` viewed as ``shape`` (a conv kernel as its (m, n) matrix and back); ``t`` itself
    where it already has that shape. Each tensor object made per matrix and step costs a CPU
    step 3-5 us (after the pass has evicted Python's data): the views of 2-D weights and the
    momentum buffer's re-view were 2-4.5% of the MLP, gpt2 and ResNet steps (A/B in one
    process)."""
    return t if t.shape == shape else t.view(shape)


class SpectralSGD(torch.optim.Optimizer):
    """Stochastic gradient descent exactly as ``torch.optim.SGD``, plus spectral tracking.

    Same arguments, validation, param groups and ``momentum_buffer`` state as ``torch.optim.SGD``.
    ``params`` may be tensors, ``model.named_parameters()`` (names then key the results and the
    log; otherwise parameters are called "param0", "param1", ... in order) or param groups of
    either, exactly as ``torch.optim.SGD`` takes them (named groups get "param_names").

    Every parameter with 2 or more dimensions (conv kernels viewed as (out, in*kh*kw)) is tracked:
    each ``track_every``-th step, the pass that applies the update also sketches the updated
    weights, and the top ``rank`` singular values and the metrics of :mod:`lowrank.metrics` are
    available from :meth:`spectra`. On a tracking step every tracked matrix is sketched: a
    tracked parameter that gets no update this step (no gradient, e.g. frozen; or a skipped
    non-finite gradient) is read by the sketch-only pass, so its spectrum stays current (exclude
    frozen matrices to save that read). Parameters added later with ``add_param_group`` are
    updated, not tracked. Under the "both" schedule (the GPU's) the tracked matrices of one
    shape, dtype, backend and param group are updated and sketched together after the loop over
    parameters (one launch of the CuPy pass per group); the results are those of one call each.
    The untracked parameters of a param group on the CPU (biases, norms) are updated together by
    torch's ``_foreach_*`` ops, which run the single-tensor kernels tensor by tensor there: the
    same results, one Python call per op instead of per tensor.

    ``foreach``, ``fused`` and ``differentiable`` are accepted for drop-in compatibility: the
    update is always that of torch's single-tensor implementation (``foreach=False``), bit for
    bit, so ``foreach=True``, ``fused=True`` and ``differentiable=True`` raise ValueError.

    Tracking arguments:
        rank: number of singular values reported per matrix (r); a matrix with fewer
            (min(m, n) < rank, e.g. a 1-unit output layer) reports all min(m, n) of them.
        sketch_rank: sketch width k >= rank (default 2 * rank), capped at min(m, n) per matrix.
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
        precision: "fp32" (exact, default) | "tf32x3" | "tf32": the sketch products on tensor
            cores where the Triton kernels run (TF32 carries ~1e-3 relative error per product;
            tf32x3 about fp32's). Matrices on the torch backend under "auto" stay exact.
        deterministic: bitwise-reproducible sketches with the Triton kernels (a fixed-order
            reduction instead of atomics); the torch backend always is.
        schedule: how the two sketches Y = W V and Z = W^T U are spread over steps (see
            :data:`lowrank.trackset.SCHEDULES`). "auto" (default): "sequential" on the CPU's
            torch backend (Y, the next U, then Z from it: a full power step per training step at
            the cost of "both" there, and much smaller errors on moving weights), "both"
            elsewhere (one fused pass on a GPU). "alternate" (torch backend): Y and Z in turn,
            half the products, but larger errors on fast-moving weights.

    AMP: works with ``torch.amp.GradScaler`` (``_step_supports_amp_scaling``): gradients are
    unscaled inside the step, and a step with ``found_inf`` leaves parameters, buffers, tracker
    state and step counts unchanged (reading ``found_inf`` costs one host sync per step).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, rank=8, sketch_rank=None, track_every=1, track_grad=False,
                 audit_every=0, backend="auto", seed=0, include=None, exclude=None,
                 rank_tol=1e-3, skip_nonfinite=False, log=None, precision="fp32",
                 deterministic=False, schedule="auto"):
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
        for flag, value in (("foreach", foreach), ("fused", fused),
                            ("differentiable", differentiable)):
            if value:
                raise ValueError(f"SpectralSGD does not support {flag}=True: the update is "
                                 "torch.optim.SGD's single-tensor (foreach=False) implementation")
        self.track_every = check_positive_int(track_every, "track_every")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults)
        # Names: torch keeps those of model.named_parameters() in group["param_names"].
        self._names, counter = {}, 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                self._names[id(p)] = names[i] if names is not None else f"param{counter}"
                counter += 1
        named = [(self._names[id(p)], p) for g in self.param_groups for p in g["params"]]
        self.skip_nonfinite = bool(skip_nonfinite)
        self._steps, self._steps_offset = 0, 0
        self.tracked = TrackedSet(named, rank=rank, sketch_rank=sketch_rank, seed=seed,
                                  backend=backend, rank_tol=rank_tol, audit_every=audit_every,
                                  track_grad=track_grad, include=include, exclude=exclude, log=log,
                                  precision=precision, deterministic=deterministic,
                                  schedule=schedule)
        if log is not None:
            # Nested, so that the user's own config keys (a data "seed", ...) are never replaced.
            log.update_config({"optimizer": {
                "name": "SpectralSGD",
                **{k: v for k, v in defaults.items() if k not in ("foreach", "fused", "differentiable")},
                "rank": rank, "sketch_rank": sketch_rank, "track_every": track_every,
                "track_grad": bool(track_grad), "audit_every": audit_every, "seed": seed,
                "backend": backend, "include": include, "exclude": exclude,
                "rank_tol": rank_tol, "skip_nonfinite": self.skip_nonfinite,
                "precision": precision, "deterministic": deterministic, "schedule": schedule},
                "tracked": {n: list(t.shape) for n, t in self.tracked.trackers.items()}})

    def add_param_group(self, param_group):
        for flag in ("foreach", "fused", "differentiable"):
            if isinstance(param_group, dict) and param_group.get(flag):
                raise ValueError(f"SpectralSGD does not support {flag}=True (param group)")
        super().add_param_group(param_group)

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only; keep the tracking
        # too, so that copy.deepcopy((model, opt)) gives a working copy. Names go by position
        # (parameters get new ids in a copy). A RunLog is shared by copies, not duplicated.
        state = super().__getstate__()
        state["_lowrank"] = {
            "tracked": self.tracked, "steps": self.steps, "track_every": self.track_every,
            "skip_nonfinite": self.skip_nonfinite,
            "names": [self._names.get(id(p)) for g in self.param_groups for p in g["params"]]}
        return state

    def __setstate__(self, state):
        state = dict(state)
        extra = state.pop("_lowrank", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
        if extra is not None:
            self.tracked = extra["tracked"]
            self.steps = extra["steps"]
            self.track_every = extra["track_every"]
            self.skip_nonfinite = extra["skip_nonfinite"]
            flat = [p for g in self.param_groups for p in g["params"]]
            self._names = {id(p): n for p, n in zip(flat, extra["names"]) if n is not None}

    @property
    def steps(self) -> int:
        """Optimizer steps taken (skipped AMP steps excluded). After a CUDA graph captured a
        tracked step, counted on the device with the tracked steps (one host sync to read)."""
        return self.tracked.count(self._steps, self._steps_offset)

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)
        self._steps_offset = self._steps - self.tracked.count(self._steps, 0)

    def _prepare_capture(self) -> None:
        """Checks of a step that a CUDA graph is capturing, before any work is captured (a
        replay repeats exactly what was captured: the tracking decision, first-step momentum
        buffers, host reads)."""
        problems = []
        if self.track_every != 1:
            problems.append(f"track_every={self.track_every} (a replay cannot choose whether "
                            "to track; capture with track_every=1)")
        if getattr(self, "found_inf", None) is not None:
            problems.append("a GradScaler step (it reads found_inf on the host)")
        if self.skip_nonfinite:
            problems.append("skip_nonfinite=True (it reads each gradient's finiteness on the host)")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    problems.append(f"{self._names.get(id(p), 'a parameter')!r} has a sparse "
                                    "gradient")
                elif group["momentum"] != 0 and "momentum_buffer" not in self.state[p]:
                    problems.append("momentum buffers not created yet (run a few eager steps "
                                    "before the capture, as torch's CUDA-graph recipe does)")
                    break
        if problems:
            raise RuntimeError("SpectralSGD cannot be captured in a CUDA graph: "
                               + "; ".join(problems))
        if self.tracked.trackers:
            self._steps_offset = self.tracked.capture_count("SpectralSGD", self._steps,
                                                            self._steps_offset)

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step; on tracking steps also the sketch of every tracked matrix.

        Can be captured in a CUDA graph (``torch.cuda.graph``) after a few eager steps, with
        track_every=1 and a sync-free backend ("cupy"): see :meth:`_prepare_capture`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.tracked.check_log_open()
        capturing = trackset.capturing()
        if capturing:
            self._prepare_capture()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item() != 0):
            return loss  # AMP overflow: nothing changes, not even the step count
        track = self.track_every == 1 or self._steps % self.track_every == 0
        tracked_now = []
        batches: dict[tuple, tuple] = {}  # same-shape matrices updated and sketched together
        for gi, group in enumerate(self.param_groups):
            hyper = {k: group[k] for k in ("lr", "weight_decay", "momentum", "dampening",
                                           "nesterov", "maximize")}
            untracked = []  # (p, grad, buf) of the untracked parameters, one update for all
            on_cpu = []  # (name, p, grad, buf) of tracked matrices on the C kernel, one call
            for p in group["params"]:
                name = self._names.get(id(p))  # None: added by add_param_group, not tracked
                tracked = track and name in self.tracked.trackers
                grad = p.grad
                if grad is not None and grad_scale is not None:
                    grad = _unscale(grad, grad_scale)
                if grad is not None and self.skip_nonfinite and not _all_finite(grad):
                    grad = None  # leave p and its momentum buffer as they are
                if grad is None:
                    if tracked:  # no update: the sketch-only pass keeps the spectrum current
                        self.tracked.sketch_only(name)
                        tracked_now.append(name)
                    continue
                # Like torch.optim.SGD, state exists only for parameters with momentum.
                buf = self.state[p].get("momentum_buffer") if hyper["momentum"] != 0 else None
                if tracked:
                    self.tracked.before_update(name, grad, p)
                    tracked_now.append(name)
                    key = self._batch_key(name, p, grad, buf, gi)
                    if key is not None:  # updated after the loop, with its group
                        batches.setdefault(key, (hyper, []))[1].append((name, p, grad, buf))
                        continue
                    if self._in_cpu_list(name, grad, buf, capturing):
                        on_cpu.append((name, p, grad, buf))  # after the group's loop
                        continue
                    buf = self._fused_step(name, p, grad, buf, hyper)
                elif not capturing and foreach_applies(p, grad, buf, hyper["lr"]):
                    untracked.append((p, grad, buf))  # updated after the group's loop
                    continue
                else:
                    buf = sgd_update_torch(p, grad, buf, lr_on_device=capturing, **hyper)
                if hyper["momentum"] != 0:
                    self.state[p]["momentum_buffer"] = buf
            if on_cpu:
                self._fused_step_list(on_cpu, hyper)
            if untracked:
                bufs = sgd_update_torch_many(*map(list, zip(*untracked)), **hyper)
                if hyper["momentum"] != 0:
                    for (p, _, _), buf in zip(untracked, bufs):
                        self.state[p]["momentum_buffer"] = buf
        for hyper, items in batches.values():
            self._fused_step_many(items, hyper)
        if tracked_now:
            self.tracked.finish_step()
            self.tracked.after_step(self._steps, tracked_now)
        self._steps += 1
        return loss

    def _fused_step(self, name, p, grad, buf, hyper):
        """Update p in place and sketch the updated matrix; returns the momentum buffer."""
        tr = self.tracked.trackers[name]
        if grad.is_sparse or not self.tracked.contiguous(name, grad, buf):
            # No (m, n) view to update in place: torch's update, then the sketch-only pass.
            buf = sgd_update_torch(p, grad, buf, **hyper)
            self.tracked.sketch_only(name)
            return buf
        # (m, n) views: every backend reads a 2-D matrix the same way (conv kernels included).
        W, G = p.view(tr.shape), grad.view(tr.shape)
        B = buf.view(tr.shape) if buf is not None else None
        sk, B = backends.fused_sgd_sketch(W, G, B, tr.U, tr.V, backend=self.tracked.backend[name],
                                          options=self.tracked.options[name],
                                          sides=self.tracked.sides(name), **hyper)
        self.tracked.absorb(name, sk)
        return B.view(p.shape) if B is not None else None

    def _in_cpu_list(self, name, grad, buf, capturing) -> bool:
        """Whether ``p`` is updated and sketched with the other tracked matrices of its param
        group in one call of the C kernel (:meth:`_fused_step_list`): the "cpu" backend, a
        dense gradient, contiguous operands."""
        return not capturing and not grad.is_sparse and self.tracked.in_cpu_list(name, grad, buf)

    def _fused_step_list(self, items, hyper):
        """Update and sketch the tracked matrices ``items`` (name, p, grad, buf) of one param
        group, whatever their shapes, in one kernel call; sets each momentum buffer and queues
        each sketch for the post-processing."""
        tracked = self.tracked
        flags = [tracked.in_place(name, p) for name, p, _, _ in items]
        whole = [it for it, flag in zip(items, flags) if flag]
        if whole:  # the whole tracked step in the kernel, state written in place
            old_bufs = [None if buf is None else _matrix(buf, tracked.trackers[name].shape)
                        for name, _, _, buf in whole]
            bufs = tracked.step_in_place(
                [name for name, _, _, _ in whole],
                [_matrix(p, tracked.trackers[name].shape) for name, p, _, _ in whole],
                [_matrix(grad, tracked.trackers[name].shape) for name, _, grad, _ in whole],
                old_bufs, **hyper)
            self._keep_new_buffers(whole, bufs, old_bufs, hyper)
            if len(whole) == len(items):
                return
            items = [it for it, flag in zip(items, flags) if not flag]
        trs = [tracked.trackers[name] for name, _, _, _ in items]
        old_bufs = [None if buf is None else _matrix(buf, tr.shape)
                    for (_, _, _, buf), tr in zip(items, trs)]
        sketches, bufs = backends.fused_sgd_sketch_list(
            [_matrix(p, tr.shape) for (_, p, _, _), tr in zip(items, trs)],
            [_matrix(grad, tr.shape) for (_, _, grad, _), tr in zip(items, trs)], old_bufs,
            [tr.U for tr in trs], [tr.V for tr in trs],
            [tracked.sides(name) for name, _, _, _ in items], backend="cpu", **hyper)
        for (name, _, _, _), sk in zip(items, sketches):
            tracked.absorb(name, sk)
        self._keep_new_buffers(items, bufs, old_bufs, hyper)

    def _keep_new_buffers(self, items, bufs, old_bufs, hyper) -> None:
        """Store the momentum buffers that a list call made (the first step with momentum)."""
        if hyper["momentum"] == 0:
            return
        for (_, p, _, _), buf, old in zip(items, bufs, old_bufs):
            if buf is not old:
                self.state[p]["momentum_buffer"] = _matrix(buf, p.shape)

    def _batch_key(self, name, p, grad, buf, group_index):
        """The key of the batch that updates and sketches ``p`` together with the other
        matrices of its :meth:`TrackedSet.batch_key` and param group (one launch of the CuPy
        pass for all, and a post-processing that needs no concatenation); None where the
        matrix takes its own call (see there; also sparse gradients)."""
        key = None if grad.is_sparse else self.tracked.batch_key(name, grad, buf)
        return None if key is None else (*key, group_index, buf is None)

    def _fused_step_many(self, items, hyper):
        """Update and sketch a batch of :meth:`_batch_key` (one launch on CuPy); sets each
        matrix's momentum buffer and queues the batch's sketches for the post-processing."""
        names = [name for name, _, _, _ in items]
        shape = self.tracked.trackers[names[0]].shape
        Ws = [p.view(shape) for _, p, _, _ in items]
        Gs = [grad.view(shape) for _, _, grad, _ in items]
        bufs = [None if buf is None else buf.view(shape) for _, _, _, buf in items]
        U, V = self.tracked.bases(names)
        sk, bufs = backends.fused_sgd_sketch_many(
            Ws, Gs, bufs, U, V, backend=self.tracked.backend[names[0]],
            options=self.tracked.options[names[0]], **hyper)
        if hyper["momentum"] != 0:
            for (_, p, _, _), buf in zip(items, bufs):
                self.state[p]["momentum_buffer"] = buf.view(p.shape)
        self.tracked.absorb_many(names, sk, (U, V))

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
            self.tracked.load_state_dict(extra)  # first: the step count may be read from it
            self.steps = int(extra["steps"])

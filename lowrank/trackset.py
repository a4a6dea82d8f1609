"""The set of tracked matrices behind SpectralSGD and SpectrumTracker.

Chooses which parameters are tracked (every parameter with >= 2 dims, filtered by include /
exclude name patterns), validates the rank against every tracked shape, owns one
:class:`~lowrank.tracking.MatrixTracker` per matrix (and one per gradient with ``track_grad``),
runs the optional exact audits and feeds the run log. Both entry points differ only in whether
the pass also updates W.
"""

from __future__ import annotations

import fnmatch

import torch

from . import backends, batched_metrics, metrics
from .post_graphs import PostGraphs
from .sketch import matrix_shape
from .tracking import (STATE_KEYS, MatrixTracker, SpectrumResult, absorb_group,
                       absorb_groups, absorb_sequential, batched_bases)

_NAN = float("nan")
# How the two sketches are spread over steps. The bi-iteration runs two interleaved chains of
# half power steps (V0 -> U1 -> V2 ... and U0 -> V1 -> U2 ...).
# "both": Y = W V and Z = W^T U every step from one read of W (the kernel contract; on a GPU the
#   second product rides on the same memory traffic).
# "sequential": Y = W V, the next U from it, then Z = W^T U_next from the same W: one chain
#   moving a full power step per training step, with both bases fitted to the current weights.
#   The pass computes Y and P = W^T Y (= W^T W V) from one read of W (the cpu kernel sweeps
#   each band of rows twice while it is in cache); since U_next = Y T for a k x k factor T of the
#   post-processing, Z = P T. The cost of "both", and measured 3-30x smaller worst errors on
#   drifting matrices (tests/test_schedule.py).
# "alternate": Y on even tracked steps, Z on odd ones. It keeps exactly the first chain of
#   "both" at half the products and half the post-processing, but reports one chain's estimate
#   per step and refreshes each basis every other step: on fast-moving weights (the demo's lr
#   0.2 MLP) its worst error against exact svdvals was 2-10x that of "both" (4e-3 of sigma_1
#   against 3.6e-4). An opt-in for speed.
# "auto" (the default): sequential for matrices on the CPU (torch or cpu backend), both elsewhere.
SCHEDULES = ("auto", "both", "sequential", "alternate")
# Backends that run every schedule (one-sided and power sketches); the GPU kernels run "both".
CPU_BACKENDS = ("torch", "cpu")


def check_positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value} (must be {'>= 0' if allow_zero else '>= 1'})")
    return value


def _patterns(value, what: str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be parameter names or glob patterns (strings)")
    return value


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (a step then runs
    the checks of :meth:`TrackedSet.capture`)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def trackable(p: torch.Tensor) -> bool:
    """A parameter can be tracked when it has >= 2 dims, at least one element and a real
    floating-point dtype (the sketches and singular values are real: a complex weight would be
    read by its real part alone; optimizers update such parameters untracked)."""
    return p.dim() >= 2 and p.numel() > 0 and p.is_floating_point()


def select_tracked(named_params, include=None, exclude=None) -> list[tuple[str, torch.Tensor]]:
    """The (name, param) pairs to track: >= 2-D, non-empty, matching include and not exclude.

    Patterns are exact names or fnmatch globs ("layers.*.weight"). A pattern that matches no
    parameter at all raises ValueError (a typo must not silently track nothing), and so does an
    include pattern that matches only parameters that cannot be tracked (1-D, empty, complex or
    integer). A glob that also matches biases simply skips them.
    """
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    names = [name for name, _ in named_params]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {dup}")
    for what, pats in (("include", include), ("exclude", exclude)):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(f"{what} pattern {pat!r} matches no parameter; known: "
                                 f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    for pat in include or ():
        hits = [(n, p) for n, p in named_params if fnmatch.fnmatchcase(n, pat)]
        if not any(trackable(p) for _, p in hits):
            shapes = ", ".join(f"{n} {tuple(p.shape)} {p.dtype}" for n, p in hits[:5])
            raise ValueError(f"include pattern {pat!r} matches only parameters that cannot be "
                             f"tracked ({shapes}): tracking needs >= 2 dims, >= 1 element "
                             "and a real floating-point dtype")
    chosen = []
    for name, p in named_params:
        if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        if trackable(p):
            chosen.append((name, p))
    return chosen


class _Matrices:
    """The weights of ``names`` as their (m, n) matrices (:meth:`TrackedSet.matrix`), each
    made when read: the sequential schedule reads only those that the C kernel's fast path did
    not take, and two tensor objects per matrix and step cost a CPU step 3-5 us each."""

    def __init__(self, tracked: TrackedSet, names: list[str]):
        self.tracked, self.names = tracked, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tracked.matrix(self.names[i])


class TrackedSet:
    """Trackers for a fixed set of named matrices; see the module docstring."""

    def __init__(self, named_params, *, rank: int, sketch_rank: int | None, seed: int,
                 backend: str, rank_tol: float, audit_every: int, track_grad: bool,
                 include=None, exclude=None, log=None, precision: str = "fp32",
                 deterministic: bool = False, schedule: str = "auto"):
        self.rank = check_positive_int(rank, "rank")
        if sketch_rank is not None:
            check_positive_int(sketch_rank, "sketch_rank")
            if sketch_rank < rank:
                raise ValueError(f"sketch_rank={sketch_rank} must be >= rank={rank}")
        self.audit_every = check_positive_int(audit_every, "audit_every", allow_zero=True)
        if not (isinstance(rank_tol, float | int) and 0 < rank_tol < 1):
            raise ValueError(f"rank_tol must be in (0, 1), got {rank_tol!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        # Values checked once even when nothing is tracked; per matrix below for its backend.
        backends.kernel_options("auto", "torch", precision=precision, deterministic=deterministic)
        self.rank_tol = float(rank_tol)
        self.track_grad = bool(track_grad)
        self.log = log
        self.params: dict[str, torch.Tensor] = {}
        self.trackers: dict[str, MatrixTracker] = {}
        self.grad_trackers: dict[str, MatrixTracker] = {}
        self.backend: dict[str, str] = {}
        self.options: dict[str, dict] = {}  # kernel options per matrix (backends.kernel_options)
        self.schedule: dict[str, str] = {}  # per matrix: "both" | "sequential" | "alternate"
        self.audits: dict[str, dict] = {}
        self.grad_stats: dict[str, dict] = {}
        self._pending: list[tuple] = []  # (name, sketch) of this step, see finish_step
        self._batched: list[tuple] = []  # (names, batched sketch) of this step, ditto
        for name, p in select_tracked(named_params, include, exclude):
            m, n = matrix_shape(p.shape)
            # A matrix with fewer than `rank` singular values (an output layer of 1 or 10
            # units) reports all of them: its sketch spans min(m, n) directions, so its
            # estimates are its exact spectrum once converged, and every per-matrix result
            # holds min(rank, m, n) values.
            k = min(sketch_rank if sketch_rank is not None else 2 * rank, m, n)
            basis_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            try:
                resolved = backends.resolve_backend(backend, p.device, p.dtype,
                                                    precision=precision,
                                                    deterministic=deterministic, width=k)
            except TypeError as exc:
                raise TypeError(f"parameter {name!r}: {exc}") from None
            try:
                options = backends.kernel_options(backend, resolved, precision=precision,
                                                  deterministic=deterministic)
            except ValueError as exc:
                raise ValueError(f"parameter {name!r}: {exc}") from None
            if schedule in ("alternate", "sequential") and resolved not in CPU_BACKENDS:
                raise ValueError(f"parameter {name!r}: schedule={schedule!r} runs on the torch "
                                 f"and cpu backends only (this matrix is on {resolved!r}, whose "
                                 "fused pass gets both products from one read of W); use 'auto' "
                                 "or 'both'")
            self.params[name] = p
            self.backend[name] = resolved
            self.options[name] = options
            if schedule == "auto":
                on_cpu = resolved in CPU_BACKENDS and p.device.type == "cpu"
                self.schedule[name] = "sequential" if on_cpu else "both"
            else:
                self.schedule[name] = schedule
            self.trackers[name] = MatrixTracker(name, (m, n), k, seed=seed, device=p.device,
                                                basis_dtype=basis_dtype)
            if self.track_grad:
                self.grad_trackers[name] = MatrixTracker(name + "#grad", (m, n), k, seed=seed,
                                                         device=p.device, basis_dtype=basis_dtype)
        self._grad_fresh: set[str] = set()  # names whose gradient was sketched this step
        self._grad_pending: list[tuple] = []  # (name, gradient sketch) of this step
        self._metric_plans: dict[tuple, list] = {}  # after_step's batches, see _metric_plan
        self._packs: dict[tuple, dict] = {}
        self.pack()
        self._own_state_in_place()
        # One step counter per CUDA device, kept on the device beside the Python counts (one
        # add a step) so that a CUDA graph that captures a step can advance it: see capture().
        self.step_counters: dict[torch.device, torch.Tensor] = {
            dev: torch.zeros((), dtype=torch.int64, device=dev)
            for dev in {p.device for p in self.params.values()}}
        self.captured = False
        # The post-processing of eager GPU steps, replayed from CUDA graphs (finish_step).
        self.post_graphs = PostGraphs()

    def pack(self) -> None:
        """Give the matrices that the "both" schedule updates and sketches together (same
        shape, sketch width, basis dtype, weight dtype, device, backend: :meth:`batch_key`)
        one batched tensor per state field, each tracker holding its slice, and make them
        static (written in place from now on). A batched pass of a pack then reads its bases
        without a concatenation and commits each field with one operation, and the state keeps
        its addresses, as a CUDA graph that captures the step needs."""
        groups: dict[tuple, list[str]] = {}
        for name in self.trackers:
            if self.schedule[name] == "both":
                groups.setdefault(self._pack_key(name), []).append(name)
        for names in groups.values():
            trs = [self.trackers[n] for n in names]
            packed = {key: torch.cat([getattr(t, key) for t in trs]) for key in STATE_KEYS}
            for i, t in enumerate(trs):
                for key, value in packed.items():
                    setattr(t, key, value[i:i + 1])
                t.static = True
            self._packs[tuple(names)] = packed

    def _own_state_in_place(self) -> None:
        """Make the trackers that the C kernel steps in place (the sequential schedule on the
        "cpu" backend: :meth:`in_place`) static, each state field its own contiguous memory,
        which the kernel overwrites (results and state dicts taken from them are copies: see
        MatrixTracker.metrics)."""
        for name, t in self.trackers.items():
            if self.schedule[name] == "sequential" and self.backend[name] == "cpu":
                for key in STATE_KEYS:
                    setattr(t, key, getattr(t, key).clone(memory_format=torch.contiguous_format))
                # (wider sketches stay on the list pass, whose commits of static state cost
                # a copy per field)
                t.static = backends.kernel_module("cpu", "sequential_step").takes_state(t)

    def in_place(self, name: str, weight: torch.Tensor) -> bool:
        """Whether ``name``'s tracked step runs whole in the C kernel, which writes its new state
        in place (:meth:`step_in_place`): the sequential schedule on the "cpu" backend, a static
        tracker (whose state the kernel takes: width <= 32, ...), and weights it takes."""
        return (self.trackers[name].static and self.schedule[name] == "sequential"
                and self.backend[name] == "cpu"
                and backends.kernel_module("cpu", "sequential_step").takes_weight(weight))

    def step_in_place(self, names: list[str], Ws, Gs, bufs, **hyper) -> list:
        """The tracked step of ``names`` (:meth:`in_place` each) in the C kernel: update (``Gs``
        None: sketch only; ``hyper``: torch.optim.SGD's), power sketch, post-processing and
        commit of the new state. A matrix the kernel leaves (a sketch that is not finite, a
        refill) is queued with its sketch for :meth:`finish_step`'s reference path. Returns the momentum buffers, as
        :func:`lowrank.backends.fused_sgd_sketch_list`."""
        trs = [self.trackers[n] for n in names]
        new_bufs, rest = backends.fused_sequential_step_list(Ws, Gs, bufs, trs, backend="cpu",
                                                             **hyper)
        for i, (name, t) in enumerate(zip(names, trs)):
            sk = rest.get(i)
            if sk is None:  # committed by the kernel
                t._step += 1
            self._pending.append((name, sk))
        return new_bufs

    def sides(self, name: str) -> str:
        """Which sketch the pass over ``name``'s weights computes this step: "both"; "power"
        (Y = W V and P = W^T Y) under the sequential schedule (Z = W^T U_next = P T follows in
        :meth:`finish_step`); under the alternating one "y" on even tracked steps and "z"
        (Z = W^T U) on odd ones."""
        schedule = self.schedule[name]
        if schedule == "both":
            return "both"
        if schedule == "sequential":
            return "power"
        return "y" if self.trackers[name].step % 2 == 0 else "z"

    def check_log_open(self) -> None:
        """Raise before a step changes anything when its log is closed (the step would update
        the weights and then fail to log them)."""
        if self.log is not None and self.log.closed:
            raise RuntimeError(f"the RunLog of this optimizer/tracker ({self.log.run_dir}) is "
                               "closed; open a new RunLog on the folder to go on logging")

    def matrix(self, name: str, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the parameter) as the (m, n) matrix it is tracked as (a view when the
        layout allows: conv kernels (o, i, kh, kw) -> (o, i*kh*kw))."""
        t = self.params[name].detach() if t is None else t
        return t.reshape(self.trackers[name].shape)

    # -- per-step work ------------------------------------------------------------------------

    def before_update(self, name: str, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """Gradient tracking (needs W before the update): sketch G, ||G||_F, <G, W>."""
        if not self.track_grad:
            return
        gt = self.grad_trackers[name]
        if grad.is_sparse:
            grad = grad.to_dense()
        G = self.matrix(name, grad)
        # both sketches of G in one pass on the weight's backend (its kernel's sketch-only pass)
        sk = backends.sketch(G, gt.U, gt.V, backend=self.backend[name], sides="both",
                             **self.options[name])
        self._grad_pending.append((name, sk))  # post-processed in finish_step, batched
        inner, wn2 = backends.inner_and_square_norm(G, self.matrix(name, weight.detach()),
                                                     backend=self.backend[name])
        wn = wn2.sqrt()
        gn = sk.fro2[0].sqrt()
        denom = (gn * wn).clamp_min(1e-300)
        self.grad_stats[name] = {"grad_weight_inner": inner, "grad_weight_cosine": inner / denom}
        self._grad_fresh.add(name)

    def absorb(self, name: str, sk) -> None:
        """Queue the sketches of ``name``'s current weights; :meth:`finish_step` post-processes."""
        self._pending.append((name, sk))

    def batch_key(self, name: str, *operands) -> tuple | None:
        """What the matrices of one batched pass share (shape, sketch width, basis dtype, weight
        dtype, device, backend); None where ``name`` takes its own call: schedules other than
        "both" (the CPU's), or an operand (weight, gradient, buffer; None skipped) that is not
        contiguous."""
        if self.schedule[name] != "both" or not self.contiguous(name, *operands):
            return None
        return self._pack_key(name)

    def in_cpu_list(self, name: str, *operands) -> bool:
        """Whether ``name`` joins the one C-kernel call that passes over all such matrices of a
        step or param group, whatever their shapes (:func:`lowrank.backends.
        fused_sgd_sketch_list`): the "cpu" backend, and the weight and ``operands`` (gradient,
        buffer; None skipped) contiguous."""
        return self.backend[name] == "cpu" and self.contiguous(name, *operands)

    def contiguous(self, name: str, *operands) -> bool:
        """Whether ``name``'s weight and ``operands`` (None skipped) are contiguous: a kernel
        then updates the (m, n) views in place."""
        return all(x is None or x.is_contiguous() for x in (self.params[name], *operands))

    def _pack_key(self, name: str) -> tuple:
        """Shape, sketch width, basis dtype, weight dtype, device, backend: what the matrices
        of one pack, and of one batched pass, share."""
        p, tr = self.params[name], self.trackers[name]
        return (tr.shape, tr.k, tr.U.dtype, p.dtype, p.device, self.backend[name])

    def capture(self, owner: str) -> None:
        """Prepare the step that a CUDA graph is capturing (``owner`` names the caller in
        errors). Raises, before any work is captured, where a replay could not repeat the step:
        host work each step (audits, a log, gradient tracking), a schedule other than "both",
        a post-processing with host synchronisations (the torch reference's cuSOLVER calls), or
        trackers at different steps. Then links every tracker's step to its device counter,
        which each step (eager or replayed) advances: the refill seeds and :attr:`step` read it.
        """
        problems = []
        if self.audit_every:
            problems.append("audit_every > 0 (an audit computes exact svdvals on the host)")
        if self.log is not None:
            problems.append("a log (rows are handed to it on the host each step; read "
                            "spectra() between replays instead)")
        if self.track_grad:
            problems.append("track_grad=True (the gradient post-processing synchronises)")
        for name, tr in self.trackers.items():
            p = self.params[name]
            if self.schedule[name] != "both":
                problems.append(f"{name!r} runs the {self.schedule[name]!r} schedule "
                                "(only 'both' is captured)")
            elif p.is_cuda and not backends.capture_safe(self.backend[name], p.device, tr.k):
                problems.append(f"{name!r} is on backend {self.backend[name]!r}, whose "
                                "post-processing synchronises the host (use 'cupy', or 'triton' "
                                f"up to k = {backends.TRITON_POST_MAX_K})")
            if len(problems) >= 4:
                break
        if len({tr._step for tr in self.trackers.values()}) > 1:
            problems.append("the tracked matrices are at different steps")
        if problems:
            raise RuntimeError(f"{owner} cannot be captured in a CUDA graph: "
                               + "; ".join(problems))
        for name, tr in self.trackers.items():
            tr.step_source = self.step_counters[self.params[name].device]
        self.captured = True

    def capture_count(self, owner: str, host_count: int, offset: int) -> int:
        """:meth:`capture` for a caller that keeps a count of its own (optimizer steps, tracker
        calls; see :meth:`count`): returns the count's offset from the device counter, set at
        the first capture from the Python counts (no host read: this runs inside the capture)."""
        if not self.captured:  # from now on the count is read from the device counter
            offset = host_count - self.host_steps()
        self.capture(owner)
        return offset

    def host_steps(self) -> int:
        """The trackers' common step count as Python counts it: no host sync, equal to the
        device counter until a capture, stale after replays (inside a capture, where reading
        the device is not allowed, this is the one to use)."""
        tr = next(iter(self.trackers.values()), None)
        return 0 if tr is None else tr._step

    def count(self, host_count: int, offset: int) -> int:
        """A caller's count (optimizer steps, tracker calls) that advances with the tracked
        steps: ``host_count`` until a capture, then the device counter plus ``offset``."""
        return host_count if not self.captured else self.tracked_steps() + offset

    def tracked_steps(self) -> int:
        """Tracked steps so far (the trackers' common count; after CUDA-graph replays read
        from the device, one host sync)."""
        tr = next(iter(self.trackers.values()), None)
        return 0 if tr is None else tr.step

    def bases(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batched bases (U, V) of same-shape matrices ``names`` (for a batched pass): a
        pack's own tensors where ``names`` are one pack, else concatenated."""
        packed = self._packs.get(tuple(names))
        if packed is not None:
            return packed["U"], packed["V"]
        return batched_bases([self.trackers[n] for n in names])

    def absorb_many(self, names: list[str], sk, bases) -> None:
        """Queue the batched sketches (b, ...) of the matrices ``names``, which share a
        :meth:`batch_key`, made with the batched ``bases`` (U, V): post-processed as one group,
        with no concatenation."""
        self._batched.append((names, sk, bases))

    def finish_step(self) -> None:
        """Post-process the queued sketches, batched over matrices of one shape, width, basis
        dtype, device and backend (on the CuPy kernel over every shape of one width); then run
        the audits that are due."""
        pending, self._pending = self._pending, []
        batched, self._batched = self._batched, []
        grads, self._grad_pending = self._grad_pending, []
        if grads:
            self._absorb_grads(grads)
        # Both-sided groups, post-processed together where they share a backend, width, basis
        # dtype and device (absorb_groups: one CuPy launch sequence for all shapes).
        specs = []
        for names, sk, bases in batched:
            specs.append(([self.trackers[n] for n in names], None, sk, bases,
                          self._packs.get(tuple(names)), self.backend[names[0]]))
            pending += [(name, None) for name in names]
        groups: dict[tuple, list] = {}
        sequential = []
        for name, sk in pending:
            if sk is None:  # post-processed above with its batch, or stepped in place
                continue
            tr = self.trackers[name]
            if self.schedule[name] == "sequential":
                sequential.append((name, tr, sk))
                continue
            key = (tr.shape, tr.k, tr.U.dtype, tr.U.device, self.backend[name], sk.Y is None,
                   sk.Z is None)
            groups.setdefault(key, []).append((name, tr, sk))
        for key, items in groups.items():
            names = [name for name, _, _ in items]
            trackers, sketches = [tr for _, tr, _ in items], [sk for _, _, sk in items]
            packed = self._packs.get(tuple(names))
            if key[5] or key[6]:  # one-sided (alternating schedule)
                absorb_group(trackers, sketches, backend=key[4], packed=packed)
            else:
                # a pack's own bases where the group is one, not a new concatenation: their
                # addresses are in the CuPy kernel's problem table, which then stays the same
                specs.append((trackers, sketches, None, self.bases(names), packed, key[4]))
        if specs and not self.post_graphs.run(specs):
            absorb_groups(specs)
        if sequential:
            # Z = W^T U_next comes from the weights after the update; each side is batched over
            # the matrices that share its dimension (see absorb_sequential).
            absorb_sequential([tr for _, tr, _ in sequential], [sk for _, _, sk in sequential],
                              _Matrices(self, [name for name, _, _ in sequential]),
                              [self.backend[name] for name, _, _ in sequential])
        for counter in self.step_counters.values():
            counter.add_(1)
        for name, _ in pending:
            tr = self.trackers[name]
            if self.audit_every and tr.step % self.audit_every == 0:
                self.audits[name] = self._audit(name)

    def _absorb_grads(self, pending) -> None:
        """Post-process this step's gradient sketches (``pending``: (name, sketch)), one batch
        per shape, width, basis dtype, device and backend, on that backend's post-processing
        (a kernel where it has one, as for the weights): one call per shape, not per matrix."""
        groups: dict[tuple, tuple[list, list]] = {}
        for name, sk in pending:
            gt = self.grad_trackers[name]
            key = (gt.shape, gt.k, gt.U.dtype, gt.U.device, self.backend[name])
            trackers, sketches = groups.setdefault(key, ([], []))
            trackers.append(gt)
            sketches.append(sk)
        absorb_groups([(trackers, sketches, None, None, None, key[4])
                       for key, (trackers, sketches) in groups.items()])

    def sketch_all(self, names) -> None:
        """The sketch-only pass of ``names``: under the "both" schedule the contiguous matrices
        of one shape, dtype, device and backend are sketched as one batch (one launch on CuPy)
        and post-processed without concatenation; the other contiguous ones on the "cpu"
        backend, whatever their shapes, in one call of the C kernel; the rest one by one."""
        groups: dict[tuple, list[str]] = {}
        on_cpu = []  # one call of the C kernel for all of them
        for name in names:
            key = self.batch_key(name)
            if key is not None:
                groups.setdefault(key, []).append(name)
            elif self.in_cpu_list(name):
                on_cpu.append(name)
            else:
                self.sketch_only(name)
        flags = [self.in_place(n, self.params[n]) for n in on_cpu]
        in_place = [n for n, flag in zip(on_cpu, flags) if flag]
        if in_place:
            self.step_in_place(in_place, [self.matrix(n) for n in in_place], None, None)
            on_cpu = [n for n, flag in zip(on_cpu, flags) if not flag]
        if on_cpu:
            trs = [self.trackers[n] for n in on_cpu]
            sketches, _ = backends.fused_sgd_sketch_list(
                [self.matrix(n) for n in on_cpu], None, None, [t.U for t in trs],
                [t.V for t in trs], [self.sides(n) for n in on_cpu], backend="cpu")
            for name, sk in zip(on_cpu, sketches):
                self.absorb(name, sk)
        for group in groups.values():
            U, V = self.bases(group)
            sk = backends.sketch_many([self.matrix(n) for n in group], U, V,
                                      backend=self.backend[group[0]], **self.options[group[0]])
            self.absorb_many(group, sk, (U, V))

    def sketch_only(self, name: str) -> None:
        """The sketch-only pass (no update) of one tracked parameter."""
        tr = self.trackers[name]
        sk = backends.sketch(self.matrix(name), tr.U, tr.V, backend=self.backend[name],
                             sides=self.sides(name), **self.options[name])
        self.absorb(name, sk)

    def _audit(self, name: str) -> dict:
        """Exact float64 svdvals of the current weights against the estimates (one host sync)."""
        tr = self.trackers[name]
        W = self.matrix(name).to(torch.float64)
        exact = torch.linalg.svdvals(W) if torch.isfinite(W).all() else None
        r = self.rank
        if exact is None:
            return {"audit_step": tr.step, "audit_max_rel_err": float("nan")}
        est = tr.sigma[0, :r]
        s1 = exact[0].clamp_min(1e-300)
        err = (est - exact[:r]).abs()
        rank = int((exact > self.rank_tol * exact[0]).sum()) if exact[0] > 0 else 0
        return {
            "audit_step": tr.step,
            "audit_sigma": exact[:r].clone(),
            # Error relative to sigma_1: robust for tiny trailing values, what rank counts need.
            "audit_max_rel_err": float((err / s1).max()),
            "audit_max_rel_err_each": float((err / exact[:r].clamp_min(1e-300)).max()),
            "audit_numerical_rank": rank,
            "audit_stable_rank": float(W.square().sum() / s1.square()),
        }

    def after_step(self, step: int, names) -> None:
        """Hand the metrics of the matrices tracked this step to the log (no host sync).

        The log gets a copy of the state per step and computes the metrics when it flushes,
        in a few batches for all buffered steps (:mod:`lowrank.batched_metrics`). Every row has
        the same columns for the whole run (Parquet readers take the schema of the first part
        file): ``audit_max_rel_err`` is NaN on steps without an audit, and with ``track_grad``
        the gradient columns are NaN for a matrix that had no gradient this step.
        """
        fresh, self._grad_fresh = self._grad_fresh, set()
        if self.log is None:
            return
        names = list(names)
        trackers = [self.trackers[name] for name in names]
        blocks = []
        for block in self._metric_plan(names, trackers):
            rows = [names[i] for i in block.rows]
            extra = {}
            if self.audit_every:
                extra["audit_max_rel_err"] = [self._audit_err(name) for name in rows]
            if self.track_grad:
                extra.update(self._grad_columns(rows, fresh))
            values = batched_metrics.Deferred(trackers, block, self.rank, self.rank_tol, extra)
            blocks.append((rows, [self.trackers[name].shape for name in rows], values))
        self.log.record_blocks(step, blocks)

    def _metric_plan(self, names: list[str], trackers) -> list:
        """The blocks of :func:`lowrank.batched_metrics.plan` for these trackers, kept while
        the same names come with the same histories (a run's steps after its second)."""
        histories = tuple(batched_metrics.history(tr) for tr in trackers)
        key = (tuple(names), histories)
        # (setdefault: a set pickled before the plans existed has none)
        plans = self.__dict__.setdefault("_metric_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= 8:  # e.g. changing subsets of names: keep a few
                plans.clear()
            plan = plans[key] = batched_metrics.plan(trackers, histories)
        return plan

    def _audit_err(self, name: str) -> float:
        """The latest audit's error where it audited this step, else NaN."""
        audit = self.audits.get(name)
        if audit is not None and audit["audit_step"] == self.trackers[name].step:
            return audit["audit_max_rel_err"]
        return _NAN

    def _grad_columns(self, rows: list[str], fresh: set) -> dict[str, torch.Tensor]:
        """The gradient columns of the matrices ``rows``, stacked, one tensor row each (the
        metrics of :mod:`lowrank.metrics`, as each gradient tracker's own); NaN in the rows of
        the matrices whose gradient was not sketched this step (``fresh``)."""
        trackers = [self.grad_trackers[name] for name in rows]
        sigma = torch.cat([t.sigma for t in trackers])
        fro2 = torch.cat([t.fro2 for t in trackers])
        cosine = torch.cat([self.grad_stats[name]["grad_weight_cosine"].reshape(1)
                            if name in fresh else torch.zeros_like(t.fro2)
                            for name, t in zip(rows, trackers)])
        columns = {"grad_sigma": metrics.top_r(sigma, self.rank),
                   "grad_spectral_norm": metrics.spectral_norm(sigma),
                   "grad_fro_norm": metrics.fro_norm(fro2),
                   "grad_stable_rank": metrics.stable_rank(sigma, fro2),
                   "grad_weight_cosine": cosine}
        for j, name in enumerate(rows):
            if name not in fresh:
                for value in columns.values():
                    # fill_ on a slice runs on the device; value[j] = nan on a 1-D CUDA tensor
                    # would copy a 0-d CPU tensor in, a blocking copy (a sync) per column
                    value.narrow(0, j, 1).fill_(_NAN)
        return columns

    # -- results and state --------------------------------------------------------------------

    def spectra(self) -> dict[str, SpectrumResult]:
        """Each tracked matrix's :class:`SpectrumResult` of its latest step; the metrics in a
        few batches (:mod:`lowrank.batched_metrics`), the same values as each tracker's own."""
        names = list(self.trackers)
        trackers = list(self.trackers.values())
        if any(tr.step == 0 for tr in trackers):  # (every tracking step sketches all of them)
            raise RuntimeError("no spectra yet: no tracked step has run (call step() first; the "
                               "estimates before it would be zeros)")
        found = {}
        for block in self._metric_plan(names, trackers):
            values = batched_metrics.block_metrics(trackers, block, self.rank, self.rank_tol)
            for j, i in enumerate(block.rows):
                found[names[i]] = {key: value[j] for key, value in values.items()}
        out = {}
        for name, tr in self.trackers.items():
            res = SpectrumResult(name=tr.name, shape=tr.shape, step=tr.step, **found[name])
            extra = dict(self.audits.get(name, {}))
            if self.track_grad:
                gt = self.grad_trackers[name]
                gres = gt.result(min(self.rank, gt.k), self.rank_tol)
                extra.update({
                    "grad_sigma": gres.sigma, "grad_fro_norm": gres.fro_norm,
                    "grad_stable_rank": gres.stable_rank,
                    "grad_energy_fraction": gres.energy_fraction,
                    # Mean squared cosine of the principal angles between the top-r left
                    # singular subspaces of G and W: 1 = aligned, 0 = orthogonal.
                    "grad_subspace_alignment": self._subspace_alignment(name),
                    **self.grad_stats.get(name, {}),
                })
            out[name] = SpectrumResult(**{**res.__dict__, "extra": extra})
        return out

    def _subspace_alignment(self, name: str) -> torch.Tensor:
        r = min(self.rank, self.trackers[name].k)  # a matrix narrower than rank: all of it
        Uw = self.trackers[name].U[0, :, :r].to(torch.float64)
        Ug = self.grad_trackers[name].U[0, :, :r].to(torch.float64)
        return (Uw.T @ Ug).square().sum() / r

    def state_dict(self) -> dict:
        """Tensors, numbers and strings only (loads with ``torch.load(weights_only=True)``)."""
        out = {"trackers": {n: t.state_dict() for n, t in self.trackers.items()},
               "audits": {n: dict(a) for n, a in self.audits.items()}}
        if self.track_grad:
            out["grad_trackers"] = {n: t.state_dict() for n, t in self.grad_trackers.items()}
            out["grad_stats"] = {n: dict(g) for n, g in self.grad_stats.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.trackers) - set(state.get("trackers", {}))
        if missing:
            raise ValueError(f"tracker state is missing matrices: {sorted(missing)}")
        if self.track_grad:
            missing = set(self.grad_trackers) - set(state.get("grad_trackers", {}))
            if missing:
                raise ValueError(f"gradient tracker state is missing matrices: {sorted(missing)}")
        for name, tr in self.trackers.items():
            tr.load_state_dict(state["trackers"][name])
        for dev, counter in self.step_counters.items():
            # The device counters follow the loaded steps (trackers of one set share a count).
            steps = [tr._step for n, tr in self.trackers.items() if self.params[n].device == dev]
            counter.fill_(steps[0])
        for name, tr in self.grad_trackers.items():
            tr.load_state_dict(state["grad_trackers"][name])
        self.audits = {n: dict(a) for n, a in state.get("audits", {}).items() if n in self.trackers}
        self.grad_stats = {n: dict(g) for n, g in state.get("grad_stats", {}).items()
                           if n in self.grad_trackers}

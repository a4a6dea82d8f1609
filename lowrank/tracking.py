"""The tracking core shared by SpectralSGD, SpectrumTracker and the one-shot estimates.

A :class:`MatrixTracker` holds the state of one tracked matrix (tensors and ints only): the bases
U (m x k), V (n x k) and the last step's estimates. Each step, a backend computes the sketches of
the current W (with or without the SGD update), and :meth:`MatrixTracker.absorb` runs the small
post-processing and swaps in the new state, all on the device with no host synchronisation.
A step whose sketches are not finite (NaN/Inf weights) keeps the previous bases and estimates and
raises the ``nonfinite`` flag instead of poisoning later steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import _checks, backends, metrics
from ._checks import check_int, check_rank
from .postprocess import PostOut, postprocess_side_torch, refill_candidates
from .sketch import SketchOut, init_bases, name_seed


@dataclass(frozen=True)
class SpectrumResult:
    """The spectrum of one matrix at one step. Tensors are on the tracker's device, float64.

    sigma: top-r singular values, descending (estimated lower bounds); step: how many steps
    tracked this matrix (not the optimizer's step: with track_every=10 and 55 optimizer steps it
    is 6; a log's "step" column is the optimizer step, 0-based, so the latest row is step 50);
    the other fields are the metrics of :mod:`lowrank.metrics` (see each for what is exact).
    subspace_drift is that of the left basis U (under the "alternate" schedule: of the basis
    updated that step, U or V in turn).
    """

    name: str
    shape: tuple
    step: int
    sigma: torch.Tensor
    fro_norm: torch.Tensor
    spectral_norm: torch.Tensor
    stable_rank: torch.Tensor
    energy_fraction: torch.Tensor
    numerical_rank: torch.Tensor
    numerical_rank_upper: torch.Tensor
    rank_censored: torch.Tensor
    effective_rank: torch.Tensor
    effective_rank_lower: torch.Tensor
    effective_rank_upper: torch.Tensor
    convergence: torch.Tensor
    subspace_drift: torch.Tensor
    near_zero_rows: torch.Tensor
    nonfinite: torch.Tensor
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain Python numbers and lists (one host sync), e.g. for printing or JSON."""
        out = {"name": self.name, "shape": list(self.shape), "step": self.step}
        for key, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                out[key] = value.tolist()
        for key, value in self.extra.items():
            out[key] = value.tolist() if isinstance(value, torch.Tensor) else value
        return out


STATE_KEYS = ("U", "V", "sigma", "sigma_y", "sigma_z", "sigma_prev", "fro2", "row_sq",
              "overlap_u", "nonfinite")


class MatrixTracker:
    """State and step logic for one tracked matrix of shape (m, n) with sketch width k."""

    def __init__(self, name: str, shape: tuple[int, int], k: int, *, seed: int = 0,
                 device=None, basis_dtype=torch.float32):
        m, n = (check_int(d, "shape entry", minimum=1) for d in shape)
        # k > min(m, n) used to build bases of the wrong shape (QR of an m x k matrix with
        # m < k returns m columns) and fail later inside the post-processing.
        k = check_rank(k, m, n)
        self.name, self.shape, self.k = name, (m, n), k
        self.seed = name_seed(seed, name)
        self._step = 0
        # The device copy of the step count, set once a CUDA graph captured this tracker's step
        # (replays advance it on the device; :attr:`step` then reads it, one host sync).
        self.step_source: torch.Tensor | None = None
        # Static trackers (those of a TrackedSet's packs) change their state tensors in place
        # only, so that their addresses stay those a captured CUDA graph reads and writes.
        self.static = False
        self.U, self.V = init_bases(m, n, k, seed=self.seed, device=device, dtype=basis_dtype)
        f64 = dict(device=device, dtype=torch.float64)
        self.sigma = torch.zeros(1, k, **f64)
        self.sigma_y = torch.zeros(1, k, **f64)
        self.sigma_z = torch.zeros(1, k, **f64)
        self.sigma_prev = torch.zeros(1, k, **f64)
        self.fro2 = torch.zeros(1, **f64)
        self.row_sq = torch.zeros(1, m, **f64)
        self.overlap_u = torch.zeros(1, k, k, **f64)
        self.nonfinite = torch.zeros(1, dtype=torch.bool, device=device)

    @property
    def step(self) -> int:
        """Steps tracked so far (after CUDA-graph replays: read from the device)."""
        if self.step_source is None:
            return self._step
        return int(self.step_source.item())

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        if self.step_source is not None:
            self.step_source.fill_(self._step)

    def absorb(self, sk: SketchOut, *, backend: str = "torch") -> None:
        """Post-process one step's sketches and advance the state (no host sync)."""
        absorb_group([self], [sk], backend=backend)

    def commit(self, sk: SketchOut, post, finite: torch.Tensor, all_finite: bool) -> None:
        """Swap in the state of one step from its sketches and post-processing (batch of one;
        static trackers are written in place: :func:`_commit_group`).

        Where the sketch was not finite, the previous state stays and ``nonfinite`` is raised.
        """
        _commit_group([self], sk, post, self.U, self.V, finite, all_finite)

    def commit_side(self, side: str, sk: SketchOut, basis: torch.Tensor, sigma: torch.Tensor,
                    overlap: torch.Tensor, finite: torch.Tensor, all_finite: bool) -> None:
        """Swap in one step of the alternating schedule: only the basis of ``side`` ("y": U from
        Y = W V, "z": V from Z = W^T U) is new. ``sigma`` is that side's estimate of the current
        W; the other side's estimate stays from the previous step (it feeds the convergence
        indicator only), and ``overlap_u`` holds the overlap of the basis updated this step.
        A :meth:`commit` whose other side carries the current state, which it keeps.
        """
        y = side == "y"
        post = PostOut(sigma, sigma if y else self.sigma_y, self.sigma_z if y else sigma,
                       basis if y else self.U, self.V if y else basis, overlap, overlap)
        self.commit(sk, post, finite, all_finite)

    def metrics(self, r: int, tol: float = 1e-3) -> dict[str, torch.Tensor]:
        """Metrics of the latest step, each of shape (1, ...). Needs 1 <= r <= k."""
        r = check_int(r, "r", minimum=1)
        if r > self.k:
            raise ValueError(f"r={r} exceeds the sketch width k={self.k} of {self.name!r}")
        step = self.step
        prev = self.sigma_prev if step > 1 else None
        # Static state changes in place: the metrics that are views of it (sigma, its first
        # entry, the flag) get their own copy, so that results kept from this step stay as they are.
        sigma = self.sigma.clone() if self.static else self.sigma
        out = metrics.summarize(sigma, self.sigma_y, self.sigma_z, prev, self.fro2,
                                self.row_sq, self.overlap_u if step > 1 else None,
                                self.shape, r, tol)
        if "subspace_drift" not in out:
            out["subspace_drift"] = torch.ones_like(self.fro2)
        out["nonfinite"] = self.nonfinite.clone() if self.static else self.nonfinite
        return out

    def result(self, r: int, tol: float = 1e-3) -> SpectrumResult:
        """A :class:`SpectrumResult` of the latest step (batch dimension dropped)."""
        values = {key: value[0] for key, value in self.metrics(r, tol).items()}
        return SpectrumResult(name=self.name, shape=self.shape, step=self.step, **values)

    def state_dict(self) -> dict:
        # Static state changes in place (and is a view of its pack): a snapshot of its own.
        out = {key: getattr(self, key).clone() if self.static else getattr(self, key)
               for key in STATE_KEYS}
        out["step"] = self.step
        return out

    def load_state_dict(self, state: dict) -> None:
        values = {}
        for key in STATE_KEYS:
            current = getattr(self, key)
            value = state[key]
            if value.shape != current.shape:
                raise ValueError(f"tracker state {key!r} of {self.name!r} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(current.shape)}")
            values[key] = value.to(device=current.device, dtype=current.dtype)
        for key, value in values.items():  # all checked first: nothing half loaded
            if self.static:
                getattr(self, key).copy_(value)
            else:
                setattr(self, key, value.clone())
        self.step = int(state["step"])


def finite_each(S: torch.Tensor) -> torch.Tensor:
    """(b,) bool: whether every entry of each matrix of the batch S (b, p, k) is finite.

    For float32 (and narrower) sketches, one float64 sum per matrix: NaN and Inf propagate
    through it (Inf - Inf is NaN), and finite float32 entries cannot overflow a float64 sum.
    A third of the cost of an elementwise isfinite and its reduction (19 vs 60 us for a
    1024 x 16 sketch, three of which a sequential CPU step checks). float64 sketches could
    overflow the sum, so they take the elementwise test.
    """
    if S.dtype == torch.float64:
        return torch.isfinite(S).flatten(1).all(-1)
    return torch.isfinite(S.sum(dim=(-2, -1), dtype=torch.float64))


def absorb_group(trackers: list[MatrixTracker], sketches: list[SketchOut] | None, *,
                 backend: str = "torch", batched: SketchOut | None = None,
                 bases: tuple[torch.Tensor, torch.Tensor] | None = None,
                 packed: dict | None = None) -> None:
    """Advance several trackers of one shape, sketch width and basis dtype with ONE batched
    post-processing call: the small linear algebra costs per call, not per matrix, so a model
    with many same-shape layers pays it once per shape. ``sketches``: one per tracker; or None
    and ``batched`` the group's sketches as one (b, ...) SketchOut (from a batched pass), with
    ``bases`` the (U, V) batch that pass used (:func:`batched_bases`; not concatenated again).
    Each matrix keeps its own refill seed on the torch and cpu paths; the CuPy kernel (backends cupy
    and triton on a GPU) hashes (seed of the group's first matrix, step, side, batch index)
    instead, so there a matrix's refill candidates depend on its place in the group. Either way
    they are random directions whose only role is to span what the sketch lost.
    ``packed``: where the trackers are exactly one pack of static state (see
    :meth:`lowrank.trackset.TrackedSet.pack`), its (b, ...) tensors, committed in one operation
    per field; ``bases`` are then the pack's own U and V.
    """
    if batched is None and (sketches[0].Y is None or sketches[0].Z is None):
        _absorb_group_one_side(trackers, sketches, _cat, backend=backend)
        return
    absorb_groups([(trackers, sketches, batched, bases, packed, backend)])


def absorb_groups(specs, *, step=None) -> None:
    """:func:`absorb_group` of several groups, each ``(trackers, sketches, batched, bases,
    packed, backend)`` as its arguments (both-sided sketches). Groups of one backend, sketch
    width, basis dtype, device and step share one post-processing call
    (:func:`lowrank.backends.postprocess_many`): on the CuPy kernel one launch sequence for
    every shape, which is what a model's step costs when its kernels are latency-bound.
    ``step``: the step that seeds every group's refill directions (a device scalar in a CUDA
    graph: :mod:`lowrank.post_graphs`), instead of each group's own count."""
    prepared, calls = [], {}
    for trackers, sketches, batched, bases, packed, backend in specs:
        if batched is not None:
            sk = batched
        else:
            sk = SketchOut(*(_cat([getattr(s, f) for s in sketches])
                             for f in ("Y", "Z", "fro2", "row_sq")))
        U, V = bases if bases is not None else batched_bases(trackers)
        finite = torch.isfinite(sk.fro2) & finite_each(sk.Y) & finite_each(sk.Z)  # (b,)
        # On the CPU, the usual all-finite case skips the masking (~20 small ops a step).
        all_finite = _checks.host_reads_are_free(finite) and bool(finite.all())
        Y, Z = sk.Y, sk.Z
        if not all_finite:
            fb = finite.view(-1, 1, 1)
            Y, Z = torch.where(fb, Y, torch.zeros_like(Y)), torch.where(fb, Z, torch.zeros_like(Z))
        (m, n), k, dev = trackers[0].shape, trackers[0].k, Y.device
        refill = (lambda trs=trackers, m=m, k=k, dev=dev: _cat(
                      [refill_candidates((1, m, k), t.seed, 2 * t.step, dev) for t in trs]),
                  lambda trs=trackers, n=n, k=k, dev=dev: _cat(
                      [refill_candidates((1, n, k), t.seed, 2 * t.step + 1, dev) for t in trs]))
        step_g = _seed_step(trackers[0]) if step is None else step
        # the device counter after a capture (one tensor for the set), else the Python count
        key = (backend, k, U.dtype, dev,
               id(step_g) if isinstance(step_g, torch.Tensor) else step_g)
        calls.setdefault(key, []).append(len(prepared))
        prepared.append(_Prepared(trackers, sk, packed, U, V, finite, all_finite,
                                  (Y, Z, U, V, trackers[0].seed, refill), step_g))
    posts = [None] * len(prepared)
    for (backend, *_), idx in calls.items():
        outs = backends.postprocess_many([prepared[i].post_args for i in idx],
                                         step=prepared[idx[0]].step, backend=backend)
        for i, post in zip(idx, outs):
            posts[i] = post
    for g, post in zip(prepared, posts):
        _commit_group(g.trackers, g.sk, post, g.U, g.V, g.finite, g.all_finite, g.packed)


class _Prepared(NamedTuple):
    """One group of :func:`absorb_groups` between its checks and its commit."""
    trackers: list
    sk: SketchOut
    packed: dict | None
    U: torch.Tensor  # the old bases, batched
    V: torch.Tensor
    finite: torch.Tensor
    all_finite: bool
    post_args: tuple  # (Y, Z, U, V, seed, refill) of backends.postprocess_many
    step: object  # the step that seeds the refill (an int, or the device counter)


def _seed_step(tracker: MatrixTracker):
    """The step that seeds the refill candidates: after a CUDA-graph capture the device counter
    (a replay reads its current value), else the Python count (both agree)."""
    return tracker._step if tracker.step_source is None else tracker.step_source


def _commit_group(trackers: list[MatrixTracker], sk: SketchOut, post: PostOut, U: torch.Tensor,
                  V: torch.Tensor, finite: torch.Tensor, all_finite: bool,
                  packed: dict | None = None) -> None:
    """:meth:`MatrixTracker.commit` of a whole group (``U``, ``V``: the batched old bases).
    Where some sketch may not be finite (always on a GPU, which does not read the flags on the
    host), each field is selected once for the group, not once per matrix: a tracker then costs
    a few views instead of nine masked selects (kernel launches). Static trackers are written
    in place (:func:`_commit_in_place`)."""
    b = len(trackers)
    new = {"U": post.U, "V": post.V, "sigma": post.sigma, "sigma_y": post.sigma_y,
           "sigma_z": post.sigma_z, "overlap_u": post.overlap_u, "fro2": sk.fro2,
           "row_sq": sk.row_sq}
    if trackers[0].static:
        _commit_in_place(trackers, new, finite, all_finite, packed)
        return
    if not all_finite:
        sigma_old = _cat([t.sigma for t in trackers])
        old = {"U": U, "V": V, "sigma": sigma_old}
        for key in new:
            before = old[key] if key in old else _cat([getattr(t, key) for t in trackers])
            new[key] = torch.where(_field_mask(key, finite), new[key], before)
        new["sigma_prev"] = torch.where(_field_mask("sigma_prev", finite), sigma_old,
                                        _cat([t.sigma_prev for t in trackers]))
    nonfinite = ~finite
    for i, t in enumerate(trackers):
        part = slice(i, i + 1)
        if all_finite:
            t.sigma_prev = t.sigma
        for key, value in new.items():
            setattr(t, key, value if b == 1 else value[part])
        t.nonfinite = nonfinite if b == 1 else nonfinite[part]
        t._step += 1


# Which entries of a field a matrix's finite flag selects: the whole (k x k or p x k) block.
_BLOCK_FIELDS = ("U", "V", "overlap_u")


def _field_mask(key: str, finite: torch.Tensor) -> torch.Tensor:
    """The finite flags (b,) shaped to select each matrix's entries of state field ``key``:
    a block (b, 1, 1), one flag per matrix for ``fro2`` (b,), else a row (b, 1)."""
    if key in _BLOCK_FIELDS:
        return finite.view(-1, 1, 1)
    return finite if key == "fro2" else finite.view(-1, 1)


def _commit_in_place(trackers: list[MatrixTracker], new: dict, finite: torch.Tensor,
                     all_finite: bool, packed: dict | None) -> None:
    """Commit of static trackers: every state tensor is overwritten in place, where the sketch
    was finite (a masked select into itself, one launch per field on a GPU), so that its address
    never changes: a CUDA graph that captured the step reads and writes the same memory at each
    replay. ``packed``: the trackers' pack, written with one operation per field; else one per
    tracker and field. ``sigma_prev`` takes the old ``sigma`` before it is overwritten."""
    b = len(trackers)
    fields = [("sigma_prev", None), *new.items()]  # None: the current sigma
    if packed is not None:
        targets = [packed]
    else:
        targets = [{key: getattr(t, key) for key in STATE_KEYS} for t in trackers]
    for i, dest in enumerate(targets):
        part = slice(None) if packed is not None or b == 1 else slice(i, i + 1)
        ok = finite[part]
        for key, value in fields:
            value = dest["sigma"] if value is None else value[part]
            out = dest[key]
            if all_finite:
                out.copy_(value)
            else:
                mask = _field_mask(key, ok)
                if value.dtype != out.dtype:
                    value = value.to(out.dtype)
                torch.where(mask, value, out, out=out)
        torch.logical_not(ok, out=dest["nonfinite"])
    for t in trackers:
        t._step += 1


def _absorb_group_one_side(trackers: list[MatrixTracker], sketches: list[SketchOut], cat, *,
                           backend: str = "torch") -> None:
    """:func:`absorb_group` for one-sided sketches (alternating schedule)."""
    side = "y" if sketches[0].Z is None else "z"
    if any((s.Z is None) != (side == "y") or (s.Y is None) != (side == "z") for s in sketches):
        raise ValueError("a group of trackers must sketch the same side each step")
    S = [s.Y if side == "y" else s.Z for s in sketches]
    basis, sigma, overlap, _, finite = _sides_batched(
        S, [t.U if side == "y" else t.V for t in trackers], [s.fro2 for s in sketches], trackers,
        [backend] * len(trackers), offset=0 if side == "y" else 1)
    flags = cat(finite)
    all_finite = _checks.host_reads_are_free(flags) and bool(flags.all())
    for i, (t, s) in enumerate(zip(trackers, sketches)):
        t.commit_side(side, s, basis[i], sigma[i], overlap[i], finite[i], all_finite)


def absorb_sequential(trackers: list[MatrixTracker], sketches: list[SketchOut],
                      weights, backends_used: list[str] | None = None) -> None:
    """The sequential schedule (torch and cpu backends) for any set of tracked matrices, whatever
    their shapes: from Y = W V (the sketches) the next U, then Z = W^T U_next and the next V.
    Both estimates are of the current W, so each state is committed as for "both"; the basis
    pair has moved a full power step instead of two half steps.

    Z comes without a second read of W where the sketch carries P = W^T Y (sides="power") and the
    Y side took the fast path, whose factor T gives U_next = Y T, so W^T U_next = P T (in
    float64; the float32 rounding of U_next is the only difference from the product). Else (a
    refill or a re-orthonormalised basis, or no P) Z = W^T U_next from ``weights`` (each matrix
    as (m, n), after this step's update; a sequence read by index, only for those matrices).

    The small post-processing of each side is batched over the matrices that share that side's
    dimension: the Y sides by (m, k), the Z sides by (n, k). A convnet whose layers share output
    widths but not input sizes pays one call per distinct dimension, not one per shape.
    ``backends_used``: each matrix's backend; those on "cpu" are post-processed by the C kernel
    (kernels/cpu/postprocess.c) where it applies: both sides in one call per shape where the
    pass gave P (:func:`_sequential_on_kernel`), else side by side; the others by the torch
    reference.
    """
    if any(s.Y is None for s in sketches):
        raise ValueError("the sequential schedule starts from Y = W V sketches")
    backends_used = backends_used or ["torch"] * len(trackers)
    rest = _sequential_on_kernel(trackers, sketches, backends_used)
    if len(rest) < len(trackers):
        trackers, sketches = [trackers[i] for i in rest], [sketches[i] for i in rest]
        weights, backends_used = [weights[i] for i in rest], [backends_used[i] for i in rest]
        if not trackers:
            return
    count = len(trackers)
    Uq, sigma_y, overlap_u, Z, finite = _sides_batched(
        [s.Y for s in sketches], [t.U for t in trackers], [s.fro2 for s in sketches], trackers,
        backends_used, offset=0, products=[s.P for s in sketches])
    Z = [z if z is not None else W.to(s.Y.dtype).transpose(-2, -1).unsqueeze(0) @ u.to(s.Y.dtype)
         for W, s, u, z in zip(weights, sketches, Uq, Z)]
    # Z can overflow where Y did not (a column of huge weights): the step is then non-finite
    # (the Z side checks its sketches; a matrix already flagged stays flagged).
    Vq, sigma_z, overlap_v, _, finite_z = _sides_batched(
        Z, [t.V for t in trackers], [None] * count, trackers, backends_used, offset=1)
    finite = [f & g for f, g in zip(finite, finite_z)]
    flags = torch.cat(finite)
    all_finite = _checks.host_reads_are_free(flags) and bool(flags.all())
    for i in range(count):
        post = PostOut(torch.maximum(sigma_y[i], sigma_z[i]), sigma_y[i], sigma_z[i], Uq[i], Vq[i],
                       overlap_u[i], overlap_v[i])
        trackers[i].commit(sketches[i], post, finite[i], all_finite)


def _sequential_on_kernel(trackers: list[MatrixTracker], sketches: list[SketchOut],
                          backends_used: list[str]) -> list[int]:
    """Both sides of the sequential step in one C call (kernels/cpu/postprocess.c) for every
    matrix on the "cpu" backend whose pass gave P = W^T Y, whatever its shape: a step of this
    schedule on the CPU otherwise pays ~40 small torch operations and two calls per matrix,
    which cost more after a pass over a large W has evicted their code and data (0.7 ms of a
    2048^2 step against 0.35 ms in a tight loop), and one call per shape would leave a thread
    idle while a lone small matrix runs. Commits those trackers; returns the indices of the
    others (other backends, no P, wider sketches, or a matrix that is not finite or needs a
    refill or a Cholesky-QR round), which take the general path.
    """
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i, (t, s) in enumerate(zip(trackers, sketches)):
        if backends_used[i] == "cpu" and s.P is not None:
            groups.setdefault((t.shape, t.k, s.Y.dtype, t.U.dtype), []).append(i)
        else:
            rest.append(i)
    if not groups:
        return rest
    kernel = backends.kernel_module("cpu", "postprocess")
    taken = []  # the groups the kernel takes, all in one call
    for idx in groups.values():
        first, tr = sketches[idx[0]], trackers[idx[0]]
        if (first.Y.dtype == first.P.dtype == torch.float32 and kernel.supported(first.Y, tr.U)
                and kernel.supported(first.P, tr.V)):
            taken.append(idx)
        else:
            rest.extend(idx)
    if not taken:
        return sorted(rest)
    done = kernel.postprocess_sequential_cpu_many(
        [([sketches[i].Y for i in idx], [trackers[i].U for i in idx],
          [sketches[i].P for i in idx], [trackers[i].V for i in idx],
          [sketches[i].fro2 for i in idx]) for idx in taken])
    true = torch.ones(1, dtype=torch.bool)
    for idx, (post, ok) in zip(taken, done):
        for j, i in enumerate(idx):
            if ok[j]:
                trackers[i].commit(sketches[i], _batch_item(post, j, len(idx)), true, True)
            else:  # not finite, or needs a refill or a Cholesky-QR round
                rest.append(i)
    return sorted(rest)


def _batch_item(post: PostOut, i: int, count: int) -> PostOut:
    """Matrix i of a batched post-processing of ``count`` matrices, as a batch of one."""
    return post if count == 1 else PostOut(*(x[i:i + 1] for x in post))


def batched_bases(trackers: list[MatrixTracker]) -> tuple[torch.Tensor, torch.Tensor]:
    """The bases of same-shape trackers as one batch each: U (b, m, k), V (b, n, k)."""
    return _cat([t.U for t in trackers]), _cat([t.V for t in trackers])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along the batch, without the copy it makes of a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sides_batched(S: list[torch.Tensor], B_old: list[torch.Tensor], fro2: list,
                   trackers: list[MatrixTracker], backends_used: list[str], *, offset: int,
                   products: list | None = None):
    """One side of the sequential or alternating schedule: post-process the sketches S[i]
    (1, p_i, k_i) against the bases B_old[i], one batched call per (p, k, dtype, device,
    backend); refill seeds as in :func:`lowrank.postprocess.postprocess_torch` (2 step + offset).

    A sketch is finite when its entries and its ``fro2[i]`` (None: not checked) are; non-finite
    sketches are zeroed first (their state is kept by the commit). ``products[i]`` (None or a
    (1, n_i, k_i) float32 P) asks for P T, T the k x k factor with B_next = S T, where the fast
    path gives one (matrices are grouped by P's rows as well). Groups on the "cpu" backend run
    the C kernel first and the torch reference only when some matrix of the group needs it (not
    finite, refill, Cholesky-QR round).
    Returns five lists, in input order: bases, sigmas, overlaps, P T (float64, or None) and the
    (1,) bool finite flags.
    """
    products = products or [None] * len(S)
    groups: dict[tuple, list[int]] = {}
    for i, (s, b) in enumerate(zip(S, B_old)):
        key = (s.shape[-2], s.shape[-1], b.dtype, s.device, backends_used[i] == "cpu",
               None if products[i] is None else products[i].shape[-2])
        groups.setdefault(key, []).append(i)
    out = [[None] * len(S) for _ in range(5)]  # basis, sigma, overlap, P T, finite
    for (p, k, _, dev, on_kernel, p_rows), idx in groups.items():
        with_p = p_rows is not None
        sk, old = _cat([S[i] for i in idx]), _cat([B_old[i] for i in idx])
        prods = _cat([products[i] for i in idx]) if with_p else None
        if on_kernel and _kernel_side(sk, old, prods, [fro2[i] for i in idx], idx, out):
            continue
        finite = [finite_each(S[i]) if fro2[i] is None
                  else torch.isfinite(fro2[i]) & finite_each(S[i]) for i in idx]
        flags = torch.cat(finite)
        if not (_checks.host_reads_are_free(flags) and bool(flags.all())):
            sk = torch.where(flags.view(-1, 1, 1), sk, torch.zeros_like(sk))
        seeds = [(trackers[i].seed, 2 * trackers[i].step + offset) for i in idx]
        basis, sigma, overlap, factor = postprocess_side_torch(
            sk, old,
            lambda seeds=seeds, p=p, k=k, dev=dev: torch.cat(
                [refill_candidates((1, p, k), seed, step, dev) for seed, step in seeds]),
            with_factor=True)
        applied = prods.to(torch.float64) @ factor if with_p and factor is not None else None
        for j, i in enumerate(idx):
            part = slice(j, j + 1)
            out[0][i], out[1][i], out[2][i] = basis[part], sigma[part], overlap[part]
            out[3][i] = None if applied is None else applied[part]
            out[4][i] = finite[j]
    return tuple(out)


def _kernel_side(S: torch.Tensor, B_old: torch.Tensor, P, fro2: list, idx: list[int],
                 out: list) -> bool:
    """The C kernel's post-processing of one batched side (see :func:`_sides_batched`); fills
    ``out`` at ``idx`` and returns True, or False (nothing written) when the kernel does not
    take these operands or some matrix needs the torch reference."""
    kernel = backends.kernel_module("cpu", "postprocess")
    if not kernel.supported(S, B_old):  # (includes: its status is read on the host)
        return False
    checks = [f for f in fro2 if f is not None]
    if checks and not math.isfinite(float(_cat(checks).sum())):  # NaN and Inf propagate
        return False
    done = kernel.postprocess_side_cpu(S, B_old, P=P)
    if done is None:
        return False
    basis, sigma, overlap, _, applied = done
    true = torch.ones(1, dtype=torch.bool)
    for j, i in enumerate(idx):
        part = slice(j, j + 1)
        out[0][i], out[1][i], out[2][i] = basis[part], sigma[part], overlap[part]
        out[3][i] = None if applied is None else applied[part]
        out[4][i] = true
    return True

"""Replayed post-processing: the small linear algebra of an eager GPU step as one graph launch.

After the fused pass, a tracked step on a GPU post-processes every matrix's sketches and commits
its new state: for a model, a few hundred small launches (finiteness checks, the CuPy kernel's
sequence, one masked write per state field and group), each costing host time while the device
waits. On an H100 an eager ResNet-18 step with the CuPy backend spent 6 of its 11 ms of host
time there, while the whole step captured by the user in a CUDA graph took 1.6 ms.

That work reads only device memory: the sketches, the trackers' static state (written in place),
and the step that seeds the refill directions. So :class:`PostGraphs` captures it once per
pattern of groups (which matrices, sketch shapes, backends) in a CUDA graph, and on later steps
of the same pattern copies the new sketches into the graph's inputs, writes the step into a
device scalar and replays it: a handful of launches instead of hundreds, the same kernels on the
same values, so the same bits as the eager call.

A pattern is captured at its second occurrence (the first, eager, compiles and loads the
kernels); at most :data:`MAX_GRAPHS` patterns are kept (a training loop has one or two). Steps
it does not cover run eagerly as before: a CPU device, a post-processing that synchronises (the
torch reference), trackers that are not static or whose step is counted on the device (after a
user's own capture, which records the eager path), a step inside a user's capture, torch's sync
debug mode (the capture itself synchronises once). ``LOWRANK_POST_GRAPHS=0`` turns it off.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

from . import backends
from .tracking import absorb_groups

MAX_GRAPHS = 4  # patterns kept; a step of another pattern runs eagerly
WARMUP = 1  # eager post-processings of a pattern before it is captured
_SKETCH_FIELDS = ("Y", "Z", "fro2", "row_sq")


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    # static copies of the sketches (and of bases that are not a pack's own), by dtype:
    # (their indices among the inputs, the copies), one foreach copy each
    inputs: list
    step: torch.Tensor  # int64 scalar: the step that seeds the refill directions

    def load(self, inputs: list, step: int) -> None:
        """Copy this step's sketches and step into the graph's static inputs."""
        for index, static in self.inputs:
            torch._foreach_copy_(static, [inputs[i] for i in index])
        self.step.fill_(step)


def _spec_inputs(spec) -> tuple[list, bool] | None:
    """The tensors of one :func:`absorb_groups` spec that change from step to step (the
    sketches; the bases too unless they are the pack's own, static, tensors), and whether the
    bases are the pack's own. None where a sketch field is missing (one-sided sketches)."""
    _, sketches, batched, bases, packed, _ = spec
    parts = [batched] if batched is not None else sketches
    tensors = [getattr(sk, f) for sk in parts for f in _SKETCH_FIELDS]
    if any(t is None for t in tensors):
        return None
    own = packed is not None and bases[0] is packed["U"] and bases[1] is packed["V"]
    return (tensors if own else [*tensors, *bases]), own


def _with_inputs(spec, own: bool, inputs) -> tuple:
    """``spec`` reading its changing tensors from the iterator ``inputs`` (in
    :func:`_spec_inputs`'s order)."""
    trackers, sketches, batched, bases, packed, backend = spec

    def take(sk):
        return sk._replace(**{f: next(inputs) for f in _SKETCH_FIELDS})

    if batched is not None:
        batched = take(batched)
    else:
        sketches = [take(sk) for sk in sketches]
    if not own:
        bases = (next(inputs), next(inputs))
    return trackers, sketches, batched, bases, packed, backend


def _pattern(specs):
    """(key, inputs, trackers, step) of a replayable post-processing, else None."""
    key, inputs, trackers, device = [], [], [], None
    for spec in specs:
        trs, backend = spec[0], spec[5]
        if not all(t.static and t.step_source is None for t in trs):
            return None
        found = _spec_inputs(spec)
        if found is None:
            return None
        tensors, own = found
        dev = tensors[0].device
        if device is None:
            device = dev
        if dev.type != "cuda" or dev != device or any(t.device != dev for t in tensors):
            return None
        if not backends.capture_safe(backend, dev, trs[0].k, batch=len(trs)):
            return None
        key.append((tuple(t.name for t in trs), spec[2] is not None, own, backend,
                    id(spec[4]), tuple((tuple(t.shape), t.dtype) for t in tensors)))
        inputs += tensors
        trackers += trs
    steps = {t._step for t in trackers}
    if device is None or len(steps) != 1:
        return None
    return tuple(key), inputs, trackers, steps.pop()


class PostGraphs:
    """The CUDA graphs of a :class:`~lowrank.trackset.TrackedSet`'s post-processing, one per
    pattern of groups; see the module docstring. ``captures`` and ``replays`` count what it
    did (the tests read them)."""

    def __init__(self):
        self.enabled = os.environ.get("LOWRANK_POST_GRAPHS", "1") != "0"
        self._graphs: dict[tuple, _Graph | None] = {}  # None: the capture failed, stay eager
        self._seen: dict[tuple, int] = {}
        self.captures = 0
        self.replays = 0

    # A copy of a TrackedSet (deepcopy, pickle) has state at other addresses: no graphs.
    def __getstate__(self):
        return {"enabled": self.enabled}

    def __setstate__(self, state):
        self.__init__()
        self.enabled = state["enabled"]

    def run(self, specs) -> bool:
        """:func:`~lowrank.tracking.absorb_groups` of ``specs`` by a graph replay (capturing
        the graph first where its pattern comes again); False where it did nothing and the
        caller runs the groups eagerly."""
        if not self.enabled:
            return False
        found = _pattern(specs)  # CUDA tensors only: then a user's capture can be asked about
        if found is None or torch.cuda.is_current_stream_capturing():
            return False
        key, inputs, trackers, step = found
        if key in self._graphs:
            entry = self._graphs[key]
            if entry is not None:
                for t in trackers:  # what the eager commit counts on the host
                    t._step += 1
        else:
            seen = self._seen.get(key, 0)
            if (seen < WARMUP or len(self._graphs) >= MAX_GRAPHS
                    or torch.cuda.get_sync_debug_mode() != 0):
                if len(self._seen) > 64:  # patterns that never came twice
                    self._seen.clear()
                self._seen[key] = seen + 1
                return False
            entry = self._graphs[key] = self._capture(specs, inputs, trackers, step)
        if entry is None:  # its capture failed: eager
            return False
        entry.load(inputs, step)
        entry.graph.replay()
        self.replays += 1
        return True

    def _capture(self, specs, inputs, trackers, step) -> _Graph | None:
        """Record :func:`absorb_groups` of ``specs`` reading static copies of ``inputs``.
        The commit's host count (``_step += 1``) runs once, here, for this step; the graph's
        first replay then does this step's work."""
        static = [t.clone() for t in inputs]
        step_t = torch.full((), step, dtype=torch.int64, device=inputs[0].device)
        it = iter(static)
        static_specs = [_with_inputs(spec, _spec_inputs(spec)[1], it) for spec in specs]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a data loader's thread may touch CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                absorb_groups(static_specs, step=step_t)
        except RuntimeError as exc:
            for t in trackers:
                t._step = step  # nothing was committed
            warnings.warn(f"lowrank: the post-processing could not be captured in a CUDA graph "
                          f"({exc}); this pattern of groups stays eager", RuntimeWarning,
                          stacklevel=4)
            return None
        self.captures += 1
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(static):
            by_dtype.setdefault(t.dtype, []).append(i)
        return _Graph(graph, [(index, [static[i] for i in index]) for index in by_dtype.values()],
                      step_t)

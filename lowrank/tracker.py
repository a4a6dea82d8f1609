"""SpectrumTracker: spectral tracking beside any optimizer (AdamW, Adam, Muon, ...)."""

from __future__ import annotations

import torch

from . import trackset
from .trackset import TrackedSet, check_positive_int


class SpectrumTracker:
    """Track the spectrum of every weight matrix of a model, whatever updates it.

    Call :meth:`step` after ``optimizer.step()``, or :meth:`attach` the tracker to the optimizer
    (through its step post-hook). Each ``every``-th call sketches each tracked matrix (the
    sketch-only pass: one read of W, two under the CPU's default sequential schedule) and
    advances its tracker. Results and metrics are those of
    :class:`lowrank.SpectralSGD`; the arguments of the same name mean the same.

    ``model_or_named_params``: an ``nn.Module`` (its ``named_parameters()``), or an iterable
    of (name, tensor) pairs.
    """

    def __init__(self, model_or_named_params, rank: int = 8, every: int = 1, *,
                 sketch_rank=None, audit_every: int = 0, backend: str = "auto", seed: int = 0,
                 include=None, exclude=None, rank_tol: float = 1e-3, log=None,
                 precision: str = "fp32", deterministic: bool = False, schedule: str = "auto"):
        if isinstance(model_or_named_params, torch.nn.Module):
            named = list(model_or_named_params.named_parameters())
        else:
            named = list(model_or_named_params)
            if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                       and isinstance(x[1], torch.Tensor) for x in named):
                raise TypeError("SpectrumTracker takes an nn.Module or (name, tensor) pairs, "
                                "e.g. model.named_parameters()")
        if not named:
            raise ValueError("SpectrumTracker got no parameters")
        self.every = check_positive_int(every, "every")
        self._calls, self._calls_offset = 0, 0
        self.tracked = TrackedSet(named, rank=rank, sketch_rank=sketch_rank, seed=seed,
                                  backend=backend, rank_tol=rank_tol, audit_every=audit_every,
                                  track_grad=False, include=include, exclude=exclude, log=log,
                                  precision=precision, deterministic=deterministic,
                                  schedule=schedule)
        if not self.tracked.trackers:
            raise ValueError("no parameter with 2 or more dimensions, at least one element and a "
                             "real floating-point dtype to track")
        if log is not None:
            # Nested, so that the user's own config keys are never replaced.
            log.update_config({"tracker": {
                "name": "SpectrumTracker", "rank": rank, "every": every,
                "sketch_rank": sketch_rank, "audit_every": audit_every, "seed": seed,
                "backend": backend, "include": include, "exclude": exclude, "rank_tol": rank_tol,
                "precision": precision, "deterministic": deterministic, "schedule": schedule},
                "tracked": {n: list(t.shape) for n, t in self.tracked.trackers.items()}})

    @property
    def calls(self) -> int:
        """Calls of :meth:`step` so far (after a CUDA graph captured one: counted on the device,
        one host sync to read)."""
        return self.tracked.count(self._calls, self._calls_offset)

    @calls.setter
    def calls(self, value: int) -> None:
        self._calls = int(value)
        self._calls_offset = self._calls - self.tracked.count(self._calls, 0)

    @torch.no_grad()
    def step(self) -> None:
        """Sketch every tracked matrix (on every ``every``-th call).

        Can be captured in a CUDA graph (with the optimizer step, after a few eager steps) with
        every=1 and a sync-free backend ("cupy"); a replay then tracks a step as a call does."""
        self.tracked.check_log_open()
        if trackset.capturing():
            if self.every != 1:
                raise RuntimeError(f"SpectrumTracker cannot be captured in a CUDA graph: every="
                                   f"{self.every} (a replay cannot choose whether to track; "
                                   "capture with every=1)")
            self._calls_offset = self.tracked.capture_count("SpectrumTracker", self._calls,
                                                            self._calls_offset)
        if self.every == 1 or self._calls % self.every == 0:
            names = list(self.tracked.trackers)
            self.tracked.sketch_all(names)
            self.tracked.finish_step()
            self.tracked.after_step(self._calls, names)
        self._calls += 1

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`step` after every ``optimizer.step()``; returns the hook handle
        (``handle.remove()`` detaches)."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def spectra(self):
        """Mapping parameter name -> :class:`lowrank.SpectrumResult` of its latest tracked step."""
        return self.tracked.spectra()

    def state_dict(self) -> dict:
        return {"calls": self.calls, **self.tracked.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracked.load_state_dict(state)  # first: the call count may be read from it
        self.calls = int(state["calls"])

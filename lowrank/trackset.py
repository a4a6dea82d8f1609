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

from . import backends
from .sketch import as_batched, matrix_shape, sketch_torch
from .tracking import MatrixTracker, SpectrumResult


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


def select_tracked(named_params, include=None, exclude=None) -> list[tuple[str, torch.Tensor]]:
    """The (name, param) pairs to track: >= 2-D, non-empty, matching include and not exclude.

    Patterns are exact names or fnmatch globs ("layers.*.weight"). A pattern that matches no
    parameter at all raises ValueError (a typo must not silently track nothing).
    """
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    names = [name for name, _ in named_params]
    for what, pats in (("include", include), ("exclude", exclude)):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(f"{what} pattern {pat!r} matches no parameter; known: "
                                 f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    chosen = []
    for name, p in named_params:
        if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        if include is not None and p.dim() < 2:
            raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}: only parameters "
                             "with 2 or more dimensions can be tracked")
        if p.dim() >= 2 and p.numel() > 0:
            chosen.append((name, p))
    return chosen


class TrackedSet:
    """Trackers for a fixed set of named matrices; see the module docstring."""

    def __init__(self, named_params, *, rank: int, sketch_rank: int | None, seed: int,
                 backend: str, rank_tol: float, audit_every: int, track_grad: bool,
                 include=None, exclude=None, log=None):
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
        self.rank_tol = float(rank_tol)
        self.track_grad = bool(track_grad)
        self.log = log
        self.params: dict[str, torch.Tensor] = {}
        self.trackers: dict[str, MatrixTracker] = {}
        self.grad_trackers: dict[str, MatrixTracker] = {}
        self.backend: dict[str, str] = {}
        self.audits: dict[str, dict] = {}
        self.grad_stats: dict[str, dict] = {}
        for name, p in select_tracked(named_params, include, exclude):
            m, n = matrix_shape(p.shape)
            if rank > min(m, n):
                raise ValueError(
                    f"rank={rank} exceeds min(m, n) = {min(m, n)} of parameter {name!r} "
                    f"(tracked as {m} x {n}); lower rank or exclude it with exclude=[{name!r}]")
            k = min(sketch_rank if sketch_rank is not None else 2 * rank, m, n)
            basis_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            self.params[name] = p
            self.backend[name] = backends.resolve_backend(backend, p.device)
            self.trackers[name] = MatrixTracker(name, (m, n), k, seed=seed, device=p.device,
                                                basis_dtype=basis_dtype)
            if self.track_grad:
                self.grad_trackers[name] = MatrixTracker(name + "#grad", (m, n), k, seed=seed,
                                                         device=p.device, basis_dtype=basis_dtype)
        self.by_param = {id(p): name for name, p in self.params.items()}

    # -- per-step work ------------------------------------------------------------------------

    def before_update(self, name: str, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """Gradient tracking (needs W before the update): sketch G, ||G||_F, <G, W>."""
        if not self.track_grad:
            return
        gt = self.grad_trackers[name]
        sk = sketch_torch(as_batched(grad), gt.U, gt.V)
        gt.absorb(sk)
        inner = (as_batched(grad).to(torch.float64) * as_batched(weight).to(torch.float64)).sum()
        wn = as_batched(weight).to(torch.float64).square().sum().sqrt()
        gn = sk.fro2[0].sqrt()
        denom = (gn * wn).clamp_min(1e-300)
        self.grad_stats[name] = {"grad_weight_inner": inner, "grad_weight_cosine": inner / denom}

    def absorb(self, name: str, sk) -> None:
        """Post-process the sketches of ``name``'s current weights and run a due audit."""
        tr = self.trackers[name]
        tr.absorb(sk, backend=self.backend[name])
        if self.audit_every and tr.step % self.audit_every == 0:
            self.audits[name] = self._audit(name)

    def sketch_only(self, name: str) -> None:
        """The sketch-only pass (no update) of one tracked parameter."""
        p, tr = self.params[name], self.trackers[name]
        sk = backends.sketch(as_batched(p.detach()), tr.U, tr.V, backend=self.backend[name])
        self.absorb(name, sk)

    def _audit(self, name: str) -> dict:
        """Exact float64 svdvals of the current weights against the estimates (one host sync)."""
        tr = self.trackers[name]
        W = as_batched(self.params[name].detach())[0].to(torch.float64)
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
        """Hand the metrics of the matrices tracked this step to the log (no host sync)."""
        if self.log is None:
            return
        rows = {}
        for name in names:
            tr = self.trackers[name]
            metrics = tr.metrics(self.rank, self.rank_tol)
            audit = self.audits.get(name)
            if audit is not None and audit["audit_step"] == tr.step:
                metrics["audit_max_rel_err"] = audit["audit_max_rel_err"]
            rows[name] = metrics
        self.log.record(step, rows, {n: self.trackers[n].shape for n in names})

    # -- results and state --------------------------------------------------------------------

    def spectra(self) -> dict[str, SpectrumResult]:
        out = {}
        for name, tr in self.trackers.items():
            res = tr.result(self.rank, self.rank_tol)
            extra = dict(self.audits.get(name, {}))
            if self.track_grad:
                gres = self.grad_trackers[name].result(self.rank, self.rank_tol)
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
        r = self.rank
        Uw = self.trackers[name].U[0, :, :r].to(torch.float64)
        Ug = self.grad_trackers[name].U[0, :, :r].to(torch.float64)
        return (Uw.T @ Ug).square().sum() / r

    def state_dict(self) -> dict:
        out = {"trackers": {n: t.state_dict() for n, t in self.trackers.items()}}
        if self.track_grad:
            out["grad_trackers"] = {n: t.state_dict() for n, t in self.grad_trackers.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.trackers) - set(state.get("trackers", {}))
        if missing:
            raise ValueError(f"tracker state is missing matrices: {sorted(missing)}")
        for name, tr in self.trackers.items():
            tr.load_state_dict(state["trackers"][name])
        for name, tr in self.grad_trackers.items():
            tr.load_state_dict(state["grad_trackers"][name])

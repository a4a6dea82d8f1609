"""Providers: one optimizer step, with or without a spectrum measurement, behind one interface.

Each provider owns its own copy of the weights and steps them with gradients the harness sets
on ``.grad`` beforehand; the harness times :meth:`Provider.step` alone. Names:

    sgd                    torch.optim.SGD, default implementation (foreach on CUDA, for-loop on CPU)
    sgd_foreach            torch.optim.SGD(foreach=True)                       (CPU only: on CUDA
                           it is the default)
    sgd_fused              torch.optim.SGD(fused=True)
    sgd+svdvals            sgd, then torch.linalg.svdvals of every tracked matrix
    sgd+svd_lowrank        sgd, then torch.svd_lowrank(q=k, niter=2) of every tracked matrix
    sgd+subspace           sgd, then one step of a warm subspace iteration (bench/subspace_iter.py)
    spectral_sgd[B]        lowrank.SpectralSGD with backend B (torch; triton, cupy on CUDA) and
                           its default schedule; B-both / B-alternate: schedule="both" / "alternate"
                           (B-both on the CPU: the schedule of the GPU kernels)
    adamw                  torch.optim.AdamW, default implementation
    adamw+tracker[B]       adamw, then lowrank.SpectrumTracker.step() (sketch-only pass), backend B
    sgd_graph, adamw_graph, spectral_sgd_graph[B], adamw+tracker_graph[B]
                           (CUDA) the step of sgd, adamw (capturable=True), spectral_sgd[B] or
                           adamw+tracker[B] captured once in a CUDA graph after eager warm-up
                           steps, then replayed: what a training loop captured whole (torch.compile
                           "reduce-overhead", torch.cuda.graph) pays. Replays run on the gradients
                           of the capture (``frozen_grads``): the work of a step does not depend
                           on their values, and new ones would cost a copy into the static ones.

Every tracking provider reports the top ``rank`` singular values of each tracked matrix through
:meth:`Provider.estimates`; ``family`` names the untracked optimizer it adds to (its overhead
base), ``stateless`` marks providers whose estimate is a function of the current weights alone.
"""

from __future__ import annotations

import torch

import lowrank

from .subspace_iter import WarmSubspaceIteration

K_FREE = ("sgd", "sgd_foreach", "sgd_fused", "sgd+svdvals", "adamw", "sgd_graph", "adamw_graph")
GRAPH = "_graph"  # suffix of a provider's base name: its step captured in a CUDA graph
GRAPH_WARMUP = 3  # eager steps (on a side stream) right before the capture
ANCHORS = {"vs_sgd": "sgd", "vs_sgd_svdvals": "sgd+svdvals", "vs_sgd_svd_lowrank": "sgd+svd_lowrank"}


def as_matrix(p: torch.Tensor) -> torch.Tensor:
    """The (m, n) view a weight is tracked as: conv kernels (o, i, kh, kw) -> (o, i*kh*kw)."""
    return p.reshape(p.shape[0], -1)


def tensor_bytes(obj) -> int:
    """Bytes of all distinct tensors in a nested dict/list structure."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = (x.data_ptr(), x.numel(), x.dtype)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


class Provider:
    """Base class; see the module docstring. ``named``: (name, Parameter) pairs it owns."""

    family = "sgd"
    stateless = False
    tracks = True

    def __init__(self, name: str, named, tracked: list[str], *, k: int | None, rank: int,
                 hp: dict, backend: str = ""):
        self.name, self.named, self.tracked = name, named, tracked
        self.params = [p for _, p in named]
        self.by_name = dict(named)
        self.k, self.rank, self.hp, self.backend = k, rank, hp, backend
        self.steps = 0
        self.opt = self._make_optimizer()

    def _make_optimizer(self):
        hp = self.hp
        if self.family == "adamw":
            return torch.optim.AdamW(self.params, lr=hp["lr_adamw"])
        return torch.optim.SGD(self.params, lr=hp["lr"], momentum=hp["momentum"])

    def step(self) -> None:
        self.opt.step()

    def estimates(self) -> dict[str, torch.Tensor]:
        """Top-``rank`` estimates per tracked matrix (float64, CPU), of the current weights."""
        return self.estimate_weights({n: self.by_name[n] for n in self.tracked})

    def estimate_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_bytes(self) -> int:
        return tensor_bytes(self.opt.state_dict()["state"])


class Untracked(Provider):
    tracks = False

    def __init__(self, name, named, tracked, *, k, rank, hp, backend=""):
        self.family = "adamw" if name.startswith("adamw") else "sgd"
        self.flags = {"sgd_foreach": {"foreach": True}, "sgd_fused": {"fused": True}}.get(name, {})
        super().__init__(name, named, tracked, k=k, rank=rank, hp=hp, backend=backend)

    def _make_optimizer(self):
        if self.family == "adamw":
            return super()._make_optimizer()
        return torch.optim.SGD(self.params, lr=self.hp["lr"], momentum=self.hp["momentum"],
                               **self.flags)

    def estimates(self):
        return {}


def _f32(W: torch.Tensor) -> torch.Tensor:
    """linalg routines take float32/float64 only: cast low-precision weights (part of the cost)."""
    return W if W.dtype in (torch.float32, torch.float64) else W.float()


class SgdSvdvals(Provider):
    """SGD step + torch.linalg.svdvals of every tracked matrix, every step."""

    stateless = True

    def step(self):
        self.opt.step()
        self.last = [torch.linalg.svdvals(_f32(as_matrix(self.by_name[n].detach())))
                     for n in self.tracked]

    def estimate_weights(self, weights):
        return {n: torch.linalg.svdvals(_f32(as_matrix(W.detach())))[: self.rank].double().cpu()
                for n, W in weights.items()}


class SgdSvdLowrank(Provider):
    """SGD step + torch.svd_lowrank(q=k, niter=2) of every tracked matrix, every step."""

    stateless = True

    def step(self):
        self.opt.step()
        self.last = [torch.svd_lowrank(_f32(as_matrix(self.by_name[n].detach())), q=self.k,
                                       niter=2)[1] for n in self.tracked]

    def estimate_weights(self, weights):
        cuda = sorted({W.device.index or 0 for W in weights.values() if W.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(1234)  # svd_lowrank draws from the global RNG
            return {n: torch.svd_lowrank(_f32(as_matrix(W.detach())), q=self.k, niter=2)[1]
                    [: self.rank].double().cpu() for n, W in weights.items()}


class SgdSubspace(Provider):
    """SGD step + one warm subspace-iteration step (bench/subspace_iter.py), batched by shape."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mats = [as_matrix(self.by_name[n].detach()) for n in self.tracked]
        self.it = WarmSubspaceIteration(self.mats, self.k, seed=0)

    def step(self):
        self.opt.step()
        self.it.step(self.mats)

    def estimates(self):
        return {n: s[: self.rank].double().cpu() for n, s in zip(self.tracked, self.it.sigma())}

    def state_bytes(self):
        return super().state_bytes() + self.it.state_bytes()


def backend_schedule(backend: str) -> dict:
    """'torch' -> the backend with the library's default schedule; 'torch-alternate' -> backend
    torch, schedule "alternate"."""
    name, _, schedule = backend.partition("-")
    return {"backend": name, **({"schedule": schedule} if schedule else {})}


class SpectralSgd(Provider):
    """lowrank.SpectralSGD: the update and the sketch in one pass, on ``backend``."""

    def _make_optimizer(self):
        return lowrank.SpectralSGD(self.named, lr=self.hp["lr"], momentum=self.hp["momentum"],
                                   rank=self.rank, sketch_rank=self.k, include=self.tracked,
                                   **backend_schedule(self.backend))

    def estimates(self):
        return {n: r.sigma.double().cpu() for n, r in self.opt.spectra().items()}

    def state_bytes(self):
        # Optimizer state (momentum buffers) + tracker state (bases, estimates, row norms).
        return tensor_bytes(self.opt.state_dict())


class AdamwTracker(Provider):
    """torch.optim.AdamW step, then lowrank.SpectrumTracker.step() (the sketch-only pass)."""

    family = "adamw"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracker = lowrank.SpectrumTracker(self.named, rank=self.rank, sketch_rank=self.k,
                                               include=self.tracked, **backend_schedule(self.backend))

    def step(self):
        self.opt.step()
        self.tracker.step()

    def estimates(self):
        return {n: r.sigma.double().cpu() for n, r in self.tracker.spectra().items()}

    def state_bytes(self):
        return super().state_bytes() + tensor_bytes(self.tracker.state_dict())


def capture(step, warmup: int = GRAPH_WARMUP):
    """``step`` captured in a CUDA graph after ``warmup`` eager calls on a side stream (as
    torch's recipe asks); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class Graphed:
    """Mixin: the provider's step captured in a CUDA graph at its first call (:func:`capture`,
    with the gradients of that call cloned into the static ones it reads), then replayed by
    every call; ``frozen_grads`` tells the harness to stop setting gradients."""

    frozen_grads = False
    replay = None

    def step(self) -> None:
        if self.replay is None:
            for p in self.params:
                if p.grad is not None:
                    p.grad = p.grad.clone()
            self.replay = capture(super().step)
            self.frozen_grads = True
        self.replay()


def _capturable_adamw(params, lr):
    # capturable=True keeps AdamW's step count on the device (CUDA only; the CPU tests run the
    # plumbing without a graph).
    return torch.optim.AdamW(params, lr=lr, capturable=params[0].is_cuda)


class UntrackedGraph(Graphed, Untracked):
    def _make_optimizer(self):
        if self.family == "adamw":
            return _capturable_adamw(self.params, self.hp["lr_adamw"])
        return super()._make_optimizer()


class SpectralSgdGraph(Graphed, SpectralSgd):
    pass


class AdamwTrackerGraph(Graphed, AdamwTracker):
    def _make_optimizer(self):
        return _capturable_adamw(self.params, self.hp["lr_adamw"])


def split_name(provider: str) -> tuple[str, str]:
    """'spectral_sgd[torch]' -> ('spectral_sgd', 'torch'); 'sgd' -> ('sgd', '')."""
    base, _, backend = provider.partition("[")
    return base, backend.rstrip("]")


def make_provider(provider: str, named, tracked, *, k, rank, hp) -> Provider:
    """Build ``provider`` (a name from the module docstring) over the parameters ``named``."""
    base, backend = split_name(provider)
    cls = {"sgd": Untracked, "sgd_foreach": Untracked, "sgd_fused": Untracked, "adamw": Untracked,
           "sgd+svdvals": SgdSvdvals, "sgd+svd_lowrank": SgdSvdLowrank,
           "sgd+subspace": SgdSubspace, "spectral_sgd": SpectralSgd,
           "adamw+tracker": AdamwTracker, "sgd_graph": UntrackedGraph,
           "adamw_graph": UntrackedGraph, "spectral_sgd_graph": SpectralSgdGraph,
           "adamw+tracker_graph": AdamwTrackerGraph}.get(base)
    if cls is None:
        raise ValueError(f"unknown provider {provider!r}")
    return cls(provider, named, tracked, k=k, rank=rank, hp=hp, backend=backend)


def lowrank_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends of lowrank that run here: (available, {unavailable: reason}).

    On the CPU the library's default backend ("auto": the C kernel for float32 and 16-bit
    weights where it builds, else torch) with each schedule and the pure torch backend with its
    default one are timed (the Triton interpreter is a correctness tool, not a backend to
    benchmark). On CUDA each of "triton" and "cupy" is probed with one tracked step of
    SpectralSGD and of SpectrumTracker on a small matrix; a backend that fails is reported, not
    silently replaced.
    """
    if device.type != "cuda":
        # The default schedule (on the CPU: sequential), the GPU kernels' one (both) and the
        # opt-in alternating one, side by side (lowrank.trackset.SCHEDULES).
        skipped = {"triton": "CPU run", "cupy": "CPU run"}
        try:
            lowrank.backends.resolve_backend("cpu", device, torch.float32)
        except lowrank.backends.BackendUnavailable as e:
            skipped["cpu"] = str(e)
            return ["torch", "torch-both", "torch-alternate"], skipped
        # "auto" is what users get: the C kernel (float32 and 16-bit weights), where it builds.
        return ["auto", "auto-both", "auto-alternate", "torch"], skipped
    ok, skipped = ["torch"], {}
    for backend in ("triton", "cupy"):
        try:
            p = torch.nn.Parameter(torch.randn(96, 80, device=device))
            p.grad = torch.randn_like(p)
            opt = lowrank.SpectralSGD([("w", p)], lr=1e-3, momentum=0.9, rank=4, sketch_rank=8,
                                      backend=backend)
            opt.step()
            opt.step()
            tr = lowrank.SpectrumTracker([("w", p)], rank=4, sketch_rank=8, backend=backend)
            tr.step()
            torch.cuda.synchronize(device)
            sigma = opt.spectra()["w"].sigma
            if not bool(torch.isfinite(sigma).all()):
                raise RuntimeError("non-finite estimates on the probe matrix")
            ok.append(backend)
        except Exception as e:  # any failure of the probe: reported by the caller, not hidden
            skipped[backend] = f"{type(e).__name__}: {e}"
    return ok, skipped


def provider_names(device: torch.device, backends: list[str]) -> list[str]:
    """All providers for ``device``, anchors first."""
    names = ["sgd"]
    if device.type != "cuda":
        names.append("sgd_foreach")  # on CUDA the default already is foreach
    names += ["sgd_fused", "sgd+svdvals", "sgd+svd_lowrank", "sgd+subspace"]
    names += [f"spectral_sgd[{b}]" for b in backends]
    names += ["adamw"] + [f"adamw+tracker[{b}]" for b in backends]
    if device.type == "cuda":
        # Captured steps: the backends whose step makes no host sync (the torch reference's
        # post-processing calls cuSOLVER, which does).
        capturable = [b for b in backends if b in ("cupy", "triton")]
        names += ["sgd_graph"] + [f"spectral_sgd_graph[{b}]" for b in capturable]
        names += ["adamw_graph"] + [f"adamw+tracker_graph[{b}]" for b in capturable]
    return names

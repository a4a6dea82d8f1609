"""Where the host and the device spend one tracked SpectralSGD step, per backend.

    python -m bench.step_profile [--device cuda] [--shape 4096] [--k 16] [--backends triton,cupy]
                                 [--steps 30] [--out FILE.json]

On a GPU a tracked step is fast only if the host keeps ahead of the device: every small torch
or CuPy launch costs host time, and a host synchronisation makes the host wait for the device.
For each backend this reports, after a warm-up:

- ``step_ms``: wall time per step in a loop of ``--steps`` steps (one synchronisation at the
  end), next to the untracked ``torch.optim.SGD`` step timed the same way;
- ``host_ms``: host time per step by part (the update-and-sketch pass, the post-processing,
  the finiteness checks and state commits, the metrics hand-off, the rest), measured by
  wrapping the library's functions with a timer, no synchronisation added;
- ``kernels`` and ``device_ms``: device kernels launched in one step and their summed time
  (torch.profiler), and ``host_syncs``: synchronisations torch reports in one step.

If ``host_ms`` is about ``step_ms`` and well above ``device_ms``, the step is host-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict

import torch

import lowrank
from lowrank import backends, tracking, trackset

from . import timing

# (label, owner, attribute): the functions whose host time is attributed, outermost first.
# "batched pass" is the update and sketch of one group of same-shape matrices (one launch on
# CuPy; on other backends it contains their "pass" calls, one per matrix).
PARTS = (
    ("batched pass", backends, "fused_sgd_sketch_many"),
    ("list pass", backends, "fused_sgd_sketch_list"),
    ("pass", backends, "fused_sgd_sketch"),
    ("postprocess", backends, "postprocess"),
    ("finite checks", tracking, "finite_each"),
    ("commit", tracking.MatrixTracker, "commit"),
    ("commit", tracking, "_commit_group"),
    ("finish_step", trackset.TrackedSet, "finish_step"),
    ("after_step", trackset.TrackedSet, "after_step"),
)


@contextlib.contextmanager
def timed_parts(totals: dict):
    """Wrap PARTS so that each call adds its host time to ``totals[label]``."""
    saved = []
    try:
        for label, owner, attr in PARTS:
            fn = getattr(owner, attr)
            saved.append((owner, attr, fn))

            def wrapper(*a, _fn=fn, _label=label, **kw):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    totals[_label] += time.perf_counter() - t0

            setattr(owner, attr, wrapper)
        yield totals
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_ms(step, device, steps: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def _host_syncs(fn, device) -> int | None:
    return timing.count_host_syncs(fn) if device.type == "cuda" else None


def _device_kernels(fn, device) -> tuple[int | None, float | None]:
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def profile_backend(backend: str, n: int, k: int, device, steps: int, schedule: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, n, device=device, generator=gen) / n ** 0.5)
    grads = [torch.randn(n, n, device=device, generator=gen) * 1e-4 for _ in range(2)]
    opt = lowrank.SpectralSGD([w], lr=1e-3, rank=max(1, k // 2), sketch_rank=k, backend=backend,
                              schedule=schedule)
    i = [0]

    def step():
        w.grad = grads[i[0] % 2]
        i[0] += 1
        opt.step()

    for _ in range(5):  # compiles the kernels, creates the state
        step()
    step_ms = _loop_ms(step, device, steps)
    totals = defaultdict(float)
    with timed_parts(totals):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host_total = time.perf_counter() - t0
    _sync(device)
    host = {label: 1e3 * v / steps for label, v in totals.items()}
    host["step (host)"] = 1e3 * host_total / steps
    kernels, device_ms = _device_kernels(step, device)
    return {"backend": backend, "resolved": opt.tracked.backend[next(iter(opt.tracked.backend))],
            "schedule": opt.tracked.schedule[next(iter(opt.tracked.schedule))],
            "step_ms": step_ms, "host_ms": host, "kernels": kernels, "device_ms": device_ms,
            "host_syncs": _host_syncs(step, device)}


def sgd_ms(n: int, device, steps: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, n, device=device, generator=gen))
    w.grad = torch.randn(n, n, device=device, generator=gen) * 1e-4
    opt = torch.optim.SGD([w], lr=1e-3)
    for _ in range(3):
        opt.step()
    return _loop_ms(opt.step, device, steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--backends", default="auto")
    p.add_argument("--schedule", default="auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": args.shape, "k": args.k, "sgd_step_ms": sgd_ms(args.shape, device, args.steps),
            "backends": []}
    print(f"{rows['device']}: {args.shape}^2, k = {args.k}; torch.optim.SGD step "
          f"{rows['sgd_step_ms']:.3f} ms")
    for backend in args.backends.split(","):
        r = profile_backend(backend.strip(), args.shape, args.k, device, args.steps, args.schedule)
        rows["backends"].append(r)
        host = ", ".join(f"{name} {ms:.3f}" for name, ms in r["host_ms"].items())
        print(f"  {backend} ({r['resolved']}, {r['schedule']}): step {r['step_ms']:.3f} ms; "
              f"host ms: {host}; kernels {r['kernels']}, device {r['device_ms']} ms, "
              f"host syncs {r['host_syncs']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

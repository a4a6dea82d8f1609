"""The CPU suite under pytest-benchmark, for people who compare runs with its tooling:

    pytest bench/test_cpu_pytest_benchmark.py --benchmark-only [--benchmark-autosave]
    pytest bench/test_cpu_pytest_benchmark.py --benchmark-compare     # against the last save

Every provider of ``python -m bench`` (bench/providers.py) on one float32 matrix per size, k = 16,
no momentum: the untracked SGD step, SGD + svdvals / svd_lowrank / warm subspace iteration, and
SpectralSGD with each schedule. Each round sets fresh gradients (not timed), then times one
optimizer step. pytest-benchmark runs the benchmarks one after the other, so for ratios taken
side by side in one process (and the accuracy of every estimate) use ``python -m bench``; this
file is not collected by ``make test`` (testpaths = tests).
"""

from __future__ import annotations

import pytest
import torch

from bench import workloads
from bench.providers import lowrank_backends, make_provider, provider_names

SIZES = [256, 1024, 2048]
K = 16
PROVIDERS = [p for p in provider_names(torch.device("cpu"), lowrank_backends(torch.device("cpu"))[0])
             if not p.startswith("adamw")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=[f"{n}x{n}" for n in SIZES])
def test_step(benchmark, n, provider):
    wl = workloads.build("matrix", device="cpu", dtype=torch.float32, momentum=0.0, shape=(n, n))
    named = [(name, torch.nn.Parameter(W.clone())) for name, W in wl.params]
    tracked = wl.tracked((K,))
    p = make_provider(provider, named, tracked, k=K, rank=K // 2,
                      hp={"lr": wl.lr, "momentum": 0.0, "lr_adamw": wl.lr_adamw})
    steps = [0]

    def set_grads():
        wl.set_grads(p.params, steps[0])
        steps[0] += 1

    def step():
        with torch.no_grad():
            p.step()

    for _ in range(3):  # warm-up: first-call costs, trackers past their first steps
        set_grads()
        step()
    benchmark.group = f"{n}x{n} float32 k={K}"
    benchmark.pedantic(step, setup=set_grads, rounds=20 if n >= 2048 else 50, iterations=1)
    if p.tracks and provider != "sgd+svdvals":
        est = p.estimates()
        assert all(bool(torch.isfinite(v).all()) for v in est.values())

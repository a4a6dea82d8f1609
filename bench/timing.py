"""Interleaved timing of several step functions in one process.

CPU: ``time.perf_counter`` around each single call. CUDA: a pair of ``torch.cuda.Event`` around
each call, read after the round's synchronisation, with the L2 cache flushed (a 256 MiB write)
before every call, so a step never finds its weights in cache from its previous run, and the
GPU idle when the call starts (its launch overhead is part of the time).

Providers are interleaved call by call, in an order rotated every round, so that the noise of a
shared machine (other jobs, frequency changes) falls on all of them alike; ratios are taken
between medians of the same run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Budget:
    min_samples: int = 5  # every provider gets at least this many timed calls...
    max_samples: int = 100  # ...and at most this many
    target_s: float = 0.5  # a provider stops once it has run this long (and min_samples)
    group_cap_s: float = 60.0  # past this wall time, stop as soon as every provider has min_samples


class _CudaFlusher:
    def __init__(self, device):
        self.buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buf.zero_()


def time_interleaved(tasks: dict, device: torch.device, budget: Budget) -> dict[str, list[float]]:
    """Time ``tasks`` (name -> (prepare, run), both callables) call by call, interleaved.

    ``prepare()`` runs untimed before each ``run()`` (it sets the gradients). Returns the times
    in milliseconds of every timed call, per task.
    """
    cuda = device.type == "cuda"
    flush = _CudaFlusher(device) if cuda else None
    samples = {name: [] for name in tasks}
    spent = {name: 0.0 for name in tasks}
    names = list(tasks)
    start = time.perf_counter()
    rnd = 0

    def done(name):
        n = len(samples[name])
        if n < budget.min_samples:
            return False
        over_cap = time.perf_counter() - start > budget.group_cap_s
        return n >= budget.max_samples or spent[name] >= budget.target_s or over_cap

    while True:
        active = [n for n in names if not done(n)]
        if not active:
            return samples
        shift = rnd % len(active)
        order = active[shift:] + active[:shift]
        rnd += 1
        if cuda:
            events = []
            for name in order:
                prepare, run = tasks[name]
                prepare()
                flush()
                # Start from an idle GPU: the step's launch overhead counts, as it does when
                # the host cannot run ahead (small matrices, or a step that synchronises).
                torch.cuda.synchronize(device)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                run()
                e1.record()
                events.append((name, e0, e1))
            torch.cuda.synchronize(device)
            for name, e0, e1 in events:
                ms = e0.elapsed_time(e1)
                samples[name].append(ms)
                spent[name] += ms / 1e3
        else:
            for name in order:
                prepare, run = tasks[name]
                prepare()
                t0 = time.perf_counter()
                run()
                ms = (time.perf_counter() - t0) * 1e3
                samples[name].append(ms)
                spent[name] += ms / 1e3


def cuda_event_times(fn, runs: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn``, each between a pair of CUDA events and finished
    before the next starts: for ops long enough that launch overlap does not matter."""
    times = []
    for _ in range(runs):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return times


def quantiles(ms: list[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of the samples."""
    t = torch.tensor(ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def peak_step_memory(prepare, run, device: torch.device) -> float:
    """CUDA: the peak memory allocated during one call above what was allocated before it (MiB).

    NaN on the CPU: tracemalloc does not see torch's allocations and the RSS of a process that
    holds every provider at once says nothing about one of them.
    """
    if device.type != "cuda":
        return float("nan")
    prepare()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def count_host_syncs(fn) -> int:
    """Synchronisations torch reports during one call of ``fn`` on CUDA (its sync debug mode)."""
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    # The first switch to the debug mode also warns that the mode is a prototype: not a sync.
    return sum("synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)
               for w in caught)

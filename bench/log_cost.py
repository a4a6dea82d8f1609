"""What a run log costs per step: SpectralSGD with and without a :class:`lowrank.RunLog`.

    python -m bench.log_cost [--workloads mlp,gpt2,resnet] [--device cpu] [--backend auto]
                             [--rounds 200] [--threads N]

The suite times SpectralSGD without a log; a training run that logs its spectra every step
also pays for the metrics of every tracked matrix (computed on the device, a few batches per
step) and for the buffered Parquet writes. Here three copies of one model step side by side,
interleaved call by call (:mod:`bench.timing`): torch.optim.SGD, SpectralSGD, and SpectralSGD
with a log in a temporary folder (``flush_every`` 50, the default, so every 50th step of the
logged copy also writes a part file: the mean shows that cost, the median does not).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile

import torch

import lowrank

from . import env, timing, workloads

MOMENTUM = 0.9
K = 16


def variants(name: str, device, backend: str, log_dir: str) -> dict:
    """({label: (prepare, run)}, workload, tracked count, log): the untracked step, the tracked
    step, the tracked and logged step, each on its own copy of the workload's weights, with the
    same gradients; the log is the caller's to close."""
    wl = workloads.build(name, device=device, dtype=torch.float32, momentum=MOMENTUM)
    tracked = wl.tracked([K])
    tasks, log = {}, lowrank.RunLog(log_dir)
    for label in ("torch.optim.SGD", "SpectralSGD", "SpectralSGD + RunLog"):
        params = [torch.nn.Parameter(p.detach().clone()) for _, p in wl.params]
        named = [(n, p) for (n, _), p in zip(wl.params, params)]
        if label == "torch.optim.SGD":
            opt = torch.optim.SGD(params, lr=wl.lr, momentum=MOMENTUM)
        else:
            opt = lowrank.SpectralSGD(named, lr=wl.lr, momentum=MOMENTUM, rank=K // 2,
                                      sketch_rank=K, include=tracked, backend=backend,
                                      log=log if "RunLog" in label else None)
        step = [0]

        def prepare(params=params, step=step):
            wl.set_grads(params, step[0])
            step[0] += 1
        tasks[label] = (prepare, opt.step)
    return tasks, wl, len(tracked), log


def measure(name: str, device, backend: str, rounds: int, log=print) -> dict:
    """Median, mean and 20th/80th percentiles (ms) of each variant over ``rounds`` rounds."""
    with tempfile.TemporaryDirectory() as log_dir:
        tasks, wl, n_tracked, run_log = variants(name, device, backend, log_dir)
        with run_log:
            for prepare, run in tasks.values():  # warm-up: allocations, the kernel build, plans
                for _ in range(5):
                    prepare()
                    run()
            run_log.flush()  # the first write imports pyarrow's Parquet writer: once a process
            budget = timing.Budget(min_samples=rounds, max_samples=rounds, target_s=math.inf,
                                   group_cap_s=math.inf)
            samples = timing.time_interleaved(tasks, device, budget)
    out = {}
    log(f"{wl.label} ({n_tracked} tracked matrices, float32, momentum {MOMENTUM}, k = {K}, "
        f"backend {backend}), {rounds} rounds:")
    base = statistics.median(samples["torch.optim.SGD"])
    for label, ms in samples.items():
        med, p20, p80 = timing.quantiles(ms)
        out[label] = {"median_ms": med, "mean_ms": statistics.fmean(ms), "p20_ms": p20,
                      "p80_ms": p80}
        log(f"    {label:<22} median {med:7.3f} ms ({med / base:4.2f}x SGD), mean "
            f"{statistics.fmean(ms):7.3f} ms, p20-p80 {p20:.3f}-{p80:.3f} ms")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.log_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="mlp,gpt2,resnet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = env.run_info(device)
    print(f"{info['device']}, torch {info['torch_version']}, commit {info['commit'][:10]}, "
          f"{info['date_utc']}, {info['threads']} threads")
    for name in args.workloads.split(","):
        measure(name.strip(), device, args.backend, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

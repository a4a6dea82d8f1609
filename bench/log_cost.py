"""What a run log costs per step: SpectralSGD with and without a :class:`lowrank.RunLog`, and
with gradient tracking (``track_grad``) as well.

    python -m bench.log_cost [--workloads mlp,gpt2,resnet] [--device cpu] [--backend auto]
                             [--rounds 200] [--threads N]

The suite times SpectralSGD without a log; a training run that logs its spectra every step
also pays for what the log keeps of each step and for the buffered Parquet writes, and with
``track_grad`` for a sketch of every gradient too. Here four copies of one model step side by
side, interleaved call by call (:mod:`bench.timing`): torch.optim.SGD, SpectralSGD,
SpectralSGD with a log in a temporary folder, and that with the gradients' spectra tracked
(``flush_every`` 50, the default: every 50th step of a logged copy also writes a part file,
which the mean shows and the median does not).
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


LABELS = ("torch.optim.SGD", "SpectralSGD", "SpectralSGD + RunLog",
          "SpectralSGD(track_grad) + RunLog")


def variants(name: str, device, backend: str, log_dir: str):
    """({label: (prepare, run)}, workload, tracked count, logs): the untracked step, the tracked
    step, the tracked and logged step, and the same with the gradients' spectra tracked too,
    each on its own copy of the workload's weights, with the same gradients; the logs (one per
    logged variant) are the caller's to close."""
    wl = workloads.build(name, device=device, dtype=torch.float32, momentum=MOMENTUM)
    tracked = wl.tracked([K])
    tasks, logs = {}, []
    for i, label in enumerate(LABELS):
        params = [torch.nn.Parameter(p.detach().clone()) for _, p in wl.params]
        named = [(n, p) for (n, _), p in zip(wl.params, params)]
        if label == "torch.optim.SGD":
            opt = torch.optim.SGD(params, lr=wl.lr, momentum=MOMENTUM)
        else:
            log = None
            if "RunLog" in label:
                log = lowrank.RunLog(f"{log_dir}/{i}")
                logs.append(log)
            opt = lowrank.SpectralSGD(named, lr=wl.lr, momentum=MOMENTUM, rank=K // 2,
                                      sketch_rank=K, include=tracked, backend=backend, log=log,
                                      track_grad="track_grad" in label)
        step = [0]

        def prepare(params=params, step=step):
            wl.set_grads(params, step[0])
            step[0] += 1
        tasks[label] = (prepare, opt.step)
    return tasks, wl, len(tracked), logs


def measure(name: str, device, backend: str, rounds: int, log=print) -> dict:
    """Median, mean and 20th/80th percentiles (ms) of each variant over ``rounds`` rounds."""
    with tempfile.TemporaryDirectory() as log_dir:
        tasks, wl, n_tracked, logs = variants(name, device, backend, log_dir)
        try:
            for prepare, run in tasks.values():  # warm-up: allocations, the kernel build, plans
                for _ in range(5):
                    prepare()
                    run()
            for run_log in logs:  # the first write imports pyarrow's Parquet writer: once
                run_log.flush()
            budget = timing.Budget(min_samples=rounds, max_samples=rounds, target_s=math.inf,
                                   group_cap_s=math.inf)
            samples = timing.time_interleaved(tasks, device, budget)
        finally:
            for run_log in logs:
                run_log.close()
    out = {}
    log(f"{wl.label} ({n_tracked} tracked matrices, float32, momentum {MOMENTUM}, k = {K}, "
        f"backend {backend}), {rounds} rounds:")
    base = statistics.median(samples["torch.optim.SGD"])
    for label, ms in samples.items():
        med, p20, p80 = timing.quantiles(ms)
        out[label] = {"median_ms": med, "mean_ms": statistics.fmean(ms), "p20_ms": p20,
                      "p80_ms": p80}
        log(f"    {label:<32} median {med:7.3f} ms ({med / base:4.2f}x SGD), mean "
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

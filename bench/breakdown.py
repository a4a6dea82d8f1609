"""Where the time of one SpectralSGD step goes (torch backend), component by component.

    python -m bench.breakdown [--shape 1024] [--k 16] [--device cpu]

Each component runs on its own copy of the same data, interleaved call by call with the others
and with the whole ``SpectralSGD.step`` (:mod:`bench.timing`), the same number of rounds each.
The components call the library's own functions (lowrank.fused_sgd_sketch.sgd_update_torch,
lowrank.sketch.sketch_torch, lowrank.postprocess.postprocess_torch). Two rows are differences
taken round by round: "norms" = sketch_torch - its two products (fro2 and row_sq: a float32
row-norm pass returned in float64, plus the overflow check), and "rest" = the whole step -
update - sketch_torch - postprocess (Python, checks, bookkeeping). The norms are timed as a
difference so that they see W as the real call does (just read by the products). The
components add up to a step of the "both" schedule; "refill candidates" is what a step pays
only when some direction is rank-deficient (never on these random weights), shown for scale.
Rows use the result schema with workload "breakdown" and provider "component:<name>".
"""

from __future__ import annotations

import argparse
import math

import torch

import lowrank
from lowrank.fused_sgd_sketch import sgd_update_torch
from lowrank.postprocess import postprocess_torch
from lowrank.sketch import sketch_torch

from . import env, timing, workloads

TOTAL = "SpectralSGD step, schedule both (all)"
SEQUENTIAL = "SpectralSGD step, default schedule (CPU: sequential)"
ALTERNATE = "SpectralSGD step, schedule alternate (Y / Z in turn)"
UPDATE = "update: sgd_update_torch"
SKETCH = "sketch_torch (products + norms)"
PRODUCTS = "  products Y = W V, Z = W^T U"
POST = "postprocess_torch"


def components(n: int, k: int, device, *, dtype=torch.float32, momentum: float = 0.0):
    """name -> (prepare, run) for every component of one tracked step of an n x n matrix."""
    device = torch.device(device)
    wl = workloads.matrix(n, n, device=device, dtype=dtype, momentum=momentum, seed=0)
    W0 = wl.params[0][1]
    gen = torch.Generator(device=device).manual_seed(1)
    G = torch.randn(W0.shape, generator=gen, device=device).to(dtype) * 1e-4
    U = torch.linalg.qr(torch.randn(1, n, k, generator=gen, device=device)).Q
    V = torch.linalg.qr(torch.randn(1, n, k, generator=gen, device=device)).Q
    hp = dict(lr=1e-2, momentum=momentum)
    tasks = {}

    def add(name, run, prepare=lambda: None):
        tasks[name] = (prepare, run)

    p = torch.nn.Parameter(W0.clone())
    sgd = torch.optim.SGD([p], **hp)
    add("torch.optim.SGD step", sgd.step, lambda: setattr(p, "grad", G))
    q = torch.nn.Parameter(W0.clone())
    # The components below add up to a step of the "both" schedule (the GPU kernels' contract);
    # steps of the CPU's default (sequential) and of the alternating schedule are timed beside.
    spectral = lowrank.SpectralSGD([("w", q)], rank=k // 2, sketch_rank=k, backend="torch",
                                   schedule="both", **hp)
    add(TOTAL, spectral.step, lambda: setattr(q, "grad", G))
    q3 = torch.nn.Parameter(W0.clone())
    default = lowrank.SpectralSGD([("w", q3)], rank=k // 2, sketch_rank=k, backend="torch", **hp)
    add(SEQUENTIAL, default.step, lambda: setattr(q3, "grad", G))
    q2 = torch.nn.Parameter(W0.clone())
    alternate = lowrank.SpectralSGD([("w", q2)], rank=k // 2, sketch_rank=k, backend="torch",
                                  schedule="alternate", **hp)
    add(ALTERNATE, alternate.step, lambda: setattr(q2, "grad", G))
    Wu, buf = W0.clone(), [None]

    def update():
        buf[0] = sgd_update_torch(Wu, G, buf[0], **hp)
    add(UPDATE, update)
    Wb = W0.clone().unsqueeze(0)
    add(SKETCH, lambda: sketch_torch(Wb, U, V))
    Wc = Wb.float()
    add(PRODUCTS, lambda: (torch.matmul(Wc, V), torch.matmul(Wc.transpose(-2, -1), U)))
    sk = sketch_torch(Wb, U, V)
    add(POST, lambda: postprocess_torch(sk.Y, sk.Z, U, V, seed=0, step=3))
    gen2 = torch.Generator(device=device).manual_seed(2)
    add("  refill candidates: randn float64 (b, m+n, k)",
        lambda: torch.randn(1, 2 * n, k, generator=gen2, device=device, dtype=torch.float64))
    return tasks


def breakdown(n: int = 1024, k: int = 16, device="cpu", *, rounds: int = 60,
              info: dict | None = None, suite: str = "", log=print) -> list[dict]:
    """Time every component ``rounds`` times, interleaved; one row per component.

    Shares are medians over rounds of (component time / whole-step time of the same round), so
    a change of load during the run does not skew them (``overhead`` column).
    """
    device = torch.device(device)
    tasks = components(n, k, device)
    for prepare, run in tasks.values():  # warm-up (allocations, first-call costs)
        for _ in range(3):
            prepare()
            with torch.no_grad():
                run()
    # Every task runs in every round: sample i of each task comes from round i.
    budget = timing.Budget(min_samples=rounds, max_samples=rounds, target_s=math.inf,
                           group_cap_s=math.inf)
    samples = timing.time_interleaved(tasks, device, budget)
    t = {name: torch.tensor(v, dtype=torch.float64) for name, v in samples.items()}
    norms = {"  norms: fro2 + row_sq (= sketch - products)": t[SKETCH] - t[PRODUCTS]}
    t = {**{n: v for n, v in t.items() if list(t).index(n) <= list(t).index(PRODUCTS)}, **norms,
         **{n: v for n, v in t.items() if list(t).index(n) > list(t).index(PRODUCTS)}}
    t["rest: Python, checks, bookkeeping (= step - update - sketch - postprocess)"] = (
        t[TOTAL] - t[UPDATE] - t[SKETCH] - t[POST])
    total = t[TOTAL]
    rows = []
    log(f"breakdown of SpectralSGD.step, {n}x{n} float32, k={k}, no momentum "
        f"(share: median over {rounds} rounds of component / whole step):")
    for name, ms_t in t.items():
        med, p20, p80 = timing.quantiles(ms_t.tolist())
        share = float((ms_t / total).median())
        log(f"    {name:<52} {med:8.3f} ms  {100 * share:5.1f}% of the step")
        rows.append({**(info or {}), "suite": suite, "group": f"breakdown/{n}x{n}/k{k}",
                     "status": "ok", "provider": f"component:{name.strip()}", "backend": "torch",
                     "family": "sgd", "workload": "breakdown", "shape": f"{n}x{n}",
                     "n_matrices": 1, "tracked_numel": n * n, "total_numel": n * n,
                     "spectrum": "synthetic", "dtype": "float32", "k": k, "rank": k // 2,
                     "momentum": 0.0, "n_samples": len(ms_t), "median_ms": med, "p20_ms": p20,
                     "p80_ms": p80, "overhead": share,
                     "note": "overhead column = median share of the whole SpectralSGD step"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    breakdown(args.shape, args.k, device, info=env.run_info(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

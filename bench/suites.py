"""The benchmark suites: which groups run on which device, and the loop that runs them.

Entry point for other scripts (bench/gpu_check.py calls this on the GPU machine)::

    from bench.suites import run_suite
    rows, csv_path = run_suite("cuda", suite="full")          # or suite="quick"

Each group is measured by :func:`bench.harness.measure_group`; rows are appended to
``bench/results/<device>-<YYYYMMDD>.csv`` after every group, so an interrupted run keeps what it
measured.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import time
from pathlib import Path

import torch

from . import env, results
from .harness import Group, measure_group
from .providers import lowrank_backends, provider_names
from .timing import Budget

KS = (8, 16, 32, 64)
BREAKDOWN_SHAPES = (1024, 2048)  # CPU full suite: where the time of a SpectralSGD step goes


def _groups_cpu_full():
    g = [Group("matrix", (n, n), "float32", 0.0, KS) for n in (256, 512, 1024, 2048)]
    g += [Group("matrix", (1024, 1024), dt, mom, KS)
          for dt, mom in (("float32", 0.9), ("bfloat16", 0.0), ("bfloat16", 0.9))]
    g += [Group(m, None, "float32", 0.9, (16,)) for m in ("mlp", "gpt2", "resnet")]
    g += [Group("digits", None, "float32", 0.9, (8, 16, 32))]
    return g


def _groups_cpu_quick():
    return [Group("matrix", (1024, 1024), "float32", 0.0, (16,)),
            Group("matrix", (256, 256), "bfloat16", 0.9, (8,)),
            Group("gpt2-tiny", None, "float32", 0.9, (16,)),
            Group("digits", None, "float32", 0.9, (16,))]


def _groups_cuda_full():
    shapes = [(n, n) for n in (1024, 2048, 4096, 8192)] + [(4096, 16384)]
    g = [Group("matrix", s, "float32", 0.0, KS) for s in shapes]
    g += [Group("matrix", (4096, 4096), dt, mom, KS)
          for dt, mom in (("float32", 0.9), ("bfloat16", 0.0), ("bfloat16", 0.9))]
    g += [Group(m, None, dt, 0.9, (16,)) for m in ("mlp", "gpt2", "resnet")
          for dt in ("float32", "bfloat16")]
    g += [Group("digits", None, "float32", 0.9, (8, 16, 32))]
    return g


def _groups_cuda_quick():
    return [Group("matrix", (4096, 4096), "float32", 0.0, (16,)),
            Group("matrix", (1024, 1024), "bfloat16", 0.9, (16,)),
            Group("gpt2", None, "float32", 0.9, (16,)),
            Group("digits", None, "float32", 0.9, (16,))]


SUITES = {
    ("cpu", "full"): (_groups_cpu_full, Budget(min_samples=5, max_samples=60, target_s=0.4,
                                               group_cap_s=45.0), 200),
    ("cpu", "quick"): (_groups_cpu_quick, Budget(min_samples=3, max_samples=15, target_s=0.08,
                                                 group_cap_s=8.0), 100),
    ("cuda", "full"): (_groups_cuda_full, Budget(min_samples=5, max_samples=100, target_s=0.3,
                                                 group_cap_s=60.0), 200),
    ("cuda", "quick"): (_groups_cuda_quick, Budget(min_samples=3, max_samples=30, target_s=0.1,
                                                   group_cap_s=20.0), 100),
}


def groups_of(device_type: str, suite: str) -> list[Group]:
    return SUITES[(device_type, suite)][0]()


def csv_path(device: torch.device, out_dir: Path) -> Path:
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    return Path(out_dir) / f"{env.device_slug(device)}-{day}.csv"


def _select(names, patterns):
    if not patterns:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def group_selected(group, workloads) -> bool:
    """Whether ``group`` is asked for: no patterns, or one matching its workload name ("matrix",
    "gpt2", ...) or its id ("4096x4096/float32/mom0/k8,16,32,64"), so a suite too long for one
    command can be run in parts."""
    return not workloads or any(fnmatch.fnmatchcase(group.workload, p)
                                or fnmatch.fnmatchcase(group.id, p) for p in workloads)


def run_suite(device="cpu", suite: str = "full", *, out_dir=results.RESULTS_DIR, providers=None,
              workloads=None, warmup: int = 30, seed: int = 0, log=print):
    """Run ``suite`` ("full" or "quick") on ``device``; returns (rows, path of the CSV written).

    ``providers`` / ``workloads``: optional lists of glob patterns (e.g. ["sgd*", "spectral*"],
    ["matrix", "gpt2"], or group ids such as ["8192x8192/*"]) to run a subset; the anchors are
    always kept, the ratios need them.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    make_groups, budget, pretrain = SUITES[(device.type, suite)]
    backends, skipped = lowrank_backends(device)
    for b, why in skipped.items():
        log(f"lowrank backend {b!r} not benchmarked: {why}")
    names = provider_names(device, backends)
    anchors = ["sgd", "sgd+svdvals", "sgd+svd_lowrank"]
    chosen = [n for n in names if n in anchors or n in _select(names, providers)]
    if providers and any(n.startswith("adamw+") for n in chosen) and "adamw" not in chosen:
        chosen.insert(chosen.index(next(n for n in chosen if n.startswith("adamw+"))), "adamw")
    groups = [g for g in make_groups() if group_selected(g, workloads)]
    info = env.run_info(device)
    path = csv_path(device, out_dir)
    log(f"{suite} suite on {info['device']}: {len(groups)} groups, providers: {', '.join(chosen)}")
    all_rows, t0 = [], time.perf_counter()
    for i, g in enumerate(groups):
        probe = env.machine_probe(device)
        log(f"[{i + 1}/{len(groups)}] {g.id} (load average {os.getloadavg()[0]:.1f}; matmul "
            f"{probe['probe_matmul_gflops']:.0f} GFLOP/s, copy {probe['probe_copy_gbps']:.0f} GB/s)")
        rows = measure_group(g, device, chosen, budget=budget, warmup=warmup, seed=seed,
                             pretrain=pretrain, info={**info, **probe}, suite=suite, log=log)
        load = f"load average {os.getloadavg()[0]:.1f} after the group"
        for row in rows:
            row["note"] = "; ".join(x for x in (row.get("note", ""), load) if x)
        _log_rows(rows, log)
        path = results.append_rows(path, rows)
        all_rows += rows
    if device.type == "cpu" and suite == "full" and not providers and not workloads:
        from .breakdown import breakdown

        for n in BREAKDOWN_SHAPES:
            rows = breakdown(n, 16, device, info=info, suite=suite, log=log)
            path = results.append_rows(path, rows)
            all_rows += rows
    log(f"done in {time.perf_counter() - t0:.0f} s; rows appended to {path}")
    return all_rows, path


def _log_rows(rows, log):
    for r in rows:
        if r.get("status") != "ok":
            log(f"    {r['provider']:<22} k={r['k']}: {r['status']}")
            continue
        k = f"k={r['k']}" if r["k"] else "     "
        err = r.get("err_top_r")
        err = f"err {err:.1e}" if isinstance(err, float) and err == err else ""
        log(f"    {r['provider']:<22} {k:<5} {r['median_ms']:9.3f} ms  x{r['overhead']:6.2f} own base"
            f"  {r['vs_sgd_svdvals']:7.1f}x vs svdvals  {r['vs_sgd_svd_lowrank']:5.2f}x vs svd_lowrank"
            f"  {err}")

"""One group of measurements: a workload, a dtype, a momentum and a set of k, every provider
side by side in the same process.

For each group:

1. build the workload and one copy of its weights per provider (and per k);
2. warm up: ``warmup`` tracked steps for every provider with state (the trackers converge),
   two for the stateless ones (svdvals, svd_lowrank);
3. check correctness before timing: top-r error of every estimate against float64
   ``torch.linalg.svdvals`` of the same weights (stateless estimators are applied to the
   weights of the ``sgd`` provider), and the largest difference between the weights of each
   provider and of its untracked optimizer after the same steps;
4. time every provider call by call, interleaved (:mod:`bench.timing`);
5. one row per provider and k (:mod:`bench.results` lists the columns).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import bounds, timing, workloads
from .env import peak_gbps
from .providers import ANCHORS, GRAPH, K_FREE, as_matrix, make_provider, split_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class Group:
    workload: str  # "matrix", a model of bench.workloads.MODELS, or "digits"
    shape: tuple | None = None  # (m, n) for "matrix"
    dtype: str = "float32"
    momentum: float = 0.0
    ks: tuple = (16,)

    @property
    def id(self) -> str:
        what = f"{self.shape[0]}x{self.shape[1]}" if self.shape else self.workload
        ks = ",".join(map(str, self.ks))
        return f"{what}/{self.dtype}/mom{self.momentum:g}/k{ks}"


def _err(est: dict, ref: dict, names, r: int) -> tuple[float, float]:
    worst = worst_s1 = 0.0
    for n in names:
        e, t = est[n][:r].double(), ref[n][:r].double()
        if e.numel() < r:
            return float("nan"), float("nan")
        d = (e - t).abs()
        worst = max(worst, float((d / t.clamp_min(1e-300)).max()))
        worst_s1 = max(worst_s1, float((d / t[0].clamp_min(1e-300)).max()))
    return worst, worst_s1


class _References:
    """Exact float64 singular values, computed once per distinct set of weights."""

    def __init__(self, names, r):
        self.names, self.r, self.cache = names, r, []

    def __call__(self, weights: dict) -> dict:
        for snap, ref in self.cache:
            if all(torch.equal(snap[n], weights[n]) for n in self.names):
                return ref
        ref = {n: torch.linalg.svdvals(as_matrix(weights[n].detach()).double())[: self.r].cpu()
               for n in self.names}
        self.cache.append(({n: weights[n].detach().clone() for n in self.names}, ref))
        return ref


def _max_abs_diff(a, b) -> float:
    return max(float((x.detach().double() - y.detach().double()).abs().max())
               for x, y in zip(a.params, b.params))


def _bytes_floor(provider, wl, momentum: float) -> int:
    """Bytes every step must move at least: read W and G and write W (+ the optimizer state)."""
    per = 7 if provider.family == "adamw" else 3 + (2 if momentum else 0)
    return sum(p.numel() * p.element_size() for _, p in wl.params) * per


def measure_group(group: Group, device, providers: list[str], *, budget: timing.Budget,
                  warmup: int = 30, seed: int = 0, pretrain: int = 200, info: dict | None = None,
                  suite: str = "", log=print) -> list[dict]:
    """Measure ``providers`` on ``group``; returns one row per provider (and k)."""
    device = torch.device(device)
    t_start = time.perf_counter()
    dtype = DTYPES[group.dtype]
    wl = workloads.build(group.workload, device=device, dtype=dtype, momentum=group.momentum,
                         seed=seed, shape=group.shape, pretrain=pretrain)
    tracked = wl.tracked(group.ks)
    if not tracked:
        raise ValueError(f"group {group.id}: no matrix with min(m, n) >= {max(group.ks)}")
    r_max = max(group.ks) // 2
    hp = {"lr": wl.lr, "momentum": group.momentum, "lr_adamw": wl.lr_adamw}
    tracked_numel = sum(p.numel() for n, p in wl.params if n in tracked)

    def base_row(provider, k, rank):
        return {**(info or {}), "suite": suite, "group": group.id, "provider": provider,
                "backend": split_name(provider)[1],
                "family": "adamw" if provider.startswith("adamw") else "sgd",
                "workload": wl.name, "shape": wl.label, "n_matrices": len(tracked),
                "tracked_numel": tracked_numel, "total_numel": wl.numel(),
                "spectrum": wl.spectrum, "dtype": group.dtype, "k": k, "rank": rank,
                "momentum": group.momentum, "note": ""}

    # 1. one provider instance per (provider, k)
    inst, rows = {}, {}
    for name in providers:
        for k in ([None] if split_name(name)[0] in K_FREE else group.ks):
            rank = k // 2 if k else r_max
            key = (name, k)
            rows[key] = base_row(name, k, rank)
            try:
                named = [(n, torch.nn.Parameter(W.clone())) for n, W in wl.params]
                inst[key] = make_provider(name, named, tracked, k=k, rank=rank, hp=hp)
            except Exception as e:  # reported in the row and the log, never silently dropped
                rows[key].update(status=f"error: {type(e).__name__}: {e}")
                log(f"  {name} k={k}: cannot build: {type(e).__name__}: {e}")

    def prepare_of(p):
        def prepare():
            if not getattr(p, "frozen_grads", False):  # a graph replays its static gradients
                wl.set_grads(p.params, p.steps)
            p.steps += 1
        return prepare

    def run_of(p):
        def run():
            with torch.no_grad():
                p.step()
        return run

    # 2. warm-up (a provider that fails here is reported and left out)
    for key, p in list(inst.items()):
        try:
            for _ in range(2 if p.stateless else warmup):
                prepare_of(p)()
                run_of(p)()
            rows[key]["warmup_steps"] = p.steps
        except Exception as e:
            rows[key].update(status=f"error: {type(e).__name__}: {e}")
            log(f"  {key[0]} k={key[1]}: step failed: {type(e).__name__}: {e}")
            del inst[key]
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    # 3. correctness before timing
    refs = _References(tracked, r_max)
    sgd, adamw = inst.get(("sgd", None)), inst.get(("adamw", None))
    for key, p in inst.items():
        row = rows[key]
        if p.tracks:
            if p.stateless and sgd is not None:
                weights = {n: sgd.by_name[n] for n in tracked}
                est = p.estimate_weights(weights)
                row["note"] = "estimate on the weights of provider sgd"
            else:
                weights = {n: p.by_name[n] for n in tracked}
                est = p.estimates()
            row["err_top_r"], row["err_top_r_s1"] = _err(est, refs(weights), tracked, row["rank"])
            row["err_bound"] = bounds.bound(split_name(key[0])[0], wl.spectrum)
        base = adamw if p.family == "adamw" else sgd
        if (base is not None and not p.stateless and base.steps == p.steps
                and not getattr(p, "frozen_grads", False)):  # a replay's gradients differ
            row["update_max_abs_diff"] = _max_abs_diff(p, base)

    # 4. timing
    tasks = {key: (prepare_of(p), run_of(p)) for key, p in inst.items()}
    samples = timing.time_interleaved(tasks, device, budget)
    peak = peak_gbps(device)
    for key, p in inst.items():
        med, p20, p80 = timing.quantiles(samples[key])
        rows[key].update(status="ok", n_samples=len(samples[key]), median_ms=med, p20_ms=p20,
                         p80_ms=p80, state_mb=p.state_bytes() / 2**20,
                         peak_mem_mb=timing.peak_step_memory(*tasks[key], device),
                         peak_mem_kind=("cuda max_memory_allocated during one step minus "
                                        "allocated before" if device.type == "cuda"
                                        else "NaN: not measured on CPU"))
        if device.type == "cuda":
            gbps = _bytes_floor(p, wl, group.momentum) / (med * 1e-3) / 1e9
            rows[key].update(gbps=gbps, pct_peak_bw=100 * gbps / peak)

    # 5. ratios to the anchors and to the provider's own untracked optimizer
    def med_of(name, k=None):
        row = rows.get((name, k))
        return row.get("median_ms", math.nan) if row else math.nan

    for (name, k), row in rows.items():
        t = row.get("median_ms", math.nan)
        for col, anchor in ANCHORS.items():
            row[col] = med_of(anchor, k if anchor not in K_FREE else None) / t
        # Over the provider's own untracked optimizer, captured likewise where it is.
        graph = GRAPH if split_name(name)[0].endswith(GRAPH) else ""
        row["overhead"] = t / med_of(("adamw" if row["family"] == "adamw" else "sgd") + graph)
        row.setdefault("status", "ok")
    elapsed = time.perf_counter() - t_start
    log(f"  ({elapsed:.0f} s, {len(tracked)} tracked matrices)")
    return list(rows.values())

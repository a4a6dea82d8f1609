"""Batched post-processing on a GPU: CuPy kernels vs the torch reference vs plain torch.linalg.

    python3 -m bench.bench_postprocess_gpu --out DIR      (or run(DIR) from bench.gpu_check)

For b in {1, 32, 256} matrices and k in {16, 32, 64}, with m = n = 4096 sketches Y (b, m, k),
Z (b, n, k) (fp32, a decaying spectrum) and orthonormal fp32 bases, times:

- ``cupy``: :func:`lowrank.kernels.cupy.postprocess.postprocess_cupy` (eager launches);
- ``cupy_graph``: the same captured once in a CUDA graph and replayed (no launch overhead);
- ``triton`` / ``triton_graph``: :func:`lowrank.kernels.triton.postprocess.postprocess_triton`,
  the Triton backend's own (without CuPy): the reference's torch ops with a Triton Jacobi
  eigensolver and refill, no host sync, eager and replayed;
- ``triton_gram_eigh``: its eigensolver alone on both sides' Gram matrices (one launch of 2b),
  beside ``linalg_eigh``;
- ``torch_reference``: :func:`lowrank.postprocess.postprocess_torch` (eigh + Cholesky-QR);
- ``linalg_eigh`` / ``linalg_qr`` / ``linalg_svdvals``: the bare batched torch.linalg call a user
  would write instead (float64, both sides), for scale.

And for the tracked matrices of whole models (op ``postprocess_shapes``: ResNet-18, 12 shapes;
GPT-2 small, 6 shapes; k = 16, each shape's matrices as one group; m, n empty, the model in
``check``): ``cupy_per_shape`` (one :func:`postprocess_cupy` per shape, as a step ran them
before 2026-11-23) against ``cupy_many`` (:func:`postprocess_cupy_many`: one launch sequence for
every shape), eager and captured (``_graph``).

Before timing, the CuPy and Triton results are checked against the reference (``check``: max
relative error of sigma over values >= 1e-3 sigma_1, and the orthonormality error of U). ``host_syncs`` counts the
synchronisations torch reports in one call under ``torch.cuda.set_sync_debug_mode("warn")``
(it sees torch's own syncs only, e.g. inside ``torch.linalg.eigh``; the CuPy kernels have none by
construction: no device-to-host copy, no data-dependent host branch). Times: median, 20th and
80th percentile in ms from ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run),
or from CUDA events around single calls when Triton is missing. One CSV row per measurement in
DIR/postprocess.csv with device name, library versions, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import traceback
from pathlib import Path

COLUMNS = ["op", "provider", "b", "m", "n", "k", "median_ms", "p20_ms", "p80_ms", "host_syncs",
           "check", "device_name", "torch_version", "cupy_version", "triton_version", "commit",
           "date", "error"]
BATCHES = (1, 32, 256)
KS = (16, 32, 64)
SVDVALS_MAX_BATCH = 32
M = N = 4096


def _versions() -> dict:
    """Device, library versions, commit and date: the same columns as bench/gpu_check.py."""
    from bench import gpu_check

    return {**gpu_check.environment(), "date": gpu_check.now()}


def _time_ms(fn) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        p20, p50, p80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=5, rep=200)
        return p50, p20, p80
    from bench import timing

    return timing.quantiles(timing.cuda_event_times(fn, 20))


def _inputs(b: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    decay = torch.logspace(0, -3, k, device=dev)  # a spectrum with structure, well above the floor
    Y = torch.randn(b, M, k, device=dev, generator=g) * decay
    Z = torch.randn(b, N, k, device=dev, generator=g) * decay
    U = torch.linalg.qr(torch.randn(b, M, k, device=dev, generator=g))[0]
    V = torch.linalg.qr(torch.randn(b, N, k, device=dev, generator=g))[0]
    return Y, Z, U, V


def run(out_dir, batches=BATCHES, ks=KS) -> Path:
    """Measure every (b, k) and provider; rows are appended to out_dir/postprocess.csv as they come."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_postprocess_gpu needs a CUDA GPU")
    from bench import timing
    from lowrank.backends import kernel_module
    from lowrank.postprocess import postprocess_torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "postprocess.csv"
    env = _versions()
    new = not path.exists()
    f = path.open("a", newline="")
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
        writer.writeheader()

    def write(**row):
        row = {**env, "op": "postprocess", "m": M, "n": N, **row}
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
        f.flush()

    try:
        pp_cupy = kernel_module("cupy", "postprocess").postprocess_cupy
    except Exception as exc:  # noqa: BLE001 (reported as a row, the torch rows still run)
        pp_cupy = None
        write(provider="cupy", error=f"{type(exc).__name__}: {exc}"[:500])
    try:
        triton_pp = kernel_module("triton", "postprocess")
        pp_triton, eigh_triton = triton_pp.postprocess_triton, triton_pp.gram_eigh_triton
    except Exception as exc:  # noqa: BLE001
        pp_triton = eigh_triton = None
        write(provider="triton", error=f"{type(exc).__name__}: {exc}"[:500])
    for b in batches:
        for k in ks:
            try:
                Y, Z, U, V = _inputs(b, k)
            except Exception as exc:  # noqa: BLE001
                write(provider="inputs", b=b, k=k, error=f"{type(exc).__name__}: {exc}"[:500])
                continue
            Y64, Z64 = Y.double(), Z.double()
            providers = {
                "torch_reference": lambda: postprocess_torch(Y, Z, U, V, seed=0, step=1),
                "linalg_eigh": lambda: (torch.linalg.eigh(Y64.mT @ Y64), torch.linalg.eigh(Z64.mT @ Z64)),
                "linalg_qr": lambda: (torch.linalg.qr(Y64), torch.linalg.qr(Z64)),
                "linalg_svdvals": lambda: (torch.linalg.svdvals(Y64), torch.linalg.svdvals(Z64)),
            }
            if b > SVDVALS_MAX_BATCH:
                # torch loops over the batch for matrices this tall: seconds per call, times the
                # ~10 calls of a measurement, would eat the device lease; the row says so.
                del providers["linalg_svdvals"]
                write(provider="linalg_svdvals", b=b, k=k,
                      error=f"skipped: batched svdvals timed for b <= {SVDVALS_MAX_BATCH} only")
            checks = {}
            ref = postprocess_torch(Y, Z, U, V, seed=0, step=1)
            for kernel, pp in (("cupy", pp_cupy), ("triton", pp_triton)):
                if pp is None:
                    continue
                call = functools.partial(pp, Y, Z, U, V, seed=0, step=1)
                try:
                    checks[kernel] = _check(call(), ref)
                    providers[kernel] = call
                    providers[kernel + "_graph"] = _graph_of(call)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    write(provider=kernel, b=b, k=k, error=f"{type(exc).__name__}: {exc}"[:500])
                    providers.pop(kernel, None)
            if pp_triton is not None:
                grams = torch.cat([Y64.mT @ Y64, Z64.mT @ Z64])
                providers["triton_gram_eigh"] = lambda: eigh_triton(grams)
            for name, fn in providers.items():
                try:
                    fn()  # warm-up (compilation, workspace)
                    syncs = timing.count_host_syncs(fn) if not name.endswith("_graph") else 0
                    med, p20, p80 = _time_ms(fn)
                    write(provider=name, b=b, k=k, median_ms=med, p20_ms=p20, p80_ms=p80,
                          host_syncs=syncs, check=checks.get(name.removesuffix("_graph"), ""))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    write(provider=name, b=b, k=k, error=f"{type(exc).__name__}: {exc}"[:500])
            del Y, Z, U, V, Y64, Z64, providers, ref
            torch.cuda.empty_cache()
    if pp_cupy is not None or pp_triton is not None:
        for model in MODELS:
            try:
                _run_shapes(model, write)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                write(op="postprocess_shapes", provider="shapes", m="", n="", k=16,
                      check=model, error=f"{type(exc).__name__}: {exc}"[:500])
    f.close()
    return path


MODELS = ("resnet", "gpt2")


def _model_groups(model: str, k: int):
    """(Y, Z, U, V, seed) per distinct tracked shape of a model's GPU layout (bench.workloads)."""
    import math

    import torch

    from bench import workloads

    layout = workloads.MODELS[model][1][0]
    counts: dict = {}
    for _, shape, kind in layout:
        if kind == "matrix":
            mn = (shape[0], math.prod(shape[1:]))
            if min(mn) >= k:
                counts[mn] = counts.get(mn, 0) + 1
    g = torch.Generator(device="cuda").manual_seed(1)
    decay = torch.logspace(0, -3, k, device="cuda")
    groups = []
    for seed, ((m, n), b) in enumerate(counts.items()):
        Y = torch.randn(b, m, k, device="cuda", generator=g) * decay
        Z = torch.randn(b, n, k, device="cuda", generator=g) * decay
        U = torch.linalg.qr(torch.randn(b, m, k, device="cuda", generator=g))[0].contiguous()
        V = torch.linalg.qr(torch.randn(b, n, k, device="cuda", generator=g))[0].contiguous()
        groups.append((Y, Z, U, V, seed))
    return groups


def _run_shapes(model: str, write, k: int = 16) -> None:
    """One post-processing of every tracked shape of ``model``: per shape vs in one sequence."""
    from lowrank.backends import kernel_module

    from lowrank.backends import cupy_available, triton_available

    groups = _model_groups(model, k)
    b = sum(g[0].shape[0] for g in groups)
    label = f"{model}: {len(groups)} shapes, {b} matrices"
    providers = {}
    if cupy_available():
        pp = kernel_module("cupy", "postprocess")
        providers["cupy_per_shape"] = lambda: [pp.postprocess_cupy(*g[:4], seed=g[4], step=1)
                                               for g in groups]
        providers["cupy_many"] = lambda: pp.postprocess_cupy_many(groups, step=1)
    if triton_available():
        tp = kernel_module("triton", "postprocess")
        providers["triton_per_shape"] = lambda: [tp.postprocess_triton(*g[:4], seed=g[4], step=1)
                                                 for g in groups]
    for name in list(providers):
        providers[name + "_graph"] = _graph_of(providers[name])
    for name, fn in providers.items():
        fn()
        med, p20, p80 = _time_ms(fn)
        write(op="postprocess_shapes", provider=name, m="", n="", b=b, k=k, median_ms=med,
              p20_ms=p20, p80_ms=p80, check=label)


def _check(ours, ref) -> str:
    """Largest relative error of sigma over values >= 1e-3 sigma_1 against the reference, and
    the orthonormality error of U."""
    import torch

    big = ref.sigma >= 1e-3 * ref.sigma[:, :1]
    rel = ((ours.sigma - ref.sigma).abs() / ref.sigma.clamp_min(1e-300))[big].max()
    Uq = ours.U.double()
    eye = torch.eye(Uq.shape[-1], device=Uq.device, dtype=torch.float64)
    orth = (Uq.mT @ Uq - eye).abs().max()
    return f"sigma rel err {rel.item():.1e}; U orth err {orth.item():.1e}"


def _graph_of(fn):
    """``fn`` captured once in a CUDA graph (after an eager warm-up); returns graph.replay."""
    from bench.providers import capture

    return capture(fn, warmup=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.bench_postprocess_gpu")
    parser.add_argument("--out", required=True, help="folder for postprocess.csv")
    args = parser.parse_args(argv)
    print(run(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

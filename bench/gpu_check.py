"""Everything to run on a GPU machine, in parts that each fit a 10-minute command.

    python3 -m bench.gpu_check --out DIR [--parts smoke,tests,kernels,postprocess,suite]

Parts (default: all, in this order; ``make gpu-check`` runs them all in one command):

0. ``smoke`` (about a minute): compiles and launches every kernel once on small shapes (Triton
   fused pass and sketch; CuPy fused pass and post-processing at k = 64, which needs > 48 KB of
   shared memory; one SpectralSGD step per backend) and checks each against the torch
   reference. DIR/smoke.json says what ran, what failed and why. Run it first, and each part as
   its own command: a kernel that faults poisons the CUDA context of its process, and every
   later part of the same command would fail with it.
1. ``tests``: ``pytest`` of each of tests/test_triton_gpu.py, test_triton_post_gpu.py,
   test_cupy_gpu.py and test_eager_gpu.py in its own process (a fault in one cannot fail the
   others), each
   streaming its log to DIR as it runs,
   with junit XML and a summary.
2. ``kernels``: kernel benchmarks (fp32, cold L2) of ``fused_sgd_sketch`` and ``sketch`` on 4096^2, 8192^2 and
   4096 x 16384 for k in {0 (tracking off), 8, 16, 32, 64}, without and with momentum, beside the
   anchors torch.optim.SGD(fused=True), foreach SGD, torch.linalg.svdvals and torch.svd_lowrank;
   plus a small tile-size sweep of the Triton kernel. One CSV row per measurement in
   DIR/kernels.csv, written as it is measured; a benchmark that fails writes a row with its error
   and the run goes on.

Columns: op, provider, m, n, k, dtype, momentum, median_ms, p20_ms, p80_ms, gbps, pct_peak_bw,
peak_mem_mb, ratio_vs_fused_sgd, device_name, torch_version, triton_version, cupy_version, commit,
date, check, error. ``gbps`` counts the bytes the op must move (update: 12 B per fp32 element, 20
with momentum; sketch: 4; plus the thin bases and sketches); ``peak_mem_mb`` is the memory the op
allocates beyond its inputs; ``ratio_vs_fused_sgd`` is median_ms over the median of
torch.optim.SGD(fused=True) on the same shape and momentum; ``check`` is the correctness check run
before timing (max error against the torch reference, relative to the stated bound).

Timing: ``triton.testing.do_bench`` (CUDA events; it zeroes a 256 MB buffer before every run, so
L2 is cold), 20th/50th/80th percentiles. Ops that take seconds are timed with CUDA events instead:
``svdvals`` once, on 4096^2 only (a full SVD of 8192^2 costs minutes of a short device lease).

3. ``postprocess``: bench/bench_postprocess_gpu.py (DIR/postprocess.csv).
4. ``suite``: the end-to-end providers of ``python -m bench`` on CUDA (``--suite quick`` by
   default; the full one does not fit in 10 minutes: run it in parts with ``--workloads``,
   see bench/README.md).

Nothing GPU-related is imported at module import time: ``--help`` and the no-CUDA message work on
any machine. With a 10-minute limit per command, run the parts one per command, each with its own
``--out`` (``--no-sweep`` or ``--quick`` shorten the kernel benchmarks further); every part
writes its rows as they are measured, so a part that is stopped still leaves them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COLUMNS = ["op", "provider", "m", "n", "k", "dtype", "momentum", "median_ms", "p20_ms", "p80_ms",
           "gbps", "pct_peak_bw", "peak_mem_mb", "ratio_vs_fused_sgd", "device_name",
           "torch_version", "triton_version", "cupy_version", "commit", "date", "check", "error"]

SHAPES = [(4096, 4096), (8192, 8192), (4096, 16384)]
KS = [0, 8, 16, 32, 64]
MOMENTA = [0.0, 0.9]
PARTS = ("smoke", "tests", "kernels", "postprocess", "suite", "logcost")
GPU_TEST_FILES = ("tests/test_triton_gpu.py", "tests/test_triton_post_gpu.py",
                  "tests/test_cupy_gpu.py", "tests/test_eager_gpu.py")
DEV = "cuda"  # a module constant so the pipeline can be smoke-tested on the CPU interpreter
LR = 1e-6  # tiny: W is updated in place by every timed run and must stay finite and O(1)

# Vendor HBM bandwidth (GB/s), matched as substrings of the device name, most specific first.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3), named "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python3 -m bench.gpu_check",
        description="Run the GPU smoke checks, tests and benchmarks in parts; write smoke.json, "
                    "junit XML and logs, DIR/kernels.csv, postprocess.csv, the suite's rows and "
                    "summary.md.")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in order (default: all: {','.join(PARTS)})")
    p.add_argument("--skip-tests", action="store_true", help="leave out the tests part")
    p.add_argument("--skip-bench", action="store_true",
                   help="leave out the kernels, postprocess, suite and logcost parts")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="end-to-end suite of the suite part (default quick; full takes > 10 min)")
    p.add_argument("--workloads", default="",
                   help="comma-separated glob patterns of the suite's workloads or group ids, to "
                        "run the full suite in parts, e.g. '8192x8192/*,4096x16384/*' or "
                        "'mlp,gpt2,resnet,digits'")
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton tile-size sweep")
    p.add_argument("--quick", action="store_true",
                   help="4096^2 only, k in {0, 16, 64}: a smoke run of the whole pipeline")
    p.add_argument("--pytest-timeout", type=int, default=240,
                   help="seconds before each of the two pytest runs is stopped (default 240)")
    p.add_argument("--pytest-args", default="",
                   help="extra arguments for pytest, e.g. \"-k 'not 2_to_31'\"")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.skip_tests:
        parts = [x for x in parts if x != "tests"]
    if args.skip_bench:
        parts = [x for x in parts if x not in ("kernels", "postprocess", "suite", "logcost")]
    args.parts = parts
    return args


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: the column says so
        return "none"


def git_commit() -> str:
    """LOWRANK_COMMIT where set (a tree copied to the GPU machine carries a stale .git), else
    git's HEAD."""
    if os.environ.get("LOWRANK_COMMIT"):
        return os.environ["LOWRANK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return "unknown"


def environment() -> dict:
    import torch

    return {
        "device_name": torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cupy_version": _version("cupy"),
        "commit": git_commit(),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# 1. GPU tests
# ------------------------------------------------------------------------------------------------

def run_gpu_tests(out: Path, timeout: int, extra: str) -> dict:
    """Each GPU test file in its own pytest process, its log streamed to DIR as it runs."""
    results = {}
    for test_file in GPU_TEST_FILES:
        results[Path(test_file).stem] = _run_pytest(out, test_file, timeout, extra)
    codes = [r["returncode"] for r in results.values()]
    summary = {"returncode": 0 if all(c == 0 for c in codes) else next(c for c in codes if c != 0),
               "runs": results}
    (out / "pytest-gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_pytest(out: Path, test_file: str, timeout: int, extra: str) -> dict:
    stem = Path(test_file).stem
    junit, log = out / f"{stem}.xml", out / f"{stem}.log"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real GPU kernels, not the interpreter
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "pytest", test_file, f"--junitxml={junit}", "-rA",
           "-p", "no:cacheprovider", "-o", "junit_logging=all"]
    if extra:
        import shlex

        cmd += shlex.split(extra)
    print("running:", " ".join(cmd), flush=True)
    with log.open("w") as f:  # streamed: a stopped command still leaves the log so far
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            f.write(f"\n[gpu_check] pytest stopped after {timeout} s\n")
    summary = {"returncode": rc, "junit": str(junit), "log": str(log), **_junit_counts(junit)}
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-25:])
    print(tail, flush=True)
    return summary


def _junit_counts(path: Path) -> dict:
    try:
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        keys = ("tests", "failures", "errors", "skipped")
        return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    except Exception as exc:  # noqa: BLE001
        return {"junit_error": repr(exc)}


# ------------------------------------------------------------------------------------------------
# 2. Benchmarks
# ------------------------------------------------------------------------------------------------

class Writer:
    """Appends one row per measurement and flushes, so a crash later loses nothing."""

    def __init__(self, path: Path, env: dict):
        self.env = env
        self.f = path.open("w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        self.w.writeheader()
        self.f.flush()
        self.rows = []

    def write(self, **row):
        full = {c: "" for c in COLUMNS}
        full.update(self.env)
        full["date"] = now()
        full.update({k: v for k, v in row.items() if k in full})
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_peak_bw", "peak_mem_mb",
                    "ratio_vs_fused_sgd"):
            if isinstance(full[key], float):
                full[key] = f"{full[key]:.6g}"
        self.w.writerow(full)
        self.f.flush()
        self.rows.append(full)
        status = full["error"] or f"{full['median_ms']} ms, {full['gbps']} GB/s"
        print(f"  {full['op']:>16} {full['provider']:<34} {full['m']}x{full['n']} k={full['k']} "
              f"mom={full['momentum']}: {status}", flush=True)


def peak_bandwidth_gbps(name: str):
    """(GB/s, source): the vendor figure for known GPUs, else a measured device-to-device copy."""
    for key, value in PEAK_GBPS:
        if key in name:
            return value, f"vendor figure for {key}"
    return measured_copy_gbps(), "measured device-to-device copy"


def measured_copy_gbps() -> float:
    import torch
    import triton

    src = torch.empty(2**28 if DEV == "cuda" else 2**20, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_ms(fn, slow=False, runs=3):
    """(median, p20, p80) in ms. Cold L2: do_bench zeroes a 256 MB buffer before each run."""
    import triton

    if not slow:
        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    # Seconds-long ops (already warmed up by the memory probe): a few runs, CUDA events.
    from bench import timing

    return timing.quantiles(timing.cuda_event_times(fn, runs))


def extra_memory_mb(fn) -> float:
    """Memory one call allocates beyond what exists before it (workspaces, outputs), in MB."""
    import torch

    from bench import timing

    return timing.peak_step_memory(lambda: None, fn, torch.device("cuda"))


def update_bytes(m, n, k, momentum, elem=4):
    """Bytes an SGD step (+ sketch) must move: W read+write, G read, buf read+write, bases."""
    per = 3 + (2 if momentum else 0)
    thin = (m + n) * k * 4 * 2 if k else 0  # U, V read; Y, Z written
    return m * n * elem * per + thin


def sketch_bytes(m, n, k, elem=4):
    return m * n * elem + (m + n) * k * 4 * 2


class Bench:
    def __init__(self, writer: Writer, peak: float):
        self.writer = writer
        self.peak = peak
        self.anchor = {}  # (m, n, momentum) -> median ms of torch.optim.SGD(fused=True)

    def measure(self, op, provider, m, n, k, momentum, fn, nbytes, *, slow=False, check="",
                anchor_key=None, runs=3):
        row = dict(op=op, provider=provider, m=m, n=n, k=k, dtype="float32", momentum=momentum,
                   check=check)
        try:
            # For seconds-long ops the memory probe doubles as the warm-up run.
            mem = extra_memory_mb(fn)
            med, p20, p80 = time_ms(fn, slow=slow, runs=runs)
            gbps = nbytes / (med * 1e-3) / 1e9
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80, gbps=gbps,
                       pct_peak_bw=100 * gbps / self.peak, peak_mem_mb=mem)
            if anchor_key is not None:
                self.anchor[anchor_key] = med
            ref = self.anchor.get((m, n, momentum))
            if ref:
                row["ratio_vs_fused_sgd"] = med / ref
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other rows
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            traceback.print_exc()
        self.writer.write(**row)

    def error_row(self, op, provider, m, n, k, momentum, exc):
        self.writer.write(op=op, provider=provider, m=m, n=n, k=k, dtype="float32",
                          momentum=momentum,
                          error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])


def _cupy_fused():
    """The CuPy launcher; None when CuPy is not installed. Raises when its kernels fail to load
    (the caller turns that into error rows)."""
    from lowrank import backends

    if not backends.cupy_available():
        return None
    return backends.kernel_module("cupy", "fused_sgd_sketch").fused_sgd_sketch_cupy


def fused_errors(fn_kernel, m, n, k, momentum) -> tuple[float, float | None, float | None]:
    """One step of ``fn_kernel`` from the same state as the torch reference: the weights' max
    difference relative to max |W| + 1, and the sketches' normwise relative errors (None for
    k = 0, a plain update)."""
    import torch

    from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch, sgd_update_torch

    g = torch.Generator(device=DEV).manual_seed(0)
    W = torch.randn(m, n, device=DEV, generator=g)
    G = torch.randn(m, n, device=DEV, generator=g)
    B = torch.randn(m, n, device=DEV, generator=g) if momentum else None
    U = torch.randn(1, m, k, device=DEV, generator=g) if k else None
    V = torch.randn(1, n, k, device=DEV, generator=g) if k else None
    W2, B2 = W.clone(), (B.clone() if B is not None else None)
    out, _ = fn_kernel(W, G, B, U, V, lr=0.01, momentum=momentum)
    if k:
        ref, _ = fused_sgd_sketch_torch(W2, G, B2, U, V, lr=0.01, momentum=momentum)
    else:
        sgd_update_torch(W2, G, B2, lr=0.01, momentum=momentum)
        ref = None
    werr = (W - W2).abs().max().item() / (W2.abs().max().item() + 1)
    if not k:
        return werr, None, None
    # Bound gamma_n |W||V| ~ n * 2^-24 * ||W||*||V|| scale; report the normwise error.
    ey = (torch.linalg.norm(out.Y - ref.Y) / torch.linalg.norm(ref.Y)).item()
    ez = (torch.linalg.norm(out.Z - ref.Z) / torch.linalg.norm(ref.Z)).item()
    return werr, ey, ez


def _check_fused(fn_kernel, m, n, k, momentum) -> str:
    """Correctness before timing: one step from the same state against the torch reference."""
    werr, ey, ez = fused_errors(fn_kernel, m, n, k, momentum)
    msg = f"W rel err {werr:.1e}"
    if k:
        msg += f"; Y rel err {ey:.1e}; Z rel err {ez:.1e}"
        ok = werr < 1e-5 and ey < 1e-4 and ez < 1e-4
    else:
        ok = werr < 1e-5
    return ("ok " if ok else "FAILED ") + msg


def run_benchmarks(out: Path, quick: bool, sweep: bool) -> None:
    import torch
    import triton  # noqa: F401 - fail early and clearly if Triton is missing

    from lowrank import backends
    from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch
    from lowrank.sketch import sketch_torch

    sk = backends.kernel_module("triton", "sketch")
    fs = backends.kernel_module("triton", "fused_sgd_sketch")
    env = environment()
    peak, source = peak_bandwidth_gbps(env["device_name"])
    (out / "environment.json").write_text(json.dumps(
        {**env, "peak_gbps": peak, "peak_source": source, "date": now()}, indent=2))
    print(f"device {env['device_name']}: peak {peak:.0f} GB/s ({source})", flush=True)
    writer = Writer(out / "kernels.csv", env)
    bench = Bench(writer, peak)
    torch.backends.cuda.matmul.allow_tf32 = False  # anchors in true fp32, like our fp32 mode

    try:
        copy_gbps = measured_copy_gbps()
        writer.write(op="copy", provider="torch", m=2**14, n=2**14, k=0, dtype="float32",
                     gbps=copy_gbps, pct_peak_bw=100 * copy_gbps / peak)
    except Exception as exc:  # noqa: BLE001
        bench.error_row("copy", "torch", 2**14, 2**14, 0, 0.0, exc)

    try:
        cupy_fn = _cupy_fused()
        cupy_err = None
    except Exception as exc:  # noqa: BLE001
        cupy_fn, cupy_err = None, exc

    shapes = SHAPES[:1] if quick else SHAPES
    ks = [0, 16, 64] if quick else KS
    for m, n in shapes:
        gen = torch.Generator(device=DEV).manual_seed(0)
        try:
            W = torch.randn(m, n, device=DEV, generator=gen)
            G = torch.randn(m, n, device=DEV, generator=gen) * 1e-3
        except Exception as exc:  # noqa: BLE001
            bench.error_row("setup", "torch", m, n, 0, 0.0, exc)
            continue
        for momentum in MOMENTA:
            # Anchors first, so that every later row of this shape gets its ratio.
            for kind in ("fused", "foreach"):
                try:
                    p = torch.nn.Parameter(W.clone())
                    p.grad = G.clone()
                    opt = torch.optim.SGD([p], lr=LR, momentum=momentum, **{kind: True})
                    opt.step()  # creates the momentum buffer: time the steady state
                    bench.measure("sgd_step", f"torch_sgd_{kind}", m, n, 0, momentum, opt.step,
                                  update_bytes(m, n, 0, momentum),
                                  anchor_key=(m, n, momentum) if kind == "fused" else None)
                    del p, opt
                except Exception as exc:  # noqa: BLE001
                    bench.error_row("sgd_step", f"torch_sgd_{kind}", m, n, 0, momentum, exc)
            for k in ks:
                _bench_fused(bench, fs, fused_sgd_sketch_torch, cupy_fn, cupy_err, W, G, m, n,
                             k, momentum)
        for k in [k for k in ks if k]:
            _bench_sketch(bench, sk, sketch_torch, W, m, n, k)
        _bench_anchors_spectrum(bench, W, m, n)
        del W, G
        torch.cuda.empty_cache()

    if sweep and not quick:
        _sweep(bench, fs)
    writer.f.close()


def _bases(m, n, k):
    from lowrank.sketch import init_bases

    U, V = init_bases(m, n, k, seed=0, device=DEV)
    return U, V


def _bench_fused(bench, fs, ref_fn, cupy_fn, cupy_err, W0, G, m, n, k, momentum):
    import torch

    U, V = _bases(m, n, k) if k else (None, None)
    op = "fused_sgd_sketch" if k else "sgd_step"
    providers = [("triton", {}), ]
    if k in (16, 64):
        providers.append(("triton_deterministic", {"deterministic": True}))
    for name, opts in providers:
        try:
            def kernel(*a, opts=opts, **kw):
                return fs.fused_sgd_sketch_triton(*a, **kw, **opts)

            check = _check_fused(kernel, min(m, 2048), min(n, 2048), k, momentum)
            W = W0.clone()
            state = {"buf": torch.zeros_like(W) if momentum else None}

            def step(W=W, opts=opts, state=state):
                _, state["buf"] = fs.fused_sgd_sketch_triton(W, G, state["buf"], U, V, lr=LR,
                                                             momentum=momentum, **opts)

            bench.measure(op, name, m, n, k, momentum, step, update_bytes(m, n, k, momentum),
                          check=check)
            del W, state
        except Exception as exc:  # noqa: BLE001
            bench.error_row(op, name, m, n, k, momentum, exc)
    if k:  # the unfused torch path: torch's update, then two matmuls and the row norms
        try:
            W = W0.clone()
            state = {"buf": torch.zeros_like(W) if momentum else None}

            def ref_step(W=W):
                _, state["buf"] = ref_fn(W, G, state["buf"], U, V, lr=LR, momentum=momentum)

            bench.measure(op, "torch_reference", m, n, k, momentum, ref_step,
                          update_bytes(m, n, k, momentum))
            del W, state
        except Exception as exc:  # noqa: BLE001
            bench.error_row(op, "torch_reference", m, n, k, momentum, exc)
    if cupy_fn is None and cupy_err is None:
        return  # CuPy kernels absent: no row
    try:
        if cupy_err is not None:
            raise cupy_err
        check = _check_fused(cupy_fn, min(m, 2048), min(n, 2048), k, momentum)
        W = W0.clone()
        state = {"buf": torch.zeros_like(W) if momentum else None}

        def cupy_step(W=W):
            _, state["buf"] = cupy_fn(W, G, state["buf"], U, V, lr=LR, momentum=momentum)

        bench.measure(op, "cupy", m, n, k, momentum, cupy_step, update_bytes(m, n, k, momentum),
                      check=check)
    except Exception as exc:  # noqa: BLE001
        bench.error_row(op, "cupy", m, n, k, momentum, exc)


def _bench_sketch(bench, sk, ref_fn, W, m, n, k):
    import torch

    U, V = _bases(m, n, k)
    for name, fn in (("triton", lambda: sk.sketch_triton(W, U, V)),
                     ("triton_tf32x3", lambda: sk.sketch_triton(W, U, V, precision="tf32x3")),
                     ("triton_tf32", lambda: sk.sketch_triton(W, U, V, precision="tf32")),
                     ("torch_reference", lambda: ref_fn(W, U, V))):
        try:
            check = ""
            if name.startswith("triton"):
                out, ref = fn(), ref_fn(W, U, V)
                ey = (torch.linalg.norm(out.Y - ref.Y) / torch.linalg.norm(ref.Y)).item()
                ez = (torch.linalg.norm(out.Z - ref.Z) / torch.linalg.norm(ref.Z)).item()
                check = f"Y rel err {ey:.1e}; Z rel err {ez:.1e} vs torch fp32"
            bench.measure("sketch", name, m, n, k, 0.0, fn, sketch_bytes(m, n, k), check=check)
        except Exception as exc:  # noqa: BLE001
            bench.error_row("sketch", name, m, n, k, 0.0, exc)


def _bench_anchors_spectrum(bench, W, m, n):
    import torch

    if (m, n) == SHAPES[0]:  # larger full SVDs cost minutes each: 4096^2 only, timed once
        try:
            bench.measure("svdvals", "torch_linalg", m, n, 0, 0.0,
                          lambda: torch.linalg.svdvals(W), sketch_bytes(m, n, 0), slow=True,
                          runs=1)
        except Exception as exc:  # noqa: BLE001
            bench.error_row("svdvals", "torch_linalg", m, n, 0, 0.0, exc)
    try:
        # torch.svd_lowrank(q=k, niter=2): five passes over W, the usual randomized estimate.
        bench.measure("svd_lowrank", "torch", m, n, 16, 0.0,
                      lambda: torch.svd_lowrank(W, q=16, niter=2), 5 * sketch_bytes(m, n, 16),
                      slow=True)
    except Exception as exc:  # noqa: BLE001
        bench.error_row("svd_lowrank", "torch", m, n, 16, 0.0, exc)


def _sweep(bench, fs):
    """Tile sizes of the fused kernel on 8192^2 with momentum: input for launch_config's choice.

    k = 0 is the plain update (tracking off), where only the tile shape and warps matter.
    """
    import torch

    m = n = 8192
    gen = torch.Generator(device=DEV).manual_seed(1)
    W = torch.randn(m, n, device=DEV, generator=gen)
    G = torch.randn(m, n, device=DEV, generator=gen) * 1e-3
    buf = torch.zeros_like(W)
    # (128, 32, 8) is the default for k <= 64; splits=1 shows what the column splits buy.
    configs = [(128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 64, 8), (128, 64, 8),
               (64, 16, 8), (32, 32, 4)]
    untracked = [(32, 128, 4), (16, 256, 4), (64, 64, 4), (16, 128, 4), (32, 256, 8), (64, 128, 8)]
    for k in (0, 16, 64):
        U, V = _bases(m, n, k) if k else (None, None)
        for bm, bn, nw in (configs if k else untracked):
            for splits in ((None, 1) if (k and (bm, bn, nw) == (128, 32, 8)) else (None,)):
                name = f"triton[bm={bm},bn={bn},nw={nw},splits={splits or 'auto'}]"
                try:
                    def step(bm=bm, bn=bn, nw=nw, splits=splits, U=U, V=V):
                        fs.fused_sgd_sketch_triton(W, G, buf, U, V, lr=LR, momentum=0.9,
                                                   block_m=bm, block_n=bn, num_warps=nw,
                                                   splits=splits)
                    bench.measure("fused_sgd_sketch" if k else "sgd_step", name, m, n, k, 0.9,
                                  step, update_bytes(m, n, k, 0.9))
                except Exception as exc:  # noqa: BLE001
                    bench.error_row("fused_sgd_sketch" if k else "sgd_step", name, m, n, k, 0.9,
                                    exc)


def write_summary(out: Path, tests: dict | None) -> None:
    lines = ["# gpu_check summary", ""]
    smoke = out / "smoke.json"
    if smoke.exists():
        checks = json.loads(smoke.read_text())["checks"]
        lines += ["## smoke", "", "| check | ok | result or error | s |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | "
                  f"{c.get('result') or c.get('error', '')} | {c['seconds']} |" for c in checks]
        lines.append("")
    if tests is not None:
        lines += ["## GPU tests", "", "```", json.dumps(tests, indent=2), "```", ""]
    csv_path = out / "kernels.csv"
    if csv_path.exists():
        with csv_path.open() as f:
            rows = list(csv.DictReader(f))
        errors = [r for r in rows if r["error"]]
        lines += ["## benchmarks", "", f"{len(rows)} rows, {len(errors)} with errors (see kernels.csv)",
                  "",
                  "| op | provider | m x n | k | mom | median ms | GB/s | % peak | x fused SGD |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["error"] or r["provider"].startswith("triton["):
                continue
            lines.append(f"| {r['op']} | {r['provider']} | {r['m']}x{r['n']} | {r['k']} | "
                         f"{r['momentum']} | {r['median_ms']} | {r['gbps']} | {r['pct_peak_bw']} "
                         f"| {r['ratio_vs_fused_sgd']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _run_postprocess_bench(out: Path) -> None:
    from bench.bench_postprocess_gpu import run

    run(out)


def _run_log_cost(out: Path, workloads=("mlp", "gpt2", "resnet"), rounds: int = 200) -> None:
    """bench.log_cost on the GPU (default backend): the models' steps with and without a
    RunLog, into DIR/log_cost.json and DIR/log_cost.txt."""
    import torch

    from bench import env, log_cost

    device = torch.device(DEV)
    lines, found = [], {"info": env.run_info(device)}

    def say(line):
        print(line, flush=True)
        lines.append(line)
    for name in workloads:
        found[name] = log_cost.measure(name, device, "auto", rounds, log=say)
    (out / "log_cost.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    (out / "log_cost.txt").write_text("\n".join(lines) + "\n")


def _run_end_to_end_suite(out: Path, suite: str, workloads: str = "") -> None:
    from bench import report, results, suites

    patterns = [w.strip() for w in workloads.split(",") if w.strip()] or None
    rows, csv_path = suites.run_suite("cuda", suite=suite, out_dir=out, workloads=patterns)
    df = results.read_rows([csv_path])
    report.write_report(df[df["run_id"] == rows[0]["run_id"]], out)


# ------------------------------------------------------------------------------------------------
# 0. Smoke: every kernel compiled and launched once, checked against the torch reference
# ------------------------------------------------------------------------------------------------

def smoke_checks():
    """(name, fn) pairs; each fn runs one small launch and returns a short result string, or
    raises. Small shapes with every code path the real runs take (masks, k padding, > 48 KB of
    shared memory for the CuPy post-processing at k = 64)."""
    import torch

    from lowrank import backends
    from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch
    from lowrank.postprocess import postprocess_torch
    from lowrank.sketch import sketch_torch

    m, n, k = 300, 200, 16

    def sync():  # a fault shows up here, inside the check that caused it
        if torch.device(DEV).type == "cuda":
            torch.cuda.synchronize()

    def data(seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        W = torch.randn(m, n, device=DEV, generator=g)
        G = torch.randn(m, n, device=DEV, generator=g) * 1e-2
        return W, G, *_bases(m, n, k)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    def fused(backend):
        def run():
            fn = getattr(backends.kernel_module(backend, "fused_sgd_sketch"),
                         f"fused_sgd_sketch_{backend}")
            W, G, U, V = data()
            W2 = W.clone()
            out, _ = fn(W, G, None, U, V, lr=0.1, momentum=0.9)
            ref, _ = fused_sgd_sketch_torch(W2, G, None, U, V, lr=0.1, momentum=0.9)
            sync()
            err = max(rel(out.Y, ref.Y), rel(out.Z, ref.Z), rel(W, W2))
            if not err < 1e-4:
                raise AssertionError(f"max relative error {err:.1e} against the torch reference")
            return f"max rel err {err:.1e}"
        return run

    def sketch_triton():
        W, _, U, V = data(1)
        out = backends.sketch(W.unsqueeze(0), U, V, backend="triton")
        ref = sketch_torch(W, U, V)
        err = max(rel(out.Y, ref.Y), rel(out.Z, ref.Z), rel(out.fro2, ref.fro2))
        if not err < 1e-4:
            raise AssertionError(f"max relative error {err:.1e}")
        return f"max rel err {err:.1e}"

    def postprocess_cupy():
        pp = backends.kernel_module("cupy", "postprocess").postprocess_cupy
        kk = 64
        g = torch.Generator(device=DEV).manual_seed(2)
        Y = torch.randn(2, 512, kk, device=DEV, generator=g)
        Z = torch.randn(2, 384, kk, device=DEV, generator=g)
        U, V = _bases(512, 384, kk)
        U, V = U.expand(2, -1, -1).contiguous(), V.expand(2, -1, -1).contiguous()
        ours = pp(Y, Z, U, V, seed=0, step=1)
        ref = postprocess_torch(Y, Z, U, V, seed=0, step=1)
        sync()
        err = rel(ours.sigma, ref.sigma)
        if not err < 1e-6:
            raise AssertionError(f"sigma max relative error {err:.1e}")
        return f"k=64 sigma max rel err {err:.1e}"

    def spectral_sgd(backend):
        def run():
            import lowrank

            p = torch.nn.Parameter(torch.randn(256, 192, device=DEV))
            opt = lowrank.SpectralSGD([("w", p)], lr=1e-3, momentum=0.9, rank=4, sketch_rank=8,
                                      backend=backend)
            for _ in range(3):
                p.grad = torch.randn_like(p) * 1e-2
                opt.step()
            sigma = opt.spectra()["w"].sigma
            if not bool(torch.isfinite(sigma).all()):
                raise AssertionError("non-finite estimates")
            return f"sigma_1 {float(sigma[0]):.4g}"
        return run

    def spectral_sgd_graph():
        """The tracked step captured in a CUDA graph, replayed against the same eager steps."""
        import lowrank

        runs = []
        for graphed in (False, True):
            g = torch.Generator(device=DEV).manual_seed(5)
            p = torch.nn.Parameter(torch.randn(256, 192, device=DEV, generator=g))
            grads = [torch.randn(256, 192, device=DEV, generator=g) * 1e-2 for _ in range(6)]
            opt = lowrank.SpectralSGD([("w", p)], lr=1e-3, momentum=0.9, rank=4, sketch_rank=8,
                                      backend="cupy")
            p.grad = torch.zeros_like(p)
            for i in range(6):
                p.grad.copy_(grads[i])
                if not graphed or i < 2:
                    opt.step()
                    continue
                if i == 2:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        opt.step()
                graph.replay()
            sync()
            runs.append((p.detach().clone(), opt.spectra()["w"], opt.steps))
        (w0, s0, n0), (w1, s1, n1) = runs
        if not torch.equal(w0, w1) or n0 != n1 or s0.step != s1.step:
            raise AssertionError(f"replays differ from eager steps: weights equal "
                                 f"{torch.equal(w0, w1)}, steps {n0} vs {n1}")
        err = float(((s1.sigma - s0.sigma).abs() / s0.sigma[0]).max())
        if err > 1e-5:
            raise AssertionError(f"sigma differs by {err:.2e} of sigma_1")
        return f"{n1} steps, sigma max diff {err:.1e} of sigma_1"

    return [("triton fused_sgd_sketch", fused("triton")), ("triton sketch", sketch_triton),
            ("cupy fused_sgd_sketch", fused("cupy")), ("cupy postprocess k=64", postprocess_cupy),
            ("SpectralSGD triton", spectral_sgd("triton")), ("SpectralSGD cupy", spectral_sgd("cupy")),
            ("SpectralSGD cupy captured in a CUDA graph", spectral_sgd_graph)]


def run_smoke(out: Path) -> dict:
    import time

    results = []
    for name, fn in smoke_checks():
        t0 = time.perf_counter()
        try:
            results.append({"check": name, "ok": True, "result": fn()})
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the others
            results.append({"check": name, "ok": False,
                            "error": f"{type(exc).__name__}: {exc}"[:500],
                            "traceback": traceback.format_exc()[-3000:]})
        results[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        r = results[-1]
        print(f"smoke: {name}: {'ok ' + r['result'] if r['ok'] else 'FAILED ' + r['error']} "
              f"({r['seconds']} s)", flush=True)
    summary = {"ok": all(r["ok"] for r in results), "checks": results, "date": now()}
    (out / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_check: no CUDA device is available (torch.cuda.is_available() is "
              "False); run it on the GPU machine. Nothing was measured.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench.gpu_check: TRITON_INTERPRET=1 is set; unset it to time the compiled "
              "kernels.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests, failed = None, []
    jobs = {
        "smoke": lambda: run_smoke(out)["ok"] or failed.append("smoke"),
        "tests": None,
        # Kernel rows, then the CuPy post-processing rows, then the end-to-end providers
        # (optimizer steps beside torch.linalg, with accuracy): one failure keeps the others.
        "kernels": lambda: run_benchmarks(out, args.quick, sweep=not args.no_sweep),
        "postprocess": lambda: _run_postprocess_bench(out),
        "suite": lambda: _run_end_to_end_suite(out, args.suite, args.workloads),
        "logcost": lambda: _run_log_cost(out),
    }
    for part in args.parts:
        print(f"bench.gpu_check: part {part}", flush=True)
        if part == "tests":
            tests = run_gpu_tests(out, args.pytest_timeout, args.pytest_args)
            if tests["returncode"] != 0:
                failed.append("tests")
            continue
        try:
            jobs[part]()
        except Exception:  # noqa: BLE001 - still write what was measured and the summary
            print(f"bench.gpu_check: the {part} part failed:", file=sys.stderr)
            traceback.print_exc()
            failed.append(part)
    write_summary(out, tests)
    print(f"results in {out}" + (f"; failed parts: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

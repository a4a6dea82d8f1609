"""The tidy result rows: column order, CSV files (append), and reading them back."""

from __future__ import annotations

import csv
import math
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = [
    # what was measured
    "run_id", "suite", "group", "status", "provider", "backend", "family", "workload", "shape",
    "n_matrices", "tracked_numel", "total_numel", "spectrum", "dtype", "k", "rank", "momentum",
    "warmup_steps",
    # time per optimizer step (ms) and ratios to the anchors of the same group (same process)
    "n_samples", "median_ms", "p20_ms", "p80_ms", "overhead", "vs_sgd", "vs_sgd_svdvals",
    "vs_sgd_svd_lowrank",
    # accuracy beside the time: max over tracked matrices and the top `rank` values of
    # |estimate - exact| / exact (err_top_r) and / exact sigma_1 (err_top_r_s1), exact = float64
    # torch.linalg.svdvals of the same weights; err_bound is the bound the tests hold it to
    "err_top_r", "err_top_r_s1", "err_bound", "update_max_abs_diff",
    # memory and bandwidth
    "state_mb", "peak_mem_mb", "peak_mem_kind", "gbps", "pct_peak_bw",
    # where and with what; how fast the machine ran before the group (bench.env.machine_probe)
    "device", "device_type", "threads", "probe_matmul_gflops", "probe_copy_gbps",
    "omp_wait_policy", "torch_version", "lowrank_version", "python_version", "triton_version",
    "cupy_version", "cuda_version", "commit", "commit_dirty", "date_utc", "note",
]

NUMERIC = {"n_matrices", "tracked_numel", "total_numel", "k", "rank", "momentum", "warmup_steps",
           "n_samples", "median_ms", "p20_ms", "p80_ms", "overhead", "vs_sgd", "vs_sgd_svdvals",
           "vs_sgd_svd_lowrank", "err_top_r", "err_top_r_s1", "err_bound", "update_max_abs_diff",
           "state_mb", "peak_mem_mb", "gbps", "pct_peak_bw", "threads", "probe_matmul_gflops",
           "probe_copy_gbps"}


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Append ``rows`` to the CSV ``path`` (header written when the file is new).

    A file whose header differs from :data:`COLUMNS` (an older schema) is never rewritten: the
    rows go to ``<stem>-v2.csv`` (or -v3, ...) beside it. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, i = path, 1
    while candidate.exists():
        with candidate.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header == COLUMNS:
            break
        i += 1
        candidate = path.with_name(f"{path.stem}-v{i}{path.suffix}")
    new = not candidate.exists()
    with candidate.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for row in rows:
            unknown = set(row) - set(COLUMNS)
            if unknown:
                raise KeyError(f"row has columns outside the schema: {sorted(unknown)}")
            w.writerow([_fmt(row.get(c)) for c in COLUMNS])
    return candidate


def read_rows(paths) -> "pandas.DataFrame":  # noqa: F821
    """All rows of the given CSV files as one pandas DataFrame (numeric columns as floats)."""
    import pandas as pd

    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    for c in NUMERIC & set(df.columns):
        df[c] = pd.to_numeric(df[c].replace("", "nan"), errors="coerce")
    return df

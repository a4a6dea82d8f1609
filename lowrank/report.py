"""Plots and a summary table of a run directory (``lowrank report RUN_DIR``).

Reads the Parquet log of :mod:`lowrank.runlog` and writes PNGs beside it:

    spectrum_heatmap_<layer>.png   log10 sigma_i over steps, one image per layer
    sigma_trajectories.png         top singular values over steps, one panel per layer
    ranks.png                      numerical rank (with its upper bound) and stable rank, all layers
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .runlog import load_log


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sigma_matrix(df, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, sigma (steps x r)) of one layer from the log."""
    sub = df[df["name"] == name].sort_values("step")
    return sub["step"].to_numpy(), np.stack([np.asarray(s, dtype=float) for s in sub["sigma"]])


def plot_heatmap(df, name: str, path: Path) -> Path:
    plt = _pyplot()
    steps, sig = sigma_matrix(df, name)
    logsig = np.log10(np.clip(sig, 1e-30, None))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(logsig.T, aspect="auto", origin="upper", cmap="magma",
                   extent=[steps[0], steps[-1] + 1, sig.shape[1] + 0.5, 0.5],
                   vmin=np.percentile(logsig, 2), vmax=logsig.max())
    ax.set_xlabel("step")
    ax.set_ylabel("index i")
    ax.set_title(f"{name}: log10 sigma_i over training")
    fig.colorbar(im, ax=ax, label="log10 sigma")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(df, path: Path) -> Path:
    plt = _pyplot()
    names = list(dict.fromkeys(df["name"]))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, sig = sigma_matrix(df, name)
        for i in range(sig.shape[1]):
            ax.plot(steps, sig[:, i], lw=1.0, color=plt.cm.viridis(i / max(1, sig.shape[1] - 1)))
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("sigma_i")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("singular-value trajectories (color: index, dark = largest)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ranks(df, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, sub in df.groupby("name", sort=False):
        sub = sub.sort_values("step")
        line, = ax1.plot(sub["step"], sub["numerical_rank"], lw=1.2, label=name)
        if (sub["numerical_rank_upper"] > sub["numerical_rank"]).any():
            ax1.fill_between(sub["step"], sub["numerical_rank"], sub["numerical_rank_upper"],
                             color=line.get_color(), alpha=0.15)
        ax2.plot(sub["step"], sub["stable_rank"], lw=1.2, label=name)
    ax1.set_title("numerical rank (shaded: up to the bound when censored at k)")
    ax2.set_title("stable rank ||W||_F^2 / sigma_1^2")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
    ax2.set_yscale("log")
    ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nonfinite_since(layer) -> int | None:
    """The first step of the trailing run of steps whose weights were not finite (the tracker
    then keeps its last finite estimates), or None where the last step was finite."""
    if "nonfinite" not in layer or not bool(layer["nonfinite"].iloc[-1]):
        return None
    flags = layer["nonfinite"].astype(bool).to_numpy()
    steps = layer["step"].to_numpy()
    i = len(flags) - 1
    while i > 0 and flags[i - 1]:
        i -= 1
    return int(steps[i])


def summary_rows(df) -> list[dict]:
    """One row per layer: its last logged step's key metrics, and whether its weights were
    finite there (else the metrics are those of the last finite step, and "status" says since
    when they are not)."""
    rows = []
    for name, layer in df.sort_values("step", kind="stable").groupby("name", sort=False):
        r = layer.iloc[-1]
        rank = int(r["numerical_rank"])
        upper = int(r["numerical_rank_upper"])
        since = _nonfinite_since(layer)
        rows.append({
            "layer": name, "shape": r["shape"], "step": int(r["step"]),
            "sigma_1": float(r["spectral_norm"]), "fro": float(r["fro_norm"]),
            "stable_rank": float(r["stable_rank"]),
            "rank@tol": f"{rank}" if upper == rank else f"{rank}..{upper}",
            "eff_rank": float(r["effective_rank"]),
            "converged": since is None and float(r["convergence"]) < 1e-3,
            "status": "ok" if since is None else f"NOT FINITE since step {since}",
        })
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols),
             "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def make_report(run_dir, out_dir=None, *, progress: bool = True) -> tuple[list[Path], str]:
    """Write the plots of ``run_dir`` into ``out_dir`` (default run_dir/plots); return
    (paths, summary table text)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    df = load_log(run_dir)
    names = list(dict.fromkeys(df["name"]))
    jobs = [("ranks", lambda: plot_ranks(df, out / "ranks.png")),
            ("trajectories", lambda: plot_trajectories(df, out / "sigma_trajectories.png"))]
    jobs += [(f"heatmap {n}", lambda n=n: plot_heatmap(df, n, out / f"spectrum_heatmap_{_safe(n)}.png"))
             for n in names]
    paths = []
    bar = _progress(len(jobs), progress)
    for label, job in jobs:
        paths.append(job())
        bar(label)
    return paths, format_table(summary_rows(df))


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if not enabled or tqdm is None:
        return lambda label: None
    bar = tqdm(total=total, desc="plots", unit="plot", leave=False)

    def tick(label):
        bar.set_postfix_str(label)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return tick

"""Plots and report.md of ``lowrank demo`` (see :mod:`lowrank.demo`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .runlog import load_log

LAYER_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
                "#17becf"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9.5, "axes.grid": True,
                         "grid.alpha": 0.25, "legend.fontsize": 8, "figure.dpi": 110})
    return plt


def _label(c: dict) -> str:
    return f"B={c['batch_size']} lr={c['lr']:g} wd={c['weight_decay']:g}"


def _logs(results):
    """Per configuration id: its per-step log (DataFrame) with 1-based update counts."""
    out = {}
    for r in results:
        df = load_log(r["run_dir"])
        df = df.assign(update=df["step"] + 1,  # the log's step is the 0-based update index
                       layer=[n[: -len(".weight")] if n.endswith(".weight") else n
                              for n in df["name"]])
        out[r["id"]] = df
    return out


def _layers(results):
    return list(dict.fromkeys(a["layer"] for a in results[0]["audits"]))


def _rank_curve(ax, sub, color, label, x=None):
    """Tracked numerical rank: solid where the tracker counts it (rank <= k); where the rank
    exceeds the sketch, a thin dotted line at the tracker's upper bound (the lower bound is k)."""
    x = sub["update"].to_numpy() if x is None else x
    lo = sub["numerical_rank"].to_numpy().astype(float)
    hi = sub["numerical_rank_upper"].to_numpy().astype(float)
    cens = sub["rank_censored"].to_numpy().astype(bool)
    # keep the counted curve connected to where it enters the window
    ok = np.where(cens & ~np.roll(~cens, -1), np.nan, lo)
    ax.plot(x, ok, color=color, lw=1.4, label=label)
    if cens.any():
        ax.plot(x, np.where(cens, hi, np.nan), color=color, lw=1.0, ls=":")


def _censor_band(ax, k, top):
    """Grey band above the sketch width: there the tracker bounds the rank instead of counting."""
    ax.axhspan(k, top, color="0.88", zorder=0, lw=0)
    ax.axhline(k, color="0.45", lw=0.8, ls="--", zorder=1)


def _plain_log_axis(ax, axis="y"):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def plot_rank_over_steps(s, results, logs, path: Path) -> Path:
    plt = _pyplot()
    layers = _layers(results)
    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.7 * rows + 0.7), squeeze=False,
                             sharey=True)
    ymax = max(min(a["shape"]) for a in results[0]["audits"]) * 1.35
    for ax, r in zip(axes.flat, results):
        df = logs[r["id"]]
        _censor_band(ax, s.sketch_rank, ymax)
        for li, layer in enumerate(layers):
            color = LAYER_COLORS[li % len(LAYER_COLORS)]
            _rank_curve(ax, df[df["layer"] == layer], color, layer)
            aud = [a for a in r["audits"] if a["layer"] == layer]
            ax.scatter([a["step"] for a in aud], [a["rank_exact"] for a in aud], marker="x",
                       s=24, color=color, zorder=5, lw=1.3)
        ax.set_yscale("log")
        ax.set_ylim(4, ymax)
        _plain_log_axis(ax)
        ax.set_xlim(0, r["config"]["steps"] * 1.02)
        ax.set_title(f"{_label(r['config'])}\n{r['config']['steps']} steps, test acc "
                     f"{r['test_acc']:.3f}", fontsize=8.5)
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("numerical rank (tol 1e-3)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    from matplotlib.patches import Patch

    handles += [Line2D([], [], color="0.3", marker="x", ls="none"),
                Patch(color="0.88"), Line2D([], [], color="0.3", ls=":", lw=1.0)]
    labels += ["exact rank (audit: torch.linalg.svdvals)",
               f"rank > k = {s.sketch_rank}: not counted, bounded by the tracker",
               "tracker's upper bound (while rank > k)"]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(layers) + 3, 8), fontsize=7.5,
               frameon=False)
    fig.suptitle("numerical rank (tol 1e-3) of every weight matrix at every step, tracked by "
                 "SpectralSGD; crosses: exact",
                 fontsize=10.5)
    fig.tight_layout(rect=(0, 0.07 if rows > 1 else 0.12, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rank_by_layer(s, results, logs, path: Path) -> Path:
    """Per layer, every configuration: numerical rank and stable rank against epochs."""
    plt = _pyplot()
    layers = _layers(results)
    fig, axes = plt.subplots(2, len(layers), figsize=(3.3 * len(layers), 5.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    max_epoch = max(r["config"]["epochs"] for r in results)
    for ci, r in enumerate(results):
        df = logs[r["id"]]
        c = r["config"]
        color = "k" if c["weight_decay"] == 0 else cmap(ci % 10)
        for li, layer in enumerate(layers):
            sub = df[df["layer"] == layer].copy()
            sub["epoch"] = sub["update"] * c["batch_size"] / s.n_train
            x = sub["epoch"].to_numpy()
            lo = sub["numerical_rank"].to_numpy().astype(float)
            cens = sub["rank_censored"].to_numpy().astype(bool)
            ls = "--" if c["weight_decay"] == 0 else "-"
            ok = np.where(cens & ~np.roll(~cens, -1), np.nan, lo)
            axes[0, li].plot(x, ok, color=color, lw=1.2, ls=ls, label=_label(c))
            fin = [a for a in r["audits"] if a["layer"] == layer and a["step"] == c["steps"]]
            if fin:  # the exact final rank
                axes[0, li].scatter([x[-1]], [fin[0]["rank_exact"]], marker="x", s=22,
                                    color=color, zorder=5)
            axes[1, li].plot(x, sub["stable_rank"], color=color, lw=1.2, ls=ls)
    for li, layer in enumerate(layers):
        shape = next(a["shape"] for a in results[0]["audits"] if a["layer"] == layer)
        top = min(shape) * 1.35
        k = min(s.sketch_rank, min(shape))
        axes[0, li].set_title(f"{layer} ({shape[0]}x{shape[1]})")
        if k < min(shape):
            _censor_band(axes[0, li], k, top)
        axes[0, li].set_yscale("log")
        axes[0, li].set_ylim(4, top)
        _plain_log_axis(axes[0, li])
        axes[1, li].set_yscale("log")
        _plain_log_axis(axes[1, li])
        axes[1, li].set_xlabel("epoch")
        for ax in axes[:, li]:
            ax.set_xlim(0, max_epoch * 1.03)
        if not any(len(line.get_xdata()) and np.isfinite(np.asarray(line.get_ydata(), float)).any()
                   for line in axes[0, li].get_lines()
                   if line.get_label() and not line.get_label().startswith("_")):
            axes[0, li].text(0.5, 0.35, f"rank > k = {k} all along:\nbounded by the tracker;\n"
                             "x: exact final rank", transform=axes[0, li].transAxes,
                             ha="center", va="center", fontsize=8, color="0.3")
    axes[0, 0].set_ylabel("numerical rank\n(grey: > k, not counted;\nx: exact final)")
    axes[1, 0].set_ylabel("stable rank ||W||_F^2 / sigma_1^2")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7.5,
               frameon=False)
    fig.suptitle("rank per layer, all configurations (same training samples: x = epochs)",
                 fontsize=10.5)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * math.ceil(len(labels) / 5), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_final_vs_hparams(s, results, checks, path: Path) -> Path:
    from .demo import _axis, final_ranks

    plt = _pyplot()
    layers = _layers(results)
    axes_spec = [("batch_size", "batch size B", checks[0]), ("lr", "learning rate", checks[1]),
                 ("weight_decay", "weight decay", checks[2])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), sharey=True)
    for ax, (key, xlabel, check) in zip(axes, axes_spec):
        rows = _axis(results, s, key)
        vals = [r["config"][key] for r in rows]
        pos = np.arange(len(vals))
        for li, layer in enumerate(layers):
            color = LAYER_COLORS[li % len(LAYER_COLORS)]
            fr = [final_ranks(r)[layer] for r in rows]
            ax.plot(pos, [f["exact"] for f in fr], marker="o", color=color, lw=1.5, label=layer)
            # the tracker's view: its count, or its lower bound k where the rank exceeds k
            ax.scatter(pos, [f["tracked"] for f in fr], marker="s", s=40, facecolors="none",
                       edgecolors=color, lw=1.0, zorder=4)
        ax.axhline(s.sketch_rank, color="0.5", lw=0.7, ls="--")
        ax.set_xticks(pos, [f"{v:g}" for v in vals])
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        fixed = check["where"]
        verdict = {True: "held", False: "did not hold", None: "not tested"}[check["held"]]
        ax.set_title(f"{check['title']}: {verdict}\n({fixed})",
                     color={"held": "#1a7f37", "did not hold": "#b42318"}.get(verdict, "k"))
    axes[0].set_ylabel("final numerical rank (tol 1e-3)")
    from matplotlib.lines import Line2D

    h, lab = axes[0].get_legend_handles_labels()
    h += [Line2D([], [], marker="o", color="0.3"), Line2D([], [], marker="s", color="0.3",
                                                             mfc="none", ls="none"),
          Line2D([], [], color="0.5", ls="--", lw=0.7)]
    lab += ["exact (audit at the final step)", "tracked (at k: rank > k, lower bound)",
            f"sketch width k = {s.sketch_rank}"]
    fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _heat_panel(ax, df, layer, r_cfg, s, plt):
    sub = df[df["name"] == layer].sort_values("update")
    x = sub["update"].to_numpy()
    sig = np.stack([np.asarray(v, dtype=float) for v in sub["sigma"]])
    rel = sig / np.clip(sig[:, :1], 1e-300, None)
    logrel = np.log10(np.clip(rel, 1e-6, None))
    r = sig.shape[1]
    im = ax.imshow(logrel.T, aspect="auto", origin="upper", cmap="viridis", vmin=-5, vmax=0,
                   extent=[x[0] - 0.5, x[-1] + 0.5, r + 0.5, 0.5], interpolation="nearest")
    # the rank threshold: sigma_i / sigma_1 = tol
    ax.contour(x, np.arange(1, r + 1), logrel.T, levels=[math.log10(1e-3)], colors="white",
               linewidths=1.3)
    rank = sub["numerical_rank"].to_numpy().astype(float)
    ax.plot(x, np.clip(rank, None, r + 0.5) + 0.5, color="#ff4040", lw=0.9, alpha=0.9)
    ax.set_ylim(r + 0.5, 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    if rank[-1] > r:
        text = (f"final rank > k = {int(rank[-1])} (bounded)" if bool(sub["rank_censored"].iloc[-1])
                else f"final tracked rank {int(rank[-1])}")
        ax.text(0.97, 0.04, text + f", beyond the {r} shown", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7.5, color="0.1",
                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.8))
    ax.set_title(f"{layer}, {_label(r_cfg['config'])}", fontsize=9)
    return im


def plot_heatmap(s, results, logs, path: Path) -> tuple[Path, str]:
    """Spectrum of one hidden layer over steps: the configuration of lowest total rank next to
    the wd=0 control."""
    from .demo import final_ranks, total_rank

    plt = _pyplot()
    layers = _layers(results)
    hidden = [l for l in layers if l not in ("fc1", "out")] or layers
    decayed = [r for r in results if r["config"]["weight_decay"] > 0] or results
    best = min(decayed, key=total_rank)
    fr = final_ranks(best)
    layer = min(hidden, key=lambda l: (fr[l]["exact"], hidden.index(l)))
    b0, lr0, _ = s.base
    controls = [r for r in results if r["config"]["weight_decay"] == 0]
    control = next((r for r in controls if r["config"]["batch_size"] == best["config"]["batch_size"]
                    and r["config"]["lr"] == best["config"]["lr"]),
                   next((r for r in controls if r["config"]["batch_size"] == b0
                         and r["config"]["lr"] == lr0), controls[0] if controls else None))
    panels = [best] + ([control] if control is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    name = best["audits"][[a["layer"] for a in best["audits"]].index(layer)]["param"]
    for ax, r in zip(axes[0], panels):
        im = _heat_panel(ax, logs[r["id"]], name, r, s, plt)
        ctrl = " (control)" if r["config"]["weight_decay"] == 0 else ""
        ax.set_title(f"{layer}, {_label(r['config'])}{ctrl}", fontsize=9)
        ax.grid(False)
    axes[0, 0].set_ylabel("index i (top singular values)")
    cb = fig.colorbar(im, ax=axes[0].tolist(), pad=0.01)
    cb.set_label("log10 sigma_i / sigma_1")
    fig.suptitle(f"top {s.rank} singular values of {layer} over training, tracked every step "
                 "(white: sigma_i/sigma_1 = 1e-3, the rank threshold; red: tracked numerical "
                 "rank)", fontsize=9.5)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path, layer


def plot_audit(s, results, path: Path) -> Path:
    """Tracked top singular values against exact svdvals at every checkpoint."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    from .demo import AUDIT_SIGMA_TOL

    errs, steps_frac = [], []
    for r in results:
        for a in r["audits"]:
            errs.append(max(a["sigma_max_err"], 1e-17))
            steps_frac.append(a["step"] / r["config"]["steps"])
    ax1.scatter(steps_frac, errs, s=14, alpha=0.7)
    ax1.axhline(AUDIT_SIGMA_TOL, color="#b42318", ls="--", lw=1, label=f"tolerance {AUDIT_SIGMA_TOL:g}")
    ax1.set_yscale("log")
    ax1.set_xlabel("checkpoint (fraction of the run)")
    ax1.set_ylabel("max |sigma_i est - exact| / sigma_1, top r")
    ax1.set_title("sigma error at every audit (every layer, configuration)")
    ax1.legend()
    ex, tr, cens = [], [], []
    for r in results:
        for a in r["audits"]:
            ex.append(a["rank_exact"])
            tr.append(a["rank_tracked"])
            cens.append(a["rank_censored"])
    ex, tr, cens = np.array(ex), np.array(tr), np.array(cens)
    ax2.scatter(ex[~cens], tr[~cens], s=16, label="counted (rank <= k)")
    ax2.scatter(ex[cens], tr[cens], s=16, marker="^", label="rank > k: tracked lower bound")
    lim = max(ex.max(), tr.max()) * 1.3
    ax2.plot([1, lim], [1, lim], color="0.5", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("exact numerical rank (svdvals)")
    ax2.set_ylabel("tracked numerical rank")
    ax2.set_title("numerical rank: tracked against exact")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(s, results) -> list[Path]:
    from .demo import check_predictions

    out = s.out
    logs = _logs(results)
    checks = check_predictions(results, s)
    paths = [plot_rank_over_steps(s, results, logs, out / "rank_over_steps.png"),
             plot_final_vs_hparams(s, results, checks, out / "final_rank_vs_hparams.png"),
             plot_rank_by_layer(s, results, logs, out / "rank_by_layer.png")]
    heat, _ = plot_heatmap(s, results, logs, out / "spectrum_heatmap.png")
    paths.append(heat)
    paths.append(plot_audit(s, results, out / "audit.png"))
    return paths


def _efolds(c: dict) -> float:
    """-steps * ln(1 - lr*wd): e-folds of weight-decay shrinkage over the run."""
    x = c["lr"] * c["weight_decay"]
    return -c["steps"] * math.log1p(-x) if x < 1 else float("inf")


def _n_test(results, s) -> int:
    return int(results[0].get("n_test", 0)) or 0


def write_report(s, results, checks, audit, plots, wall: float) -> Path:
    from .demo import (AUDIT_SIGMA_TOL, NO_COLLAPSE_FRACTION, RANK_TOL, audit_text, checks_text,
                       final_ranks, tracked_text)

    layers = _layers(results)
    shapes = {a["layer"]: a["shape"] for a in results[0]["audits"]}
    lines = ["# lowrank demo: SGD + weight decay minimise rank", ""]
    lines += [
        "Claim (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794): mini-batch SGD with weight decay "
        "biases the weight matrices of deep ReLU networks toward low rank; more so with smaller "
        "batches, larger learning rates and larger weight decay; not without weight decay.", "",
        "## Setup", "",
        f"- data: scikit-learn `load_digits` (8x8 digits, shipped with the package): {s.n_train} "
        f"training and {_n_test(results, s)} test images (stratified 80/20 split), standardised",
        f"- model: ReLU MLP {64}-{'-'.join([str(s.hidden)] * s.depth)}-10, PyTorch default init, "
        f"the same initial weights (seed {s.seed}) for every configuration",
        "- optimizer: `lowrank.SpectralSGD` (exactly `torch.optim.SGD`, no momentum, coupled "
        "weight decay), cross-entropy loss; every weight matrix tracked at every step with a "
        f"sketch of width k = {s.sketch_rank} (top {s.rank} singular values reported)",
        f"- rank: numerical rank of W/||W||, the count of singular values above {RANK_TOL:g} sigma_1. "
        f"The tracker counts it up to k; above k it gives bounds (never a guess). The final step "
        "is audited with exact `torch.linalg.svdvals`, so every final rank below is exact.",
        f"- protocol: every configuration sees the same number of training "
        f"{'samples' if s.equal == 'epochs' else 'steps'}"
        + (" (smaller batches take more steps). Weight decay forgets old updates at rate "
           "(1 - lr*wd) per step, so the weights remember about B/(lr*wd) training samples: "
           "the quantity in the paper's rank bound." if s.equal == "epochs" else "."),
        f"- device {s.device}, backend {s.backend}, wall time {wall:.1f} s", ""]
    lines += ["## Results", "",
              "F = -steps * ln(1 - lr*wd): how many e-folds weight decay has shrunk the initial "
              "weights by (the random initialisation is full rank; the paper's mechanism needs it "
              "forgotten).", "",
              "| configuration | steps | epochs | F | test acc | train acc | final loss | "
              + " | ".join(f"rank {l} ({shapes[l][0]}x{shapes[l][1]})" for l in layers)
              + " | stable rank " + "/".join(layers) + " |",
              "|" + "---|" * (8 + len(layers))]
    for r in results:
        fr = final_ranks(r)
        c = r["config"]
        cells = []
        for l in layers:
            t = tracked_text(fr[l])
            cells.append(f"{fr[l]['exact']}" + ("" if t == str(fr[l]["exact"]) else f" (tracked {t})"))
        lines.append(f"| {_label(c)} | {c['steps']} | {c['epochs']:.1f} | {_efolds(c):.1f} | "
                     f"{r['test_acc']:.3f} | "
                     f"{r['train_acc']:.3f} | {r['final_loss']:.3f} | " + " | ".join(cells)
                     + " | " + "/".join(f"{fr[l]['stable_rank']:.2f}" for l in layers) + " |")
    init = results[0]["init_ranks"]
    accs = sorted(results, key=lambda r: r["test_acc"])
    lines += ["", "Initial ranks (exact, the same for every configuration): "
              + ", ".join(f"{l} {init[l]}" for l in layers) + ". "
              "\"tracked a..b\": the rank exceeds the sketch width k; the tracker bounds it.", "",
              f"Test accuracy ranges from {accs[0]['test_acc']:.3f} ({_label(accs[0]['config'])}) "
              f"to {accs[-1]['test_acc']:.3f} ({_label(accs[-1]['config'])}); the paper reports "
              "a marginal effect of the rank bias on test performance.", ""]
    lines += ["## The paper's predictions, checked", "",
              "Each check compares the total exact final rank (sum over layers) along one axis "
              "through the base point; it holds when the rank never moves against the prediction "
              f"and the ends differ. \"No collapse\": every layer of the wd = 0 control keeps at "
              f"least {NO_COLLAPSE_FRACTION:.0%} of its initial rank.", "", "```",
              checks_text(checks), "```", ""]
    for c in checks[:3]:
        if c.get("per_layer"):
            lines.append(f"- {c['title']} (" + c["where"] + "), per layer along "
                         + ", ".join(f"{v:g}" for v in c["values"]) + ": "
                         + "; ".join(f"{l} {'/'.join(map(str, v))}" for l, v in c["per_layer"].items()))
    lines += ["", "![final rank against the hyperparameters](final_rank_vs_hparams.png)", "",
              "## Rank over training", "",
              "Solid: the tracker's count of singular values above 1e-3 sigma_1 at every step. Grey "
              f"band: ranks above the sketch width k = {s.sketch_rank}, which the tracker does not "
              "count; there it bounds the rank (from k up to the dotted line, from the exact "
              "Frobenius norm). Crosses: exact ranks at the audit checkpoints.", "",
              "![rank over steps per configuration](rank_over_steps.png)", "",
              "![rank and stable rank per layer](rank_by_layer.png)", "",
              "## Spectrum of one layer", "",
              "![spectrum heatmap](spectrum_heatmap.png)", "",
              "## Audit: tracked estimates against exact SVD", "",
              f"At {s.audits} checkpoints per configuration (the last at the final step), "
              "`torch.linalg.svdvals` in float64 of every weight matrix against the tracked values "
              f"of the same step. Tolerance: {AUDIT_SIGMA_TOL:g} of sigma_1 for the top "
              "singular values (the tracker's stated accuracy once warm).", "", "```",
              audit_text(audit), "```", "",
              "| configuration | step | layer | max sigma err / sigma_1 | max relative err per sigma_i "
              "| rank exact | rank tracked | stable rank exact | tracked | convergence |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for a in r["audits"]:
            t = f"{a['rank_tracked']}..{a['rank_upper']}" if a["rank_censored"] else str(a["rank_tracked"])
            lines.append(f"| {_label(r['config'])} | {a['step']} | {a['layer']} | "
                         f"{a['sigma_max_err']:.1e} | {a['sigma_max_err_each']:.1e} | {a['rank_exact']} "
                         f"| {t} | {a['stable_rank_exact']:.3f} | {a['stable_rank_tracked']:.3f} | "
                         f"{a['convergence']:.1e} |")
    lines += ["", "![audit](audit.png)", "",
              "## Files", "",
              "- `runs/<configuration>/`: the per-step log of each configuration "
              "(`lowrank.load_log(path)` gives a pandas DataFrame: step, layer name, every metric, "
              "sigma), its `config.json` and `train_loss.npy`",
              "- `summary.json`: settings, results, checks and audits as JSON",
              "- the PNGs above", ""]
    path = s.out / "report.md"
    path.write_text("\n".join(lines))
    return path

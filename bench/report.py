"""README performance table (markdown) and plot, regenerated from the result rows.

    python -m bench.report [CSV ...] [--run-id ID] [--out-dir bench/results] [--readme README.md]

Without CSV arguments it reads every bench/results/*.csv and reports the latest "full" run (the
latest run of any suite if there is none). Writes ``TABLE.md`` (every table) and
``<device>-<date>.png`` beside it; with ``--readme`` it also rewrites the short table between the
README's bench-table markers. Every number comes from the rows; each table says where and when
they were measured.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import results, workloads

SPECTRAL = "spectral_sgd"
# Suffix of the base name of a provider whose step is captured in a CUDA graph and replayed
# (bench/providers.py; not imported from there, which would import torch and lowrank).
GRAPH = "_graph"
TRACKED_ON = {SPECTRAL: "sgd", "adamw+tracker": "adamw"}  # tracked step -> its untracked optimizer
PRETTY = {"sgd": "SGD", "sgd_foreach": "SGD foreach", "sgd_fused": "SGD fused",
          "sgd+svdvals": "SGD + svdvals", "sgd+svd_lowrank": "SGD + svd_lowrank(niter=2)",
          "sgd+subspace": "SGD + subspace iteration", "adamw": "AdamW"}

# Targets of the issue (CPU, 2 cores, float32): reported, never asserted.
CPU_TARGETS = {"shape": "1024x1024", "k": 16, "vs_svdvals": 20.0, "vs_svd_lowrank": 3.0,
               "err": 1e-3, "overhead_shape": "2048x2048", "overhead": 2.5}


def pretty(provider: str) -> str:
    base, graph, rest = provider.partition(GRAPH)
    if graph:
        return f"{pretty(base + rest)}, captured"
    for prefix, label in ((SPECTRAL, "SpectralSGD"), ("adamw+tracker", "AdamW + SpectrumTracker")):
        if provider.startswith(prefix + "["):
            backend, _, schedule = provider[len(prefix) + 1:-1].partition("-")
            return f"{label} ({backend}{', schedule ' + schedule if schedule else ''})"
    return PRETTY.get(provider, provider)


def ms(t: float) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    if t >= 100:
        return f"{t:,.0f} ms"
    if t >= 1:
        return f"{t:.2f} ms"
    return f"{t * 1e3:.0f} us"


def ratio(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def err(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1e}"


def pick_run(df, run_id=None):
    """The rows of ``run_id``: one id, or several separated by commas (a suite run in parts,
    as the GPU's full suite is: reported as one table); default the latest full run."""
    if run_id:
        ids = [x.strip() for x in str(run_id).split(",") if x.strip()]
        missing = sorted(set(ids) - set(df["run_id"]))
        if missing:
            raise SystemExit(f"no rows of run {', '.join(missing)}")
        return df[df["run_id"].isin(ids)]
    pool = df[df["suite"] == "full"] if (df["suite"] == "full").any() else df
    latest = sorted(pool["run_id"].unique())[-1]
    return df[df["run_id"] == latest]


def _one(df, **eq):
    sel = df
    for key, value in eq.items():
        if value is None:
            sel = sel[sel[key].isna()]
        else:
            sel = sel[sel[key] == value]
    return sel.iloc[0] if len(sel) else None


def _get(row, col):
    return float("nan") if row is None else row[col]


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _backends(df):
    return sorted({p for p in df["provider"] if p.startswith(SPECTRAL + "[")},
                  key=lambda p: ("torch" in p, "-" in p, p))


def _shape_key(shape: str):
    m, n = shape.split("x")
    return int(m) * int(n), int(m)


def probe_range(df) -> str:
    """A sentence on the range of :func:`bench.env.machine_probe` over the rows (how fast the
    machine ran during the run), or "" for rows without it (runs before the probe existed)."""
    cols = ["probe_matmul_gflops", "probe_copy_gbps"]
    if not set(cols) <= set(df.columns) or df[cols].isna().all().any():
        return ""
    mm, cp = (df[c].dropna() for c in cols)
    return (f" Machine probe before each group: float32 matmul {mm.min():.0f}-{mm.max():.0f} "
            f"GFLOP/s, copy {cp.min():.0f}-{cp.max():.0f} GB/s (compare runs at similar values).")


def build_tables(df) -> str:
    ok = df[df["status"] == "ok"]
    first = df.iloc[0]
    dirty = " (uncommitted changes)" if str(first["commit_dirty"]) == "True" else ""
    lines = [
        f"Measured on **{first['device']}** ({first['device_type']}, {int(first['threads'])} "
        f"threads), torch {first['torch_version']}, lowrank {first['lowrank_version']}, commit "
        f"`{str(first['commit'])[:10]}`{dirty}, {first['date_utc']} (suite {first['suite']}, "
        f"run {', '.join(sorted(df['run_id'].unique()))}).{probe_range(df)}",
        "",
        "Median time per optimizer step (20th-80th percentiles in the CSV). Every provider ran "
        "interleaved with the others in one process, so ratios compare like with like; "
        "`x SGD` is the step time over the untracked `torch.optim.SGD` step, `vs svdvals` and "
        "`vs svd_lowrank` are how many times faster than SGD followed by "
        "`torch.linalg.svdvals` / `torch.svd_lowrank(q=k, niter=2)` of every tracked matrix. "
        "Errors: the largest relative error of the top r = k/2 singular values after 30 tracked "
        "steps, against float64 `torch.linalg.svdvals` of the same weights. A tracker without "
        "a schedule runs the library's default (on the CPU: `sequential`, Y = W V, the next U, "
        "then Z = W^T U from it); `schedule both` computes Y and Z from the same bases, as the "
        "GPU kernels do in one pass; `schedule alternate` one of them per step, in turn.",
        "",
    ]
    mat = ok[(ok["workload"] == "matrix")]
    spectral = _backends(ok)

    # 1. size sweep
    base = mat[(mat["dtype"] == "float32") & (mat["momentum"] == 0)]
    shapes = sorted(base["shape"].unique(), key=_shape_key)
    k0 = 16
    rows = []
    for shape in shapes:
        s = base[base["shape"] == shape]
        sgd = _one(s, provider="sgd")
        fused = _one(s, provider="sgd_fused")
        svd = _one(s, provider="sgd+svdvals")
        low = _one(s, provider="sgd+svd_lowrank", k=k0)
        sub = _one(s, provider="sgd+subspace", k=k0)
        for p in spectral:
            sp = _one(s, provider=p, k=k0)
            if sp is None:
                continue
            rows.append([shape, pretty(p), ms(_get(sgd, "median_ms")), ms(_get(fused, "median_ms")),
                         f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])} SGD)",
                         ms(_get(svd, "median_ms")), ratio(sp["vs_sgd_svdvals"]),
                         ms(_get(low, "median_ms")), ratio(sp["vs_sgd_svd_lowrank"]),
                         ms(_get(sub, "median_ms")),
                         f"{err(sp['err_top_r'])} / {err(_get(low, 'err_top_r'))} / "
                         f"{err(_get(sub, 'err_top_r'))}"])
    if rows:
        lines += [f"**One matrix, float32, no momentum, k = {k0} (top {k0 // 2})**", ""]
        lines += _table(["shape", "tracker", "SGD", "SGD fused", "SpectralSGD", "SGD + svdvals",
                         "vs svdvals", "SGD + svd_lowrank", "vs svd_lowrank",
                         "SGD + subspace iter.", "top-r error: SpectralSGD / svd_lowrank / subspace"],
                        rows)
        lines.append("")

    # 2. k sweep at the shape that has the most groups
    if len(mat):
        ref_shape = mat["shape"].value_counts().index[0]
        s = base[base["shape"] == ref_shape]
        rows = []
        for k in sorted(x for x in s["k"].dropna().unique()):
            low = _one(s, provider="sgd+svd_lowrank", k=k)
            sub = _one(s, provider="sgd+subspace", k=k)
            for p in spectral:
                sp = _one(s, provider=p, k=k)
                tr = _one(s, provider=p.replace(SPECTRAL, "adamw+tracker"), k=k)
                if sp is None:
                    continue
                rows.append([f"{int(k)} ({int(k) // 2})", pretty(p),
                             f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])} SGD)",
                             ratio(sp["vs_sgd_svdvals"]), ratio(sp["vs_sgd_svd_lowrank"]),
                             ms(_get(low, "median_ms")), ms(_get(sub, "median_ms")),
                             f"{ms(_get(tr, 'median_ms'))} ({ratio(_get(tr, 'overhead'))} AdamW)",
                             f"{err(sp['err_top_r'])} / {err(_get(tr, 'err_top_r'))} / "
                             f"{err(_get(low, 'err_top_r'))} / {err(_get(sub, 'err_top_r'))}"])
        if rows:
            lines += [f"**Sketch width k (rank r = k/2), {ref_shape}, float32, no momentum**", ""]
            lines += _table(["k (r)", "tracker", "SpectralSGD", "vs svdvals", "vs svd_lowrank",
                             "SGD + svd_lowrank", "SGD + subspace iter.", "AdamW + SpectrumTracker",
                             "top-r error: SpectralSGD / tracker / svd_lowrank / subspace"], rows)
            lines.append("")

        # 3. dtype x momentum at the same shape
        s = mat[mat["shape"] == ref_shape]
        rows = []
        for (dt, mom), g in s.groupby(["dtype", "momentum"], sort=True):
            sgd = _one(g, provider="sgd")
            for p in spectral:
                sp = _one(g, provider=p, k=k0)
                if sp is None:
                    continue
                rows.append([dt, f"{mom:g}", pretty(p), ms(_get(sgd, "median_ms")),
                             f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])} SGD)",
                             ratio(sp["vs_sgd_svdvals"]), ratio(sp["vs_sgd_svd_lowrank"]),
                             err(sp["err_top_r"]), f"{sp['update_max_abs_diff']:.1e}"])
        if len(rows) > 1:
            lines += [f"**Precision and momentum, {ref_shape}, k = {k0}**", ""]
            lines += _table(["dtype", "momentum", "tracker", "SGD", "SpectralSGD", "vs svdvals",
                             "vs svd_lowrank", "top-r error",
                             "max abs diff of W from torch SGD"], rows)
            lines.append("")

    # 3b. the captured step, eager beside it: every workload and k with a captured tracked step
    lines += _captured_table(ok)

    # 4. whole models
    models = ok[~ok["workload"].isin(["matrix", "digits", "breakdown"])]
    rows = []
    for (label, dt), g in models.groupby(["shape", "dtype"], sort=False):
        k = g["k"].dropna().min()
        sgd, adamw = _one(g, provider="sgd"), _one(g, provider="adamw")
        cells = {p: _one(g, provider=p, k=k if p not in ("sgd+svdvals",) else None)
                 for p in ("sgd+svdvals", "sgd+svd_lowrank", "sgd+subspace")}
        for p in spectral:
            sp = _one(g, provider=p, k=k)
            tr = _one(g, provider=p.replace(SPECTRAL, "adamw+tracker"), k=k)
            if sp is None:
                continue
            rows.append([label, dt, f"{int(sp['n_matrices'])} / {sp['total_numel'] / 1e6:.1f}M",
                         pretty(p), ms(_get(sgd, "median_ms")),
                         f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])})",
                         *[f"{ms(_get(c, 'median_ms'))} ({ratio(_get(c, 'overhead'))})"
                           for c in cells.values()],
                         ms(_get(adamw, "median_ms")),
                         f"{ms(_get(tr, 'median_ms'))} ({ratio(_get(tr, 'overhead'))})",
                         err(sp["err_top_r"])])
    if rows:
        lines += ["**Whole models, k = 16 (top 8), momentum 0.9: per-step time (x the untracked "
                  "optimizer step)**", ""]
        lines += _table(["model", "dtype", "tracked matrices / params", "tracker", "SGD",
                         "SpectralSGD", "SGD + svdvals", "SGD + svd_lowrank", "SGD + subspace",
                         "AdamW", "AdamW + SpectrumTracker", "top-r error"], rows)
        lines.append("")

    # 5. trained network
    dig = ok[ok["workload"] == "digits"]
    if len(dig):
        rows = []
        svd = _one(dig, provider="sgd+svdvals")
        for k in sorted(dig["k"].dropna().unique()):
            row = [f"{int(k)} ({int(k) // 2})"]
            for p in spectral + [p.replace(SPECTRAL, "adamw+tracker") for p in spectral] + \
                    ["sgd+subspace", "sgd+svd_lowrank"]:
                c = _one(dig, provider=p, k=k)
                row.append(f"{err(_get(c, 'err_top_r'))} ({ms(_get(c, 'median_ms'))})")
            row.append(f"{err(_get(svd, 'err_top_r'))} ({ms(_get(svd, 'median_ms'))})")
            rows.append(row)
        label = dig.iloc[0]["shape"]
        lines += [f"**Trained network ({label}, trained on sklearn digits with SGD, then 30 more "
                  "tracked steps): top-r error (time per step)**", ""]
        lines += _table(["k (r)"] + [pretty(p) for p in spectral]
                        + [pretty(p.replace(SPECTRAL, "adamw+tracker")) for p in spectral]
                        + ["SGD + subspace iter.", "SGD + svd_lowrank", "SGD + svdvals"], rows)
        lines.append("")

    # 6. where the time goes (bench/breakdown.py)
    bd = ok[ok["workload"] == "breakdown"]
    if len(bd):
        for shape, g in bd.groupby("shape", sort=False):
            lines += [f"**Where the time of one SpectralSGD step goes (torch backend, {shape}, "
                      f"k = {int(g.iloc[0]['k'])}, components timed interleaved)**", ""]
            lines += _table(["component", "median", "share of the step"],
                            [[r["provider"].removeprefix("component:"), ms(r["median_ms"]),
                              f"{100 * r['overhead']:.0f}%"] for _, r in g.iterrows()])
            lines.append("")

    # 7. targets (CPU)
    if first["device_type"] == "cpu":
        t = CPU_TARGETS
        checks = []
        for provider in [p for p in spectral if p.startswith((SPECTRAL + "[torch", SPECTRAL + "[auto"))]:
            who = pretty(provider)
            sp = _one(base, provider=provider, shape=t["shape"], k=t["k"])
            sp2 = _one(base, provider=provider, shape=t["overhead_shape"], k=t["k"])
            if sp is not None:
                checks += [
                    (f"{who} k={t['k']} at {t['shape']} >= {t['vs_svdvals']:g}x faster than SGD + svdvals",
                     sp["vs_sgd_svdvals"], sp["vs_sgd_svdvals"] >= t["vs_svdvals"], ratio),
                    (f"... >= {t['vs_svd_lowrank']:g}x faster than SGD + svd_lowrank(niter=2)",
                     sp["vs_sgd_svd_lowrank"], sp["vs_sgd_svd_lowrank"] >= t["vs_svd_lowrank"], ratio),
                    (f"... top-{t['k'] // 2} error < {t['err']:g} after warm-up", sp["err_top_r"],
                     sp["err_top_r"] < t["err"], err)]
            if sp2 is not None:
                checks.append((f"{who} k={t['k']} at {t['overhead_shape']} <= {t['overhead']:g}x "
                               "the untracked SGD step", sp2["overhead"],
                               sp2["overhead"] <= t["overhead"], ratio))
        if checks:
            lines += ["**Targets (CPU, float32)**", ""]
            lines += _table(["target", "measured", "met"],
                            [[name, fmt(v), "yes" if good else "**no**"]
                             for name, v, good, fmt in checks])
            lines.append("")
    return "\n".join(lines)


def _captured_table(ok) -> list[str]:
    """Each captured tracked step (CUDA) beside the eager one of the same group. A captured
    step's `overhead` is over its captured untracked optimizer (``sgd_graph``, ``adamw_graph``),
    an eager one's over the eager optimizer: each ratio compares like with like. Empty without
    captured rows, so the tables of CPU and older runs stay as they were."""
    captured_names = tuple(f"{t}{GRAPH}[" for t in TRACKED_ON)
    has_captured = ok["provider"].str.startswith(captured_names)
    rows = []
    for _, g in ok[ok["group"].isin(ok[has_captured]["group"])].groupby("group", sort=False):
        first = g.iloc[0]
        label = f"{first['shape']} {first['dtype']}, momentum {first['momentum']:g}"
        names = {tracked: sorted({p for p in g["provider"] if p.startswith(f"{tracked}{GRAPH}[")},
                                 key=lambda p: ("torch" in p, "-" in p, p))
                 for tracked in TRACKED_ON}
        for k in sorted(g[g["provider"].str.startswith(captured_names)]["k"].dropna().unique()):
            for tracked, untracked in TRACKED_ON.items():
                for name in names[tracked]:
                    captured = _one(g, provider=name, k=k)
                    if captured is None:
                        continue
                    eager = _one(g, provider=name.replace(GRAPH, ""), k=k)
                    base = [_get(_one(g, provider=untracked + suffix), "median_ms")
                            for suffix in ("", GRAPH)]
                    rows.append([label, f"{int(k)} ({int(k) // 2})",
                                 pretty(name.replace(GRAPH, "")),
                                 f"{PRETTY[untracked]} {ms(base[0])} / {ms(base[1])}",
                                 "-" if eager is None else
                                 f"{ms(eager['median_ms'])} ({ratio(eager['overhead'])})",
                                 f"{ms(captured['median_ms'])} ({ratio(captured['overhead'])})"])
    if not rows:
        return []
    return ["**Captured in a CUDA graph: per-step time (x the untracked optimizer step, eager over "
            "eager, captured over captured)**", "",
            "The same step captured once after eager warm-up steps, then replayed (AdamW with "
            "`capturable=True`), as in a training loop captured whole: the host launches one graph "
            "per step instead of the step's Python and kernels. Replays run on the gradients of "
            "the capture; eager and captured steps ran interleaved in the same process.",
            "",
            *_table(["workload", "k (r)", "tracker", "untracked: eager / captured", "eager",
                     "captured"], rows),
            ""]


def plot(df, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df["status"] == "ok") & (df["workload"] == "matrix")]
    base = ok[(ok["dtype"] == "float32") & (ok["momentum"] == 0)]
    if base.empty:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    provs = [p for p in base["provider"].unique() if p not in ("sgd_foreach",)]
    color = {p: f"C{i % 10}" for i, p in enumerate(provs)}
    for p in provs:
        s = base[(base["provider"] == p) & ((base["k"] == 16) | base["k"].isna())]
        if s.empty:
            continue
        s = s.assign(size=[_shape_key(x)[0] for x in s["shape"]]).sort_values("size")
        # Colors repeat after ten providers: captured steps are dashed, to tell them apart.
        a.plot(s["size"] ** 0.5, s["median_ms"], marker="o", label=pretty(p), color=color[p],
               linestyle="--" if GRAPH in p else "-")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("matrix side (square, float32)")
    a.set_ylabel("ms per step (median)")
    a.set_title("step time, k = 16", fontsize=10)
    a.legend(fontsize=6.5)
    ref_shape = ok["shape"].value_counts().index[0]
    s = base[(base["shape"] == ref_shape) & base["err_top_r"].notna()]
    for p in s["provider"].unique():
        c = s[s["provider"] == p]
        b.scatter(c["median_ms"], c["err_top_r"].clip(lower=1e-12), label=pretty(p), s=18,
                  color=color.get(p), marker="^" if GRAPH in p else "o")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("ms per step (median)")
    b.set_ylabel("max relative error, top r")
    b.set_title(f"time vs error, {ref_shape}, k = 8..64", fontsize=10)
    b.legend(fontsize=6.5)
    first = df.iloc[0]
    fig.suptitle(f"{first['device']}, {first['date_utc']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


README_START = "<!-- bench-table:start (python -m bench.report --readme README.md rewrites this) -->"
README_END = "<!-- bench-table:end -->"


def readme_section(df) -> str:
    """The README's short performance table: the 1024^2 and 2048^2 float32 rows (k = 16, no
    momentum) and the whole models with momentum, for the first SpectralSGD provider in
    :func:`_backends`' order (on the CPU: "auto", the library's default, with its default schedule)."""
    ok = df[df["status"] == "ok"]
    first = df.iloc[0]
    spectral = _backends(ok)
    if not spectral:
        return ""
    p = spectral[0]
    mat = ok[(ok["workload"] == "matrix") & (ok["dtype"] == "float32") & (ok["momentum"] == 0)]
    rows = []
    for shape in sorted(mat["shape"].unique(), key=_shape_key)[-2:]:
        s = mat[mat["shape"] == shape]
        sp, sgd = _one(s, provider=p, k=16), _one(s, provider="sgd")
        svd, low = _one(s, provider="sgd+svdvals"), _one(s, provider="sgd+svd_lowrank", k=16)
        if sp is None:
            continue
        rows.append([shape.replace("x", " x "), ms(_get(sgd, "median_ms")),
                     f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])} SGD)",
                     f"{ms(_get(svd, 'median_ms'))} ({ratio(sp['vs_sgd_svdvals'])} slower than ours)",
                     f"{ms(_get(low, 'median_ms'))} ({ratio(sp['vs_sgd_svd_lowrank'])} slower)",
                     f"{err(sp['err_top_r'])} / {err(_get(low, 'err_top_r'))}"])
    models = ok[ok["workload"].isin(list(workloads.MODELS)) & (ok["dtype"] == "float32")]
    for _, g in models.groupby("workload", sort=False):
        sp, sgd = _one(g, provider=p, k=16), _one(g, provider="sgd")
        svd, low = _one(g, provider="sgd+svdvals"), _one(g, provider="sgd+svd_lowrank", k=16)
        if sp is None:
            continue
        rows.append([f"{sp['shape']} ({int(sp['n_matrices'])} matrices, momentum 0.9)",
                     ms(_get(sgd, "median_ms")), f"{ms(sp['median_ms'])} ({ratio(sp['overhead'])} SGD)",
                     ms(_get(svd, "median_ms")), ms(_get(low, "median_ms")),
                     f"{err(sp['err_top_r'])} / {err(_get(low, 'err_top_r'))}"])
    device = f"{first['device']} ({first['device_type']}, {int(first['threads'])} threads)"
    lines = [README_START,
             f"Measured by `python -m bench` on **{device}**, torch {first['torch_version']}, "
             f"commit `{str(first['commit'])[:10]}`, {str(first['date_utc'])[:10]}. Per optimizer "
             f"step, float32, top 8 of k = 16; error = largest relative error of the top 8 after "
             f"30 tracked steps against float64 `torch.linalg.svdvals`.{probe_range(df)}", ""]
    lines += _table(["workload", "SGD", pretty(p), "SGD + `svdvals`", "SGD + `svd_lowrank(niter=2)`",
                     "error: ours / svd_lowrank"], rows)
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(path: Path, section: str) -> bool:
    """Replace the text between the bench-table markers of ``path``; False if it has none."""
    text = Path(path).read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start or not section:
        return False
    Path(path).write_text(text[:start] + section + text[end + len(README_END):])
    return True


def write_report(df, out_dir: Path, table_name: str = "TABLE.md") -> list[Path]:
    """Write the markdown table and the plot of the rows ``df`` (one run) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = df.iloc[0]
    table = out_dir / table_name
    table.write_text(build_tables(df) + "\n")
    slug = "".join(ch if ch.isalnum() else "-" for ch in str(first["device"]).lower())
    slug = "-".join(x for x in slug.split("-") if x)
    png = plot(df, out_dir / f"{first['device_type']}-{slug}-{str(first['run_id'])[:8]}.png")
    return [table] + ([png] if png else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="*", type=Path)
    p.add_argument("--run-id", default=None,
                   help="a run id, or several separated by commas (one suite run in parts)")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS_DIR)
    p.add_argument("--table-name", default="TABLE.md")
    p.add_argument("--readme", type=Path, default=None,
                   help="also rewrite the performance table between the markers of this README")
    args = p.parse_args(argv)
    paths = args.csv or sorted(results.RESULTS_DIR.glob("*.csv"))
    if not paths:
        raise SystemExit("no result CSV found")
    df = pick_run(results.read_rows(paths), args.run_id)
    for written in write_report(df, args.out_dir, args.table_name):
        print(f"wrote {written}")
    if args.readme is not None:
        if not update_readme(args.readme, readme_section(df)):
            raise SystemExit(f"{args.readme}: no bench-table markers (or no SpectralSGD rows)")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

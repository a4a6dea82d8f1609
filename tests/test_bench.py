"""The benchmarks: the --quick suite end to end (schema, accuracy within the stated bounds,
exact updates), plus the pieces it is built from. No timing is asserted: only that times exist
and are ordered (p20 <= median <= p80)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import results, timing
from bench.harness import Group, measure_group
from bench.providers import lowrank_backends, provider_names
from bench.subspace_iter import WarmSubspaceIteration
from bench.workloads import synthetic_matrix

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--threads", "1",
                           "--out-dir", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1
    return out, results.read_rows(csvs), proc.stdout


@pytest.mark.slow
def test_quick_schema(quick_run):
    out, df, _ = quick_run
    with open(next(out.glob("*.csv"))) as f:
        assert f.readline().strip().split(",") == results.COLUMNS
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["provider", "status"]]
    assert df["run_id"].nunique() == 1 and (df["suite"] == "quick").all()
    for col in ("device", "torch_version", "lowrank_version", "commit", "date_utc"):
        assert (df[col] != "").all(), col
    assert (df["device_type"] == "cpu").all()
    # how fast the machine ran before each group (bench.env.machine_probe)
    for col in ("probe_matmul_gflops", "probe_copy_gbps"):
        assert (df[col] > 0).all() and bool(df[col].notna().all()), col
    # every provider in every group: k-free ones once, the others once per k
    names = provider_names(torch.device("cpu"), lowrank_backends(torch.device("cpu"))[0])
    # Every schedule of the default backend, and the pure torch backend beside it.
    default = "auto" if "spectral_sgd[auto]" in names else "torch"
    assert {"spectral_sgd[torch]", f"spectral_sgd[{default}-both]",
            f"spectral_sgd[{default}-alternate]"} <= set(names)
    for group, g in df.groupby("group"):
        assert set(g["provider"]) == set(names), group
        assert len(g) == len(names)
    assert (df["median_ms"] > 0).all()
    assert (df["p20_ms"] <= df["median_ms"]).all() and (df["median_ms"] <= df["p80_ms"]).all()
    assert (df["n_samples"] >= 3).all()
    # the anchors' own ratios are 1 by construction; memory is NaN on the CPU and says so
    assert (df[df["provider"] == "sgd"]["vs_sgd"] == 1).all()
    assert (df[df["provider"] == "sgd+svdvals"]["vs_sgd_svdvals"] == 1).all()
    assert df["peak_mem_mb"].isna().all() and df["peak_mem_kind"].str.contains("CPU").all()
    assert df["gbps"].isna().all()


@pytest.mark.slow
def test_quick_accuracy_within_bounds(quick_run):
    _, df, _ = quick_run
    tracking = df[df["provider"].str.contains(r"svd|subspace|spectral|tracker")]
    untracked = df[~df.index.isin(tracking.index)]
    assert untracked["err_top_r"].isna().all()
    assert tracking["err_bound"].notna().all()
    bad = tracking[~(tracking["err_top_r"] <= tracking["err_bound"])]
    assert bad.empty, bad[["group", "provider", "k", "err_top_r", "err_bound"]]
    assert (tracking["err_top_r_s1"] <= tracking["err_top_r"] * (1 + 1e-12)).all()
    # the project's target: top-8 error < 1e-3 after the warm-up, on every workload
    spectral = df[df["provider"] == "spectral_sgd[torch]"]
    assert (spectral["err_top_r"] < 1e-3).all()
    # SpectralSGD updates exactly as torch.optim.SGD; the tracker does not touch the weights
    for name in ("spectral_sgd[torch]", "sgd+subspace", "adamw+tracker[torch]"):
        assert (df[df["provider"] == name]["update_max_abs_diff"] == 0).all(), name


@pytest.mark.slow
def test_quick_report(quick_run):
    out, df, stdout = quick_run
    table = (out / "TABLE.md").read_text()
    assert f"Measured on **{df.iloc[0]['device']}**" in table
    assert df.iloc[0]["date_utc"] in table
    assert "| 1024x1024 | SpectralSGD (torch) |" in table
    # the range of the machine probe over the groups, and none for rows of older runs without it
    from bench import report

    lo = df["probe_matmul_gflops"].min()
    assert f"Machine probe before each group: float32 matmul {lo:.0f}-" in table
    cols = ["probe_matmul_gflops", "probe_copy_gbps"]
    assert report.probe_range(df.drop(columns=cols)) == ""
    assert report.probe_range(df.assign(probe_matmul_gflops=float("nan"))) == ""
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and 0 < pngs[0].stat().st_size < 200_000


def test_subspace_iteration_converges_and_batches():
    gen = torch.Generator().manual_seed(0)
    mats = [synthetic_matrix(96, 80, gen=gen, device="cpu", dtype=torch.float32) for _ in range(3)]
    mats.append(synthetic_matrix(50, 120, gen=gen, device="cpu", dtype=torch.float32))
    it = WarmSubspaceIteration(mats, 16)
    assert len(it.groups) == 2
    for _ in range(30):
        it.step(mats)
    for W, s in zip(mats, it.sigma()):
        exact = torch.linalg.svdvals(W.double())[:8]
        assert torch.all(s[:8] <= exact * (1 + 1e-6))  # Rayleigh-Ritz values are lower bounds
        assert float(((s[:8] - exact) / exact).abs().max()) < 1e-5
    with pytest.raises(ValueError):
        WarmSubspaceIteration([torch.zeros(8, 8)], 16)


def test_measure_group_small_matrix():
    providers = provider_names(torch.device("cpu"), ["torch"])
    rows = measure_group(Group("matrix", (64, 48), "float32", 0.9, (8, 16)), "cpu", providers,
                         budget=timing.Budget(2, 3, 0.01, 5.0), warmup=30, log=lambda *a: None)
    by = {(r["provider"], r["k"]): r for r in rows}
    assert len(rows) == 5 + 4 * 2  # k-free providers once, the others per k
    for k in (8, 16):
        r = by[("spectral_sgd[torch]", k)]
        assert r["status"] == "ok" and r["rank"] == k // 2
        assert r["err_top_r"] < 1e-4 and r["update_max_abs_diff"] == 0
        assert r["vs_sgd_svd_lowrank"] == pytest.approx(
            by[("sgd+svd_lowrank", k)]["median_ms"] / r["median_ms"])
    assert by[("sgd+svdvals", None)]["rank"] == 8


def test_graph_providers_replay_on_frozen_gradients(monkeypatch):
    """The captured providers' plumbing, with the CUDA graph replaced by a plain call (the
    capture itself runs in the GPU suite): the first step clones the gradients into static ones
    and captures, later steps only replay and the harness stops setting gradients; the rows
    carry their error (within the bound), no update diff against SGD (other gradients), and
    their overhead over the captured untracked optimizer."""
    import bench.providers as P

    captured = []

    def fake_capture(step):
        step()  # the capture (a real one records instead of running)
        captured.append(step)
        return step

    monkeypatch.setattr(P, "capture", fake_capture)
    providers = ["sgd", "sgd_graph", "spectral_sgd[torch-both]", "spectral_sgd_graph[torch-both]",
                 "adamw", "adamw_graph", "adamw+tracker_graph[torch-both]"]
    rows = measure_group(Group("matrix", (64, 48), "float32", 0.9, (8,)), "cpu", providers,
                         budget=timing.Budget(2, 3, 0.01, 5.0), warmup=30, log=lambda *a: None)
    by = {r["provider"]: r for r in rows}
    assert len(captured) == 4 and all(r["status"] == "ok" for r in rows)
    for name in ("spectral_sgd_graph[torch-both]", "adamw+tracker_graph[torch-both]"):
        assert by[name]["err_top_r"] < by[name]["err_bound"]
        assert "update_max_abs_diff" not in by[name]
    assert by["spectral_sgd_graph[torch-both]"]["overhead"] == pytest.approx(
        by["spectral_sgd_graph[torch-both]"]["median_ms"] / by["sgd_graph"]["median_ms"])
    assert by["spectral_sgd[torch-both]"]["update_max_abs_diff"] == 0
    assert "sgd_graph" in provider_names(torch.device("cuda"), ["torch", "cupy"])
    assert "spectral_sgd_graph[torch]" not in provider_names(torch.device("cuda"), ["torch", "cupy"])


def test_interleaved_sample_counts():
    calls = []
    tasks = {"a": (lambda: None, lambda: calls.append("a")),
             "b": (lambda: None, lambda: calls.append("b"))}
    s = timing.time_interleaved(tasks, torch.device("cpu"), timing.Budget(4, 6, 1e9, 1e9))
    assert len(s["a"]) == len(s["b"]) == 6 and len(calls) == 12
    assert calls[:4] == ["a", "b", "b", "a"]  # the order rotates every round
    med, p20, p80 = timing.quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


def test_append_rows_schema(tmp_path):
    path = tmp_path / "x.csv"
    assert results.append_rows(path, [{"provider": "a", "median_ms": 1.5}]) == path
    assert results.append_rows(path, [{"provider": "b", "median_ms": float("nan")}]) == path
    df = results.read_rows([path])
    assert list(df["provider"]) == ["a", "b"] and math.isnan(df["median_ms"][1])
    with pytest.raises(KeyError):
        results.append_rows(path, [{"not_a_column": 1}])
    old = tmp_path / "old.csv"
    old.write_text("provider,median_ms\n")
    assert results.append_rows(old, [{"provider": "c"}]).name == "old-v2.csv"


def test_breakdown_rows():
    from bench.breakdown import TOTAL, breakdown

    rows = breakdown(64, 8, "cpu", rounds=3, log=lambda *a: None)
    by = {r["provider"].removeprefix("component:"): r for r in rows}
    assert by[TOTAL]["overhead"] == 1.0 and by[TOTAL]["n_samples"] == 3
    assert any(name.startswith("norms") for name in by) and any(n.startswith("rest") for n in by)
    assert all(r["workload"] == "breakdown" and set(r) <= set(results.COLUMNS) for r in rows)


def test_log_cost_times_the_step_with_and_without_a_log():
    from bench.log_cost import measure

    out = measure("gpt2-tiny", torch.device("cpu"), "auto", rounds=3, log=lambda *a: None)
    assert list(out) == ["torch.optim.SGD", "SpectralSGD", "SpectralSGD + RunLog",
                         "SpectralSGD(track_grad) + RunLog"]
    for times in out.values():
        assert 0 < times["p20_ms"] <= times["median_ms"] <= times["p80_ms"]


def test_full_gpu_suite_runs_in_parts_by_workload_or_group_id():
    """Every group of the full GPU suite is picked by exactly one of the parts the GPU check
    documents (bench/README.md), and group ids select what workload names cannot."""
    from bench import suites

    groups = suites.groups_of("cuda", "full")
    parts = [["1024x1024/*", "2048x2048/*", "4096x4096/*"], ["8192x8192/*", "4096x16384/*"],
             ["mlp", "gpt2", "resnet", "digits"]]
    for g in groups:
        assert sum(suites.group_selected(g, p) for p in parts) == 1, g.id
    assert all(suites.group_selected(g, None) for g in groups)
    big = [g.id for g in groups if suites.group_selected(g, ["8192x8192/*"])]
    assert big == ["8192x8192/float32/mom0/k8,16,32,64"]


def test_step_profile_attributes_host_time_and_restores_the_library(tmp_path):
    from bench import step_profile
    from lowrank import backends, trackset

    originals = [getattr(owner, attr) for _, owner, attr in step_profile.PARTS]
    out = tmp_path / "profile.json"
    assert step_profile.main(["--device", "cpu", "--shape", "48", "--k", "4", "--backends",
                              "torch", "--steps", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["backends"][0]
    host = row["host_ms"]
    assert row["step_ms"] > 0 and host["step (host)"] >= host["finish_step"] > 0
    assert host["finish_step"] >= host.get("commit", 0.0) and "pass" in host
    # The timers are taken off again: the library's functions are its own.
    assert [getattr(owner, attr) for _, owner, attr in step_profile.PARTS] == originals
    assert backends.fused_sgd_sketch.__module__ == "lowrank.backends"
    assert trackset.TrackedSet.finish_step.__qualname__ == "TrackedSet.finish_step"


def test_readme_table_is_rewritten_from_the_rows(quick_run, tmp_path):
    from bench import report

    _, df, _ = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_START}\nstale numbers\n{report.README_END}\nafter\n")
    section = report.readme_section(df)
    assert report.update_readme(readme, section)
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert df.iloc[0]["torch_version"] in text and str(df.iloc[0]["date_utc"])[:10] in text
    assert "Machine probe before each group" in text
    # The README shows the library's default: "auto" (the C kernel) where it builds, else torch.
    default = "spectral_sgd[auto]" if (df["provider"] == "spectral_sgd[auto]").any() else "spectral_sgd[torch]"
    sp = df[(df["provider"] == default) & (df["shape"] == "1024x1024") & (df["k"] == 16)
            & (df["dtype"] == "float32") & (df["momentum"] == 0) & (df["workload"] == "matrix")]
    assert len(sp) == 1 and f"| 1024 x 1024 | " in text
    assert report.ms(float(sp.iloc[0]["median_ms"])) in text
    # Without markers nothing is written.
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# nothing to replace\n")
    assert not report.update_readme(plain, section)
    assert plain.read_text() == "# nothing to replace\n"


def test_pytest_benchmark_suite_runs():
    """bench/test_cpu_pytest_benchmark.py (pytest-benchmark view of the CPU suite) stays runnable:
    the smallest size, every provider, timing disabled (one call each)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "bench" / "test_cpu_pytest_benchmark.py"),
                           "--benchmark-disable", "-k", "256x256"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from bench.test_cpu_pytest_benchmark import PROVIDERS

    assert f"{len(PROVIDERS)} passed" in proc.stdout


def test_report_picks_a_run_in_parts():
    """The GPU's full suite runs in parts (one run id each): the report takes several ids as
    one run, rejects unknown ones, and defaults to the latest full run."""
    import pandas as pd

    from bench.report import pick_run

    df = pd.DataFrame({"run_id": ["a", "a", "b", "c", "d"],
                       "suite": ["full", "full", "full", "full", "quick"]})
    assert list(pick_run(df, "b, a")["run_id"]) == ["a", "a", "b"]
    assert list(pick_run(df)["run_id"]) == ["c"]  # the latest full run, not the quick one
    with pytest.raises(SystemExit, match="no rows of run zz"):
        pick_run(df, "a,zz")


def _report_rows(tmp_path, medians: dict):
    """Result rows of one 512x512 group on CUDA, through the CSV as the report reads them:
    ``medians`` maps (provider, k) to ms; overhead and the anchors' ratios are computed as the
    harness does (a captured step's overhead is over the captured untracked optimizer)."""
    family = {"spectral_sgd": "sgd", "adamw": "adamw", "adamw+tracker": "adamw",
              "sgd_graph": "sgd_graph", "spectral_sgd_graph": "sgd_graph",
              "adamw_graph": "adamw_graph", "adamw+tracker_graph": "adamw_graph"}
    svdvals = medians[("sgd+svdvals", None)]
    rows = []
    for (provider, k), t in medians.items():
        base = family.get(provider.partition("[")[0], "sgd")
        low = medians.get(("sgd+svd_lowrank", k), math.nan)
        rows.append({
            "run_id": "r1", "suite": "full", "group": "512x512/float32/mom0/k16,32", "status": "ok",
            "provider": provider, "workload": "matrix", "shape": "512x512", "n_matrices": 1,
            "total_numel": 512 * 512, "dtype": "float32", "k": k, "momentum": 0.0,
            "median_ms": t, "overhead": t / medians[(base, None)], "vs_sgd_svdvals": svdvals / t,
            "vs_sgd_svd_lowrank": low / t, "err_top_r": 1e-7 if k else math.nan,
            "update_max_abs_diff": 0.0, "device": "Test GPU", "device_type": "cuda", "threads": 4,
            "torch_version": "2.x", "lowrank_version": "0.1.0", "commit": "abc",
            "commit_dirty": False, "date_utc": "2026-11-23T00:00:00Z"})
    results.append_rows(tmp_path / "rows.csv", rows)
    return results.read_rows([tmp_path / "rows.csv"])


def test_report_shows_the_captured_step_beside_the_eager_one(tmp_path):
    """CUDA-graph providers get a table of their own (captured ms, x the captured untracked
    optimizer, beside the eager step and its ratio); the other tables do not change."""
    from bench import report

    eager = {("sgd", None): 0.4, ("sgd_fused", None): 0.3, ("sgd+svdvals", None): 40.0,
             ("adamw", None): 0.8}
    for k, (sp, tr) in {16: (2.0, 2.4), 32: (2.2, 2.8)}.items():
        eager.update({("sgd+svd_lowrank", k): 3.0, ("sgd+subspace", k): 1.0,
                      ("spectral_sgd[cupy]", k): sp, ("adamw+tracker[cupy]", k): tr})
    captured = {("sgd_graph", None): 0.1, ("adamw_graph", None): 0.6,
                ("spectral_sgd_graph[cupy]", 16): 0.6, ("spectral_sgd_graph[cupy]", 32): 0.9,
                ("adamw+tracker_graph[cupy]", 16): 1.5, ("adamw+tracker_graph[cupy]", 32): 1.8,
                # captured without an eager row of its own, and at one k only
                ("adamw+tracker_graph[triton]", 16): 0.9}
    plain = report.build_tables(_report_rows(tmp_path / "plain", eager))
    with_graph = report.build_tables(_report_rows(tmp_path / "graph", {**eager, **captured}))

    assert "captured" not in plain.lower()
    workload = "| 512x512 float32, momentum 0 | "
    lines = with_graph.split("\n")
    rows = [line.removeprefix(workload) for line in lines if line.startswith(workload)]
    assert rows == [
        "16 (8) | SpectralSGD (cupy) | SGD 400 us / 100 us | 2.00 ms (5.00x) | 600 us (6.00x) |",
        "16 (8) | AdamW + SpectrumTracker (cupy) | AdamW 800 us / 600 us | 2.40 ms (3.00x) | "
        "1.50 ms (2.50x) |",
        "16 (8) | AdamW + SpectrumTracker (triton) | AdamW 800 us / 600 us | - | 900 us (1.50x) |",
        "32 (16) | SpectralSGD (cupy) | SGD 400 us / 100 us | 2.20 ms (5.50x) | 900 us (9.00x) |",
        "32 (16) | AdamW + SpectrumTracker (cupy) | AdamW 800 us / 600 us | 2.80 ms (3.50x) | "
        "1.80 ms (3.00x) |",
    ]
    # Less its captured table (heading to the blank line after the last row), the report is
    # the one of the rows without graph providers, line for line.
    start = next(i for i, line in enumerate(lines) if line.startswith("**Captured in a CUDA graph"))
    end = lines.index(workload + rows[-1]) + 2
    assert lines[:start] + lines[end:] == plain.split("\n")
    assert report.pretty("spectral_sgd_graph[cupy]") == "SpectralSGD (cupy), captured"
    assert report.pretty("sgd_graph") == "SGD, captured"

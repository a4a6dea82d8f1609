"""bench/gpu_check.py, the driver of the GPU session, checked where it can be on the CPU: argument
parsing into parts, the per-file pytest runs with streamed logs, and the smoke checks (the Triton
ones run under the interpreter; the CuPy ones must fail cleanly and be recorded, not raise)."""

from __future__ import annotations

import json
import os

import pytest

from bench import gpu_check, log_cost

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_parts_parsing():
    assert gpu_check.parse_args(["--out", "x"]).parts == list(gpu_check.PARTS)
    args = gpu_check.parse_args(["--out", "x", "--parts", "tests,kernels", "--skip-tests"])
    assert args.parts == ["kernels"]
    assert gpu_check.parse_args(["--out", "x", "--skip-bench"]).parts == ["smoke", "tests"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--parts", "smoke,everything"])


def test_pytest_runs_one_process_per_file_and_streams_logs(tmp_path, monkeypatch):
    good = tmp_path / "test_good.py"
    good.write_text("def test_ok():\n    print('hello from the test')\n")
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test_fails():\n    assert 1 == 2\n")
    monkeypatch.setattr(gpu_check, "GPU_TEST_FILES", (str(good), str(bad)))
    out = tmp_path / "out"
    out.mkdir()
    summary = gpu_check.run_gpu_tests(out, timeout=120, extra="-s")
    runs = summary["runs"]
    assert runs["test_good"]["returncode"] == 0 and runs["test_good"]["tests"] == 1
    assert runs["test_bad"]["returncode"] == 1 and runs["test_bad"]["failures"] == 1
    assert summary["returncode"] == 1
    assert "hello from the test" in (out / "test_good.log").read_text()
    assert json.loads((out / "pytest-gpu-summary.json").read_text())["returncode"] == 1


@pytest.mark.skipif(not INTERPRET, reason="the Triton checks need TRITON_INTERPRET=1 on the CPU")
def test_smoke_checks_record_every_outcome(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(gpu_check, "DEV", "cpu")
    summary = gpu_check.run_smoke(tmp_path)
    by = {c["check"]: c for c in summary["checks"]}
    assert set(by) == {name for name, _ in gpu_check.smoke_checks()}
    for name in ("triton fused_sgd_sketch", "triton sketch", "SpectralSGD triton"):
        assert by[name]["ok"], by[name]
    for name in ("cupy fused_sgd_sketch", "cupy postprocess k=64", "SpectralSGD cupy"):
        # No GPU here: each CuPy check fails with its own clear error, and the others still ran.
        assert not by[name]["ok"] and by[name]["error"], by[name]
    assert summary["ok"] is False
    assert json.loads((tmp_path / "smoke.json").read_text())["checks"][0]["check"] == "triton fused_sgd_sketch"
    gpu_check.write_summary(tmp_path, None)
    assert "| triton sketch | yes |" in (tmp_path / "summary.md").read_text()


def test_fused_check_passes_the_reference_and_fails_a_wrong_kernel(monkeypatch):
    """The correctness check run before each kernel benchmark (and by bench/ab_fused_pass.py)."""
    from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch

    monkeypatch.setattr(gpu_check, "DEV", "cpu")
    assert gpu_check.fused_errors(fused_sgd_sketch_torch, 40, 30, 4, 0.9) == (0.0, 0.0, 0.0)
    assert gpu_check._check_fused(fused_sgd_sketch_torch, 40, 30, 4, 0.9).startswith("ok ")

    def halves_z(*args, **kw):
        out, buf = fused_sgd_sketch_torch(*args, **kw)
        return out._replace(Z=out.Z / 2), buf

    werr, ey, ez = gpu_check.fused_errors(halves_z, 40, 30, 4, 0.0)
    assert werr == 0.0 and ey == 0.0 and abs(ez - 0.5) < 1e-6
    assert gpu_check._check_fused(halves_z, 40, 30, 4, 0.0).startswith("FAILED ")


def test_logcost_part_writes_its_rows(tmp_path, monkeypatch):
    # The part as the GPU machine runs it, on the CPU and a tiny model.
    monkeypatch.setattr(gpu_check, "DEV", "cpu")
    gpu_check._run_log_cost(tmp_path, workloads=("gpt2-tiny",), rounds=3)
    found = json.loads((tmp_path / "log_cost.json").read_text())
    assert found["info"]["device_type"] == "cpu"
    assert set(found["gpt2-tiny"]) == set(log_cost.LABELS)
    assert "SpectralSGD + RunLog" in (tmp_path / "log_cost.txt").read_text()

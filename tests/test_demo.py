"""``lowrank demo``: the quick run end to end, its report, its audit, and the check logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lowrank import demo  # noqa: E402

CHECK_TITLES = ["lower rank with smaller batch size", "lower rank with larger learning rate",
                "lower rank with larger weight decay", "no rank collapse without weight decay"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = demo.main(["--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.timeout(240)
def test_quick_demo_writes_the_run_folder(quick_run):
    out, summary = quick_run
    for name in ("report.md", "summary.json", "rank_over_steps.png", "final_rank_vs_hparams.png",
                 "rank_by_layer.png", "spectrum_heatmap.png", "audit.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for title in CHECK_TITLES:
        assert title in report
    assert report.count("HELD") + report.count("DID NOT HOLD") >= 4
    assert "## Audit" in report and "audit PASSED" in report
    for png in ("rank_over_steps.png", "final_rank_vs_hparams.png", "spectrum_heatmap.png"):
        assert f"({png})" in report
    assert [c["title"] for c in summary["checks"]] == CHECK_TITLES
    assert all(c["held"] in (True, False) for c in summary["checks"])


def test_quick_demo_logs_every_matrix_every_step(quick_run):
    import lowrank

    out, summary = quick_run
    results = summary["results"]
    assert len(results) >= 4 and any(r["config"]["weight_decay"] == 0 for r in results)
    for r in results:
        df = lowrank.load_log(r["run_dir"])
        steps = r["config"]["steps"]
        names = sorted(set(df["name"]))
        assert names == ["fc1.weight", "fc2.weight", "out.weight"]
        assert len(df) == steps * len(names)
        assert sorted(set(df["step"])) == list(range(steps))
        for col in ("numerical_rank", "numerical_rank_upper", "rank_censored", "stable_rank"):
            assert col in df.columns
        assert 0.0 <= r["test_acc"] <= 1.0


def test_quick_demo_audit_within_the_trackers_accuracy(quick_run):
    _, summary = quick_run
    audit = summary["audit"]
    assert audit["passed"]
    assert audit["sigma_max_err"] <= demo.AUDIT_SIGMA_TOL
    # Ranks: counted ones agree with the exact rank, censored ones bound it.
    for r in summary["results"]:
        for a in r["audits"]:
            assert a["rank_tracked"] <= a["rank_upper"]
            if a["rank_censored"]:
                assert a["rank_tracked"] <= a["rank_exact"] <= a["rank_upper"], a
            else:
                assert abs(a["rank_tracked"] - a["rank_exact"]) <= 1, a
            # The tracked stable rank uses a lower bound of sigma_1: never (much) below the truth.
            assert a["stable_rank_tracked"] >= a["stable_rank_exact"] * (1 - 1e-3)
        # The last audit is at the final step, so every final rank is exact.
        assert max(a["step"] for a in r["audits"]) == r["config"]["steps"]


# -- the logic, on made-up results (no training) ----------------------------------------------

def _fake(b, lr, wd, ranks, init=(64, 128, 10)):
    layers = ["fc1", "fc2", "out"]
    audits = [{"layer": l, "step": 10, "rank_exact": x, "rank_tracked": min(x, 32),
               "rank_upper": x if x < 32 else 128, "rank_censored": x >= 32,
               "stable_rank_tracked": 2.0} for l, x in zip(layers, ranks)]
    cfg = {"batch_size": b, "lr": lr, "weight_decay": wd, "steps": 10, "epochs": 1.0}
    return {"config": cfg, "id": f"B{b}_lr{lr}_wd{wd}", "audits": audits,
            "init_ranks": dict(zip(layers, init))}


def _settings(**kw):
    args = demo.build_parser().parse_args(["--quick", "--out", "unused"])
    s = demo.settings_from_args(args)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_checks_say_held_and_did_not_hold():
    s = _settings(base=(16, 0.2, 0.05))
    results = [_fake(16, 0.2, 0.05, (60, 30, 9)), _fake(64, 0.2, 0.05, (64, 100, 10)),
               _fake(16, 0.1, 0.05, (60, 20, 9)),            # larger lr, higher rank: fails
               _fake(16, 0.2, 0.0, (64, 127, 10)), _fake(16, 0.2, 0.02, (64, 90, 10))]
    checks = demo.check_predictions(results, s)
    assert [c["held"] for c in checks] == [True, False, True, True]
    assert "99 (B=16) < 174 (B=64)" in checks[0]["detail"]
    assert checks[1]["total_ranks"] == [89, 99]
    # a control that collapses
    results[3] = _fake(16, 0.2, 0.0, (64, 40, 10))
    assert demo.check_predictions(results, s)[3]["held"] is False


def test_grid_equal_epochs_and_steps():
    s = _settings(base=(16, 0.2, 0.05), epochs=2.0)
    grid = demo.make_grid(s, 1600)
    by = {(c.batch_size, c.lr, c.weight_decay): c for c in grid}
    assert by[(16, 0.2, 0.05)].steps == 200 and by[(64, 0.2, 0.05)].steps == 50
    assert (16, 0.2, 0.0) in by  # the weight-decay-free control
    assert len(grid) == len(set(grid))
    s.equal = "steps"
    assert {c.steps for c in demo.make_grid(s, 1600)} == {200}
    assert demo.audit_steps(100, 3) == [33, 67, 100]
    assert demo.audit_steps(2, 4) == [1, 2]


def test_cli_wires_demo(capsys):
    from lowrank import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert demo.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err

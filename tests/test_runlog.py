"""RunLog: per-step, per-matrix Parquet rows, buffered on the device, crash-safe part files."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import lowrank
from lowrank import RunLog, SpectralSGD, SpectrumResult, SpectrumTracker, load_config, load_log

REPO = Path(__file__).resolve().parent.parent
# Every metric of a SpectrumResult is a column (the identity fields and extras aside).
METRICS = [f.name for f in dataclasses.fields(SpectrumResult)
           if f.name not in ("name", "shape", "step", "extra")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6))


def set_grads(model, step):
    for i, p in enumerate(model.parameters()):
        g = torch.Generator().manual_seed(100 * step + i)
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        set_grads(model, step)
        opt.step()


def parts(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "spectra").iterdir())


def test_rows_hold_step_name_shape_every_metric_and_sigma(tmp_path):
    model = make_model()
    with RunLog(tmp_path, flush_every=100) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3, log=log)
        train(model, opt, 5)
    df = pd.read_parquet(tmp_path / "spectra")
    loaded = load_log(tmp_path)
    assert len(df) == len(loaded) == 5 * 2  # 5 steps x 2 matrices (biases are not tracked)
    assert {"step", "name", "shape", "m", "n", *METRICS} <= set(loaded.columns)
    pd.testing.assert_frame_equal(
        df.sort_values(["step", "name"]).reset_index(drop=True), loaded)
    assert loaded["step"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert loaded["name"].tolist()[:2] == ["0.weight", "2.weight"]
    last = loaded[loaded["step"] == 4].set_index("name")
    for name, res in opt.spectra().items():
        row = last.loc[name]
        assert row["shape"] == f"{res.shape[0]}x{res.shape[1]}"
        assert (row["m"], row["n"]) == res.shape
        assert list(row["sigma"]) == res.sigma.tolist()  # exact: float64 all the way
        for key in METRICS:
            if key != "sigma":
                assert row[key] == getattr(res, key).item(), key


def test_config_json_holds_optimizer_config(tmp_path):
    model = make_model()
    with RunLog(tmp_path, config={"run": "baseline", "seed": 1}) as log:
        SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, rank=3,
                    track_every=2, audit_every=5, log=log)
    cfg = load_config(tmp_path)
    assert cfg["run"] == "baseline" and cfg["seed"] == 1  # the user's keys stay
    expected = dict(name="SpectralSGD", lr=0.05, momentum=0.9, weight_decay=1e-4, dampening=0.0,
                    nesterov=False, maximize=False, rank=3, track_every=2, audit_every=5,
                    track_grad=False, seed=0, backend="auto")
    assert {k: cfg["optimizer"][k] for k in expected} == expected
    assert cfg["tracked"] == {"0.weight": [12, 20], "2.weight": [6, 12]}


def test_flush_every_sets_the_number_of_part_files(tmp_path):
    model = make_model()
    log = RunLog(tmp_path, flush_every=3)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, track_every=2, log=log)
    train(model, opt, 13)  # tracked at 0, 2, ..., 12: 7 records
    assert parts(tmp_path) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(load_log(tmp_path)) == 6 * 2
    log.close()
    assert parts(tmp_path) == [f"part-{i:05d}.parquet" for i in range(3)]
    df = load_log(tmp_path)
    assert sorted(set(df["step"])) == list(range(0, 13, 2))


class _NoSync:
    """Make every host-reading Tensor method raise while active."""

    NAMES = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def boom(*args, **kwargs):
            raise AssertionError("host synchronisation")
        for name in self.NAMES:
            self.mp.setattr(torch.Tensor, name, boom)
        # Take the GPU code path on these CPU tensors: CPU-only shortcuts that read values on
        # the host (free there, a sync on a GPU) are switched off, as they are for CUDA tensors.
        self.mp.setattr(lowrank._checks, "host_reads_are_free", lambda t: False)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def test_record_and_tracking_step_do_not_sync(tmp_path, monkeypatch):
    model = make_model()
    log = RunLog(tmp_path, flush_every=10)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3,
                      track_grad=True, log=log)
    train(model, opt, 2)
    set_grads(model, 2)
    with _NoSync(monkeypatch):
        with pytest.raises(AssertionError, match="host synchronisation"):
            torch.ones(1).item()  # the guard is armed
        opt.step()  # update + sketch + metrics + log.record: no host read
        metrics = opt.tracked.trackers["0.weight"].metrics(3)
        log.record(99, {"0.weight": metrics}, {"0.weight": (12, 20)})
    assert parts(tmp_path) == []  # 4 records < flush_every: nothing written yet
    log.close()
    assert sorted(set(load_log(tmp_path)["step"])) == [0, 1, 2, 99]


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from torch import nn
    import lowrank

    run_dir, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    log = lowrank.RunLog(run_dir, flush_every=2)
    opt = lowrank.SpectralSGD(model.named_parameters(), lr=0.01, rank=2, log=log)
    if mode == "mid-write":
        import pyarrow.parquet as pq
        real, calls = pq.write_table, []
        def dying_write(table, where, **kwargs):
            calls.append(where)
            if len(calls) == 3:  # the third part dies half-written
                with open(where, "wb") as f:
                    f.write(b"PAR1 half a file")
                os._exit(3)
            real(table, where, **kwargs)
        pq.write_table = dying_write
    for step in range(100):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 6:
            os._exit(3)  # killed: no close(), no atexit, step 6 still buffered
""")


@pytest.mark.parametrize("mode, n_parts, steps", [
    ("exit", 3, list(range(6))),
    ("mid-write", 2, list(range(4))),
], ids=["killed-between-writes", "killed-while-writing"])
def test_crash_leaves_only_complete_parts(tmp_path, mode, n_parts, steps):
    script = tmp_path / "train.py"
    script.write_text(CRASH_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(run_dir), mode], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    visible = [p for p in parts(run_dir) if not p.startswith(".")]
    assert visible == [f"part-{i:05d}.parquet" for i in range(n_parts)]
    if mode == "mid-write":
        assert ".part-00002.parquet.tmp" in parts(run_dir)  # the torn file stays hidden
    for df in (load_log(run_dir), pd.read_parquet(run_dir / "spectra")):
        assert sorted(set(df["step"])) == steps
        assert len(df) == 2 * len(steps)
    # A resumed log in the same directory continues after the last complete part.
    with RunLog(run_dir, resume=True) as log:
        log.record(50, {"w": {"x": torch.ones(1)}}, {"w": (1, 1)})
    assert parts(run_dir)[-1] == f"part-{n_parts:05d}.parquet"


def test_close_twice_is_safe_and_record_after_close_raises(tmp_path):
    log = RunLog(tmp_path, flush_every=100)
    log.record(0, {"w": {"x": torch.ones(1)}}, {"w": (2, 3)})
    log.close()
    log.close()
    assert log.closed
    assert parts(tmp_path) == ["part-00000.parquet"]
    with pytest.raises(RuntimeError, match="closed"):
        log.record(1, {"w": {"x": torch.ones(1)}}, {"w": (2, 3)})


def test_context_manager_flushes(tmp_path):
    model = make_model()
    with RunLog(tmp_path, flush_every=1000) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, log=log)
        train(model, opt, 3)
        assert parts(tmp_path) == []
    assert parts(tmp_path) == ["part-00000.parquet"]
    assert len(load_log(tmp_path)) == 3 * 2


def test_log_dropped_without_close_is_flushed(tmp_path):
    log = RunLog(tmp_path, flush_every=1000)
    log.record(0, {"w": {"x": torch.ones(1)}}, {"w": (2, 3)})
    del log
    gc.collect()
    assert parts(tmp_path) == ["part-00000.parquet"]
    assert load_log(tmp_path)["x"].tolist() == [1.0]


def test_resumed_log_never_overwrites_a_part(tmp_path):
    for step in range(3):
        with RunLog(tmp_path, resume=step > 0) as log:
            log.record(step, {"w": {"x": torch.full((1,), float(step))}}, {"w": (1, 1)})
    (tmp_path / "spectra" / "part-00001.parquet").unlink()
    with RunLog(tmp_path, resume=True) as log:
        log.record(3, {"w": {"x": torch.full((1,), 3.0)}}, {"w": (1, 1)})
    assert parts(tmp_path) == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert load_log(tmp_path)["x"].tolist() == [0.0, 2.0, 3.0]


def test_a_new_log_refuses_a_folder_with_a_log_and_a_resumed_one_replaces_rerun_steps(tmp_path):
    """A fresh RunLog on a folder that holds a log raises (its rows would mix with the old
    run's under the same steps) and leaves the folder as it was; resume=True appends, and
    steps run again after a resume from an older checkpoint keep their latest rows."""
    model = make_model()
    with RunLog(tmp_path, flush_every=2) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, log=log)
        train(model, opt, 4)
        checkpoint = copy.deepcopy(opt.state_dict())
        train(model, opt, 2)  # steps 4, 5: logged, then "lost" with the process
    before = parts(tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        RunLog(tmp_path)
    assert parts(tmp_path) == before and (tmp_path / "config.json").exists()
    with RunLog(tmp_path, resume=True) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, log=log)
        opt.load_state_dict(checkpoint)
        train(model, opt, 1, start=4)  # step 4 again, from other weights than the first time
        rerun = opt.spectra()
        train(model, opt, 2, start=5)
    df = load_log(tmp_path)
    assert df.groupby("name")["step"].apply(list).map(lambda s: s == list(range(7))).all()
    again = df.query("step == 4").set_index("name")
    for name, res in rerun.items():
        assert again.loc[name, "fro_norm"] == pytest.approx(float(res.fro_norm), rel=1e-12)


def test_a_step_after_its_log_closed_raises_before_changing_anything(tmp_path):
    """SpectralSGD and SpectrumTracker check their log first: the weights, the momentum and the
    step count stay as they were (a step that logged nothing must not update either)."""
    model = make_model()
    log = RunLog(tmp_path)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3, log=log)
    train(model, opt, 2)
    log.close()
    before = [p.detach().clone() for p in model.parameters()]
    set_grads(model, 2)
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.steps == 2
    tracker = SpectrumTracker(model, rank=3, log=RunLog(tmp_path / "t"))
    tracker.step()
    tracker.tracked.log.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker.step()
    assert tracker.calls == 1


def test_tensorboard_writes_event_files(tmp_path):
    model = make_model()
    with RunLog(tmp_path, flush_every=2, tensorboard=True) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, log=log)
        train(model, opt, 3)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "0.weight/spectral_norm" in scalars and "2.weight/stable_rank" in scalars
    assert [e.step for e in acc.Scalars("0.weight/spectral_norm")] == [0, 1, 2]
    assert acc.Scalars("0.weight/spectral_norm")[-1].value == pytest.approx(
        float(opt.spectra()["0.weight"].spectral_norm), rel=1e-6)


def test_audit_and_gradient_columns_in_every_part(tmp_path):
    """pandas / pyarrow take a dataset's schema from its first file: columns that appear only
    in later parts (an audit, a gradient) must be in every part, NaN where absent."""
    model = make_model()
    with RunLog(tmp_path, flush_every=2) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, rank=3, audit_every=3,
                          track_grad=True, log=log)
        set_grads(model, 0)
        model[2].weight.grad = None  # no gradient for one matrix at step 0
        opt.step()
        train(model, opt, 5, start=1)
    df = pd.read_parquet(tmp_path / "spectra").sort_values(["step", "name"])
    audited = df[df["audit_max_rel_err"].notna()]
    assert sorted(set(audited["step"])) == [2, 5]  # tracked steps 3 and 6
    last = opt.spectra()
    for name in ("0.weight", "2.weight"):
        row = df[(df["step"] == 5) & (df["name"] == name)].iloc[0]
        extra = last[name].extra
        assert row["audit_max_rel_err"] == extra["audit_max_rel_err"]
        assert row["grad_fro_norm"] == extra["grad_fro_norm"].item()
        assert row["grad_weight_cosine"] == extra["grad_weight_cosine"].item()
        assert list(row["grad_sigma"]) == extra["grad_sigma"].tolist()
    missing = df[(df["step"] == 0) & (df["name"] == "2.weight")].iloc[0]
    assert pd.isna(missing["grad_fro_norm"]) and pd.isna(missing["grad_weight_cosine"])
    assert not pd.isna(missing["fro_norm"])  # the weight itself was still tracked


def test_spectrum_tracker_logs_every_nth_call(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with RunLog(tmp_path, flush_every=2) as log:
        tracker = SpectrumTracker(model, rank=3, every=2, log=log)
        tracker.attach(opt)
        train(model, opt, 5)
    df = load_log(tmp_path)
    assert sorted(set(df["step"])) == [0, 2, 4]
    cfg = load_config(tmp_path)
    assert cfg["tracker"]["name"] == "SpectrumTracker" and cfg["tracker"]["every"] == 2
    assert cfg["tracked"] == {"0.weight": [12, 20], "2.weight": [6, 12]}
    res = tracker.spectra()["0.weight"]
    row = df[(df["step"] == 4) & (df["name"] == "0.weight")].iloc[0]
    assert list(row["sigma"]) == res.sigma.tolist()


def test_bad_flush_every_raises(tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="flush_every"):
            RunLog(tmp_path, flush_every=bad)


def test_load_log_without_parts_raises(tmp_path):
    with RunLog(tmp_path):
        pass
    with pytest.raises(FileNotFoundError):
        lowrank.load_log(tmp_path)


def test_ragged_sigma_rows_keep_their_lengths(tmp_path):
    # Matrices tracked with different ranks share one log: sigma is a ragged list column.
    log = RunLog(tmp_path, flush_every=1)
    log.record(0, {"small": {"sigma": torch.tensor([[3.0, 2.0]]), "fro_norm": torch.tensor([4.0])},
                   "big": {"sigma": torch.tensor([[5.0, 4.0, 1.0]]), "fro_norm": torch.tensor([7.0])}},
               {"small": (2, 9), "big": (8, 9)})
    log.close()
    df = load_log(tmp_path).set_index("name")
    assert list(df.loc["small", "sigma"]) == [3.0, 2.0]
    assert list(df.loc["big", "sigma"]) == [5.0, 4.0, 1.0]
    assert df.loc["big", "fro_norm"] == 7.0


class _Mixed(nn.Module):
    """Matrices of several shapes and sketch widths (rank 3: k = min(6, m, n)): two of m = 12,
    one with no tail beyond k (6 x 12: k = 6 = min), one of width 4 (12 x 4), a conv kernel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(20, 12, bias=False)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 6, bias=False)
        self.d = nn.Linear(4, 12, bias=False)
        self.conv = nn.Conv2d(3, 8, 3)


def test_logged_rows_are_each_trackers_own_metrics_across_shapes(tmp_path):
    """after_step computes the metrics in batches over matrices of several shapes; each row
    must be the tracker's own metrics() of that step, bit for bit, before and after the step
    from which the previous estimates are read."""
    model = _Mixed()
    expected = {}
    with RunLog(tmp_path, flush_every=3) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3, log=log)
        widths = {name: tr.k for name, tr in opt.tracked.trackers.items()}
        assert widths == {"a.weight": 6, "b.weight": 6, "c.weight": 6, "d.weight": 4,
                          "conv.weight": 6}
        for step in range(5):
            set_grads(model, step)
            opt.step()
            for name, tr in opt.tracked.trackers.items():
                expected[step, name] = {key: value[0].tolist()
                                        for key, value in tr.metrics(3).items()}
    df = load_log(tmp_path)
    assert len(df) == 5 * 5
    for _, row in df.iterrows():
        want = expected[row["step"], row["name"]]
        for key, value in want.items():
            got = row[key].tolist() if key == "sigma" else row[key]
            assert got == value, (row["step"], row["name"], key)


def test_record_blocks_holds_one_value_per_name(tmp_path):
    log = RunLog(tmp_path, flush_every=10)
    with pytest.raises(ValueError, match="holds 1 values for 2 matrices"):
        log.record_blocks(0, [(["x", "y"], [(2, 3), (4, 5)], {"fro_norm": torch.ones(1)})])
    with pytest.raises(ValueError, match="holds None values"):
        log.record_blocks(0, [(["x"], [(2, 3)], {"fro_norm": torch.tensor(1.0)})])

    class TwoRows:  # metrics computed at the flush, for two matrices
        count, group = 2, "g"
    with pytest.raises(ValueError, match="deferred metrics of 2 matrices for 1 names"):
        log.record_blocks(0, [(["x"], [(2, 3)], TwoRows())])
    # a step is buffered whole or not at all: a bad second block leaves the first out too
    with pytest.raises(ValueError, match="holds 2 values for 1 matrices"):
        log.record_blocks(0, [(["x"], [(2, 3)], {"fro_norm": torch.ones(1)}),
                              (["y"], [(4, 5)], {"fro_norm": torch.ones(2)})])
    log.record_blocks(0, [([], [], {"fro_norm": torch.ones(0)})])  # no matrices: no rows
    log.record_blocks(0, [(["x", "y"], [(2, 3), (4, 5)],
                           {"sigma": torch.tensor([[3.0, 1.0], [5.0, 2.0]]),
                            "fro_norm": torch.tensor([4.0, 6.0]), "note": [1.5, float("nan")]}),
                          (["z"], [(7, 7)], {"sigma": torch.tensor([[9.0, 8.0]]),
                                             "fro_norm": torch.tensor([10.0])})])
    log.record(1, {"x": {"sigma": torch.tensor([[2.0, 0.5]]), "fro_norm": torch.tensor(3.0)}},
               {"x": (2, 3)})
    log.close()
    df = load_log(tmp_path)
    assert list(zip(df["step"], df["name"], df["shape"])) == [
        (0, "x", "2x3"), (0, "y", "4x5"), (0, "z", "7x7"), (1, "x", "2x3")]
    assert [list(s) for s in df["sigma"]] == [[3.0, 1.0], [5.0, 2.0], [9.0, 8.0], [2.0, 0.5]]
    assert df["fro_norm"].tolist() == [4.0, 6.0, 10.0, 3.0]
    assert df["note"].iloc[0] == 1.5 and df["note"].iloc[1:].isna().all()


def test_spectra_are_each_trackers_own_result_across_shapes():
    """spectra() computes the metrics in batches too: every field must be the tracker's own
    result(), bit for bit, for SpectralSGD and SpectrumTracker, at the first step and later."""
    model = _Mixed()
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3)
    tracker = SpectrumTracker(_Mixed(), rank=3)
    for step in range(3):
        set_grads(model, step)
        opt.step()
        tracker.step()
        for owner in (opt, tracker):
            found = owner.spectra()
            assert list(found) == list(owner.tracked.trackers)
            for name, tr in owner.tracked.trackers.items():
                want, got = tr.result(3), found[name]
                for field in dataclasses.fields(SpectrumResult):
                    a, b = getattr(got, field.name), getattr(want, field.name)
                    if isinstance(b, torch.Tensor):
                        assert a.shape == b.shape and torch.equal(a, b), (step, name, field.name)
                    elif field.name != "extra":
                        assert a == b, (step, name, field.name)


def test_logged_gradient_columns_are_each_gradient_trackers_own(tmp_path):
    """With track_grad the gradient sketches are post-processed in batches at the end of the
    step and their columns stacked: each row must be the gradient tracker's own metrics and
    cosine of that step, bit for bit; a step where one matrix has no gradient takes the row by
    row path, with NaN for that matrix."""
    model = _Mixed()
    expected = {}
    with RunLog(tmp_path, flush_every=2) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=3,
                          track_grad=True, log=log)
        for step in range(4):
            set_grads(model, step)
            if step == 2:
                model.c.weight.grad = None
            opt.step()
            for name, gt in opt.tracked.grad_trackers.items():
                got_grad = not (step == 2 and name == "c.weight")
                m = gt.metrics(3)
                expected[step, name] = {
                    "grad_sigma": m["sigma"][0].tolist() if got_grad else None,
                    "grad_fro_norm": m["fro_norm"].item() if got_grad else None,
                    "grad_stable_rank": m["stable_rank"].item() if got_grad else None,
                    "grad_weight_cosine": (opt.tracked.grad_stats[name]["grad_weight_cosine"]
                                           .item() if got_grad else None)}
    df = load_log(tmp_path)
    assert len(df) == 4 * 5
    for _, row in df.iterrows():
        for key, value in expected[row["step"], row["name"]].items():
            if value is None:
                assert pd.isna(row[key]).all() if key == "grad_sigma" else pd.isna(row[key])
            else:
                got = row[key].tolist() if key == "grad_sigma" else row[key]
                assert got == value, (row["step"], row["name"], key)

"""Static tracker state and CUDA-graph capture of a tracked step, checked on the CPU.

A CUDA graph replays the kernels a step launched, on the same addresses, without running any
Python. A tracked step can be captured only if (1) its state is written in place (a replay
reads the addresses the capture read), and (2) nothing it needs to advance lives in Python
(a replay does not run it): the step count that seeds the refill directions is kept on the
device. Both are checked here without a GPU: (1) by the addresses of the state across steps
and against the rebinding path, bit for bit; (2) by a simulated replay, the same step run
again with every Python counter put back to its value at the capture, which must still give
the eager run's results bit for bit. The real capture runs in tests/test_cupy_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank import RunLog, SpectralSGD, SpectrumTracker, _checks, trackset
from lowrank.tracking import STATE_KEYS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(seed=0):
    """Three 12 x 18 matrices (one pack), a rank-1 matrix that never moves (its sketch needs
    refill directions every step, drawn from the step count), a 10 x 7 matrix and a bias."""
    torch.manual_seed(seed)
    u, v = torch.randn(9, 1), torch.randn(1, 8)
    return {"a": nn.Parameter(torch.randn(12, 18)), "b": nn.Parameter(torch.randn(12, 18)),
            "c": nn.Parameter(torch.randn(12, 18)), "low": nn.Parameter(u @ v),
            "d": nn.Parameter(torch.randn(10, 7)), "bias": nn.Parameter(torch.randn(12))}


def _grads(params, step, *, nan_in=None):
    gen = torch.Generator().manual_seed(100 + step)
    for name, p in params.items():
        p.grad = torch.randn(p.shape, generator=gen) if name != "low" else torch.zeros_like(p)
    if nan_in is not None:
        params[nan_in].grad[0, 0] = float("nan")


def _sgd(params, **kw):
    kw = {"lr": 0.05, "momentum": 0.9, "rank": 2, "sketch_rank": 4, "backend": "torch",
          "schedule": "both", **kw}
    return SpectralSGD(list(params.items()), **kw)


def _state(opt):
    return {n: {k: getattr(t, k).clone() for k in STATE_KEYS}
            for n, t in opt.tracked.trackers.items()}


def _assert_same(a, b):
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{name}.{key}")


def _addresses(opt):
    return {(n, k): getattr(t, k).data_ptr() for n, t in opt.tracked.trackers.items()
            for k in STATE_KEYS}


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-shortcut", "masked-gpu-path"])
def test_packed_state_is_written_in_place_and_matches_rebinding(monkeypatch, host_reads):
    """Same-shape matrices share one tensor per state field (a pack), each tracker holding its
    slice; a step writes it in place. Against trackers that rebind their state each step (the
    path without packs), over steps with a NaN gradient in one matrix (its state kept, flagged):
    the same weights and state bit for bit, and the state never changes address. Both commit
    paths: the CPU's unmasked copy when every sketch is finite, and the masked select that a
    GPU always takes (it does not read the flags on the host)."""
    if not host_reads:
        monkeypatch.setattr(_checks, "host_reads_are_free", lambda t: False)
    runs = []
    for packed in (True, False):
        with monkeypatch.context() as mp:
            if not packed:
                mp.setattr(trackset.TrackedSet, "pack", lambda self: None)
            params = _params()
            opt = _sgd(params)
            before = _addresses(opt)
            for step in range(5):
                _grads(params, step, nan_in="b" if step == 3 else None)
                opt.step()
                if packed:
                    assert _addresses(opt) == before, step
            runs.append((params, opt))
    (pp, op), (pr, orb) = runs
    assert set(op.tracked._packs) == {("a", "b", "c"), ("low",), ("d",)}
    assert not orb.tracked._packs
    pack = op.tracked._packs[("a", "b", "c")]
    for i, name in enumerate("abc"):
        assert op.tracked.trackers[name].U.data_ptr() == pack["U"][i].data_ptr()
    assert op.tracked.bases(["a", "b", "c"])[0] is pack["U"]  # the pass reads the pack itself
    for name in pp:
        torch.testing.assert_close(pp[name], pr[name], rtol=0, atol=0, equal_nan=True)
    _assert_same(_state(op), _state(orb))
    assert bool(op.tracked.trackers["b"].nonfinite) and not bool(op.tracked.trackers["a"].nonfinite)
    assert all(t.step == 5 for t in op.tracked.trackers.values())


def test_results_and_state_dict_taken_earlier_do_not_change():
    """In-place state must not leak into what a user kept: spectra() and state_dict() of one
    step stay as they were after later steps (a history of sigma kept in a list)."""
    params = _params()
    opt = _sgd(params)
    history, saved = [], None
    for step in range(4):
        _grads(params, step)
        opt.step()
        history.append((opt.spectra()["a"], opt.spectra()["a"].sigma.clone()))
        if step == 1:
            saved = opt.state_dict()
            snapshot = {k: v.clone() for k, v in saved["lowrank"]["trackers"]["a"].items()
                        if isinstance(v, torch.Tensor)}
    for res, sigma in history:
        assert torch.equal(res.sigma, sigma) and torch.equal(res.spectral_norm, sigma[0])
    assert not torch.equal(history[0][1], history[-1][1])  # the estimates did move
    for key, value in snapshot.items():
        assert torch.equal(saved["lowrank"]["trackers"]["a"][key], value), key
    # A snapshot holds one matrix's state, not the whole pack it is a slice of.
    assert saved["lowrank"]["trackers"]["a"]["U"].untyped_storage().nbytes() == 12 * 4 * 4


def test_load_state_dict_into_packs_resumes_bitwise_at_the_same_addresses():
    params = _params()
    opt = _sgd(params)
    for step in range(3):
        _grads(params, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # torch's part holds the live momentum buffers
    weights = {n: p.detach().clone() for n, p in params.items()}
    for step in range(3, 6):
        _grads(params, step)
        opt.step()

    params2 = {n: nn.Parameter(w.clone()) for n, w in weights.items()}
    opt2 = _sgd(params2)
    before = _addresses(opt2)
    opt2.load_state_dict(saved)
    assert _addresses(opt2) == before
    for step in range(3, 6):
        _grads(params2, step)
        opt2.step()
    for name in params:
        assert torch.equal(params[name], params2[name]), name
    _assert_same(_state(opt), _state(opt2))
    assert opt2.steps == 6 and all(t.step == 6 for t in opt2.tracked.trackers.values())


def _replay(step_fn, counters):
    """A simulated CUDA-graph replay: the step runs with the Python counters (attribute ->
    value at the capture) put back first, as a replay, which runs no Python, would see them."""
    for obj, attr, value in counters:
        setattr(obj, attr, value)
    step_fn()


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-shortcut", "masked-gpu-path"])
@pytest.mark.parametrize("entry", ["SpectralSGD", "SpectrumTracker"])
def test_simulated_replays_match_eager_steps(monkeypatch, entry, host_reads):
    """A step "captured" (checks run, counters moved to the device) and then replayed with
    every Python counter frozen at the capture must equal the same number of eager steps, bit
    for bit: the refill directions of the rank-1 matrix (drawn from the step count) included.
    steps, calls and each result's step then read the device counter. Also on the commit path
    a GPU takes (masked, the flags not read on the host)."""
    if not host_reads:
        monkeypatch.setattr(_checks, "host_reads_are_free", lambda t: False)
    def build():
        params = _params(seed=1)
        if entry == "SpectralSGD":
            opt = _sgd(params)
            return params, opt, opt, opt.step
        opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
        tracker = SpectrumTracker(list(params.items()), rank=2, sketch_rank=4, backend="torch",
                                  schedule="both")
        return params, opt, tracker, lambda: (opt.step(), tracker.step())

    warm, replays = 3, 4
    params, _, owner, step_fn = build()
    for step in range(warm + 1 + replays):
        _grads(params, step)
        step_fn()
    eager = (params, owner)

    params, _, owner, step_fn = build()
    for step in range(warm):
        _grads(params, step)
        step_fn()
    trackers = list(owner.tracked.trackers.values())
    count = "_steps" if entry == "SpectralSGD" else "_calls"
    frozen = [(t, "_step", t._step) for t in trackers] + [(owner, count, getattr(owner, count))]
    monkeypatch.setattr(trackset, "capturing", lambda: True)
    real_tracked_steps = trackset.TrackedSet.tracked_steps

    def no_device_read(self):  # on a GPU, a host read of the counter inside a capture
        raise AssertionError("the device step counter was read on the host in a capture")

    monkeypatch.setattr(trackset.TrackedSet, "tracked_steps", no_device_read)
    _grads(params, warm)
    step_fn()  # the capture
    assert owner.tracked.captured and all(t.step_source is not None for t in trackers)
    for step in range(warm + 1, warm + 1 + replays):
        _grads(params, step)
        _replay(step_fn, frozen)
    monkeypatch.setattr(trackset, "capturing", lambda: False)
    monkeypatch.setattr(trackset.TrackedSet, "tracked_steps", real_tracked_steps)
    for obj, attr, value in frozen:  # as after real replays: Python never advanced
        setattr(obj, attr, value)

    for name in params:
        assert torch.equal(params[name], eager[0][name]), name
    _assert_same(_state(owner), _state(eager[1]))
    total = warm + 1 + replays
    assert all(t.step == total for t in trackers)
    assert all(r.step == total for r in owner.spectra().values())
    assert (owner.steps if entry == "SpectralSGD" else owner.calls) == total
    # Eager steps after the capture keep counting on the device.
    _grads(params, total)
    step_fn()
    assert all(t.step == total + 1 for t in trackers)
    assert (owner.steps if entry == "SpectralSGD" else owner.calls) == total + 1


@pytest.mark.parametrize("case, match", [
    ("track_every", "track_every=2"),
    ("log", "a log"),
    ("audit", "audit_every"),
    ("skip_nonfinite", "skip_nonfinite"),
    ("no_warmup", "momentum buffers not created"),
    ("sequential", "'sequential' schedule"),
    ("steps_differ", "different steps"),
    ("grad_scaler", "GradScaler"),
    ("tracker_every", "every=2"),
])
def test_capture_refuses_what_a_replay_cannot_repeat(monkeypatch, tmp_path, case, match):
    """Before any work: the weights are unchanged when the capture is refused."""
    params = _params()
    kw = {"track_every": {"track_every": 2}, "log": {"log": RunLog(tmp_path / "run")},
          "audit": {"audit_every": 5}, "skip_nonfinite": {"skip_nonfinite": True},
          "sequential": {"schedule": "auto"}}.get(case, {})
    opt = _sgd(params, **kw)
    step_fn = opt.step
    if case == "tracker_every":
        tracker = SpectrumTracker(list(params.items()), rank=2, sketch_rank=4, every=2,
                                  backend="torch", schedule="both")
        step_fn = tracker.step
    if case != "no_warmup":
        _grads(params, 0)
        opt.step()
    if case == "steps_differ":
        opt.tracked.trackers["a"]._step += 1
    if case == "grad_scaler":
        opt.found_inf = torch.zeros(())
    before = {n: p.detach().clone() for n, p in params.items()}
    monkeypatch.setattr(trackset, "capturing", lambda: True)
    _grads(params, 1)
    with pytest.raises(RuntimeError, match=match):
        step_fn()
    for name, p in params.items():
        assert torch.equal(p, before[name]), name

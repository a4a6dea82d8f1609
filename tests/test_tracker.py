"""SpectrumTracker: spectral tracking beside any optimizer, the same tracking core as SpectralSGD."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowrank import BackendUnavailable, SpectralSGD, SpectrumTracker


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gapped_matrix(m, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(min(m, n), dtype=torch.float64)
    s[: len(sigma)] = torch.tensor(sigma, dtype=torch.float64)
    return ((Q1[:, : len(s)] * s) @ Q2[:, : len(s)].T).float()


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3)  # 4 x 18
        self.fc = nn.Linear(36, 16)
        self.fc.weight.data = gapped_matrix(16, 36, [6, 4, 3, 2] + [0.3] * 12, seed + 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


def data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 2, 5, 5, generator=g), torch.randn(8, 5, generator=g)


def train_step(model, opt, step):
    x, y = data(step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for name in a:
        ra, rb = a[name], b[name]
        assert (ra.step, ra.shape) == (rb.step, rb.shape)
        for field, value in ra.__dict__.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(getattr(rb, field), value, rtol=0, atol=0,
                                           equal_nan=True, msg=f"{name}.{field}")


def test_adamw_with_step_tracks_every_matrix_accurately():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    tracker = SpectrumTracker(model, rank=4)
    for step in range(25):
        train_step(model, opt, step)
        tracker.step()
    spectra = tracker.spectra()
    assert {n: r.shape for n, r in spectra.items()} == {
        "conv.weight": (4, 18), "fc.weight": (16, 36), "head.weight": (5, 16)}
    for name, res in spectra.items():
        W = dict(model.named_parameters())[name].detach().to(torch.float64)
        exact = torch.linalg.svdvals(W.reshape(W.shape[0], -1))
        assert res.step == 25
        assert bool((res.sigma[:-1] >= res.sigma[1:]).all())
        # float32 weights: sums of squares accumulate in float32 like the sketch
        # (lowrank/sketch.py), so the norm is exact to ~n * 2^-25, not float64.
        torch.testing.assert_close(res.fro_norm, exact.square().sum().sqrt(), rtol=1e-6, atol=0)
        assert float(((res.sigma - exact[:4]).abs() / exact[0]).max()) < 1e-3, name


def test_attach_runs_after_every_optimizer_step_and_remove_stops_it():
    model, manual_model = Net(), Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manual_opt = torch.optim.AdamW(manual_model.parameters(), lr=1e-3)
    tracker, manual = SpectrumTracker(model, rank=3), SpectrumTracker(manual_model, rank=3)
    handle = tracker.attach(opt)
    for step in range(6):
        train_step(model, opt, step)
        train_step(manual_model, manual_opt, step)
        manual.step()
    assert tracker.calls == 6
    assert_same_results(tracker.spectra(), manual.spectra())
    handle.remove()
    frozen = tracker.spectra()
    train_step(model, opt, 6)
    assert tracker.calls == 6
    assert_same_results(tracker.spectra(), frozen)


def test_same_results_as_spectral_sgd_on_the_same_weights():
    """SpectralSGD sketches the updated weights in its pass; SGD + an attached tracker sketches
    the same updated weights afterwards: the same numbers."""
    ours_model, ref_model = Net(), Net()
    ours = SpectralSGD(ours_model.named_parameters(), lr=0.05, momentum=0.9, rank=3)
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    tracker = SpectrumTracker(ref_model.named_parameters(), rank=3)
    tracker.attach(sgd)
    for step in range(12):
        train_step(ours_model, ours, step)
        train_step(ref_model, sgd, step)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert_same_results(ours.spectra(), tracker.spectra())


def test_every_n_tracks_every_nth_call():
    model = Net()
    tracker = SpectrumTracker(model, rank=2, every=3)
    for call in range(10):
        tracker.step()
        assert all(r.step == call // 3 + 1 for r in tracker.spectra().values())
    assert tracker.calls == 10


def test_state_dict_round_trip_resumes_bitwise():
    def run(model, opt, tracker, steps, start=0):
        for step in range(start, start + steps):
            train_step(model, opt, step)
            tracker.step()

    full_model = Net()
    full_opt = torch.optim.AdamW(full_model.parameters(), lr=1e-3)
    full = SpectrumTracker(full_model, rank=3, audit_every=4)
    run(full_model, full_opt, full, 12)

    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = SpectrumTracker(model, rank=3, audit_every=4)
    run(model, opt, tracker, 6)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "tracker": tracker.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = Net(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    tracker2 = SpectrumTracker(model2, rank=3, audit_every=4)
    tracker2.load_state_dict(ckpt["tracker"])
    assert tracker2.calls == 6
    run(model2, opt2, tracker2, 6, start=6)
    assert_same_results(full.spectra(), tracker2.spectra())
    for name, res in full.spectra().items():
        torch.testing.assert_close(tracker2.spectra()[name].extra["audit_sigma"],
                                   res.extra["audit_sigma"], rtol=0, atol=0)


def test_load_state_dict_with_wrong_shapes_raises():
    state = SpectrumTracker(Net(), rank=2).state_dict()
    with pytest.raises(ValueError, match="shape"):
        SpectrumTracker(Net(), rank=3).load_state_dict(state)


@pytest.mark.parametrize("make, kwargs, exc, match", [
    (lambda: [torch.zeros(3, 3)], {}, TypeError, "nn.Module or \\(name, tensor\\) pairs"),
    (lambda: [], {}, ValueError, "no parameters"),
    (lambda: nn.LayerNorm(4), {}, ValueError, "no parameter with 2 or more dimensions"),
    (lambda: Net(), dict(rank=0), ValueError, "rank"),
    (lambda: Net(), dict(every=0), ValueError, "every"),
    (lambda: Net(), dict(every=2.0), TypeError, "every"),
    (lambda: Net(), dict(include="fc.weigth"), ValueError, "matches no parameter"),
    (lambda: Net(), dict(backend="numpy"), ValueError, "unknown backend"),
    (lambda: Net(), dict(rank=2, backend="cupy"), BackendUnavailable, "cupy"),
    (lambda: [("w", torch.zeros(4, 4)), ("w", torch.zeros(5, 5))], {}, ValueError, "unique"),
], ids=["bare-tensors", "empty", "only-1d", "rank-0", "every-0", "every-float",
        "unknown-include", "unknown-backend", "cupy-on-cpu", "duplicate-names"])
def test_bad_input_raises(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SpectrumTracker(make(), **kwargs)


def test_include_exclude_and_named_pairs():
    model = Net()
    tracker = SpectrumTracker(model.named_parameters(), rank=2, include="*.weight",
                              exclude=["conv.*"])
    tracker.step()
    assert set(tracker.spectra()) == {"fc.weight", "head.weight"}
    # A non-contiguous (transposed) weight is read as it is, not as its storage.
    W = copy.deepcopy(model.fc.weight.detach()).T
    assert not W.is_contiguous()
    t = SpectrumTracker([("wt", W)], rank=4)
    for _ in range(20):
        t.step()
    exact = torch.linalg.svdvals(W.to(torch.float64))
    res = t.spectra()["wt"]
    assert res.shape == (36, 16)
    torch.testing.assert_close(res.sigma, exact[:4], rtol=1e-5, atol=0)


def test_sketch_only_pass_batches_same_shape_matrices(monkeypatch):
    """Under the "both" schedule the tracker sketches the contiguous matrices of one shape and
    dtype as one batch (one launch on CuPy); on the torch backend that runs the per-matrix ops,
    so fro2 agrees bit for bit and the post-processed state to float32 rounding (the bases are
    float32; the batch of the post-processing differs) with one call per matrix. A
    non-contiguous parameter takes its own call."""
    from lowrank.trackset import TrackedSet

    def run(batched):
        torch.manual_seed(8)
        named = [(f"w{i}", torch.randn(16, 24)) for i in range(3)]
        named += [("t", torch.randn(24, 16).T), ("conv", torch.randn(16, 6, 2, 2))]
        tracker = SpectrumTracker(named, rank=2, sketch_rank=4, backend="torch",
                                  schedule="both")
        calls = []
        real = TrackedSet.absorb_many
        monkeypatch.setattr(TrackedSet, "absorb_many",
                            lambda self, names, *rest: calls.append(list(names))
                            or real(self, names, *rest))
        if not batched:
            monkeypatch.setattr(TrackedSet, "sketch_all",
                                lambda self, names: [self.sketch_only(n) for n in names])
        for step in range(3):
            for _, W in named:
                W.mul_(0.9).add_(torch.randn(W.shape), alpha=0.05)
            tracker.step()
        monkeypatch.undo()
        return tracker, calls

    tb, calls = run(True)
    assert calls[0] == ["w0", "w1", "w2", "conv"]  # "t" (16 x 24, transposed) its own call
    to, none = run(False)
    assert none == []
    for name, tr in tb.tracked.trackers.items():
        other = to.tracked.trackers[name]
        assert torch.equal(tr.fro2, other.fro2), name
        for key in ("sigma", "U", "V"):
            torch.testing.assert_close(getattr(tr, key), getattr(other, key), rtol=1e-5,
                                       atol=1e-6, msg=f"{name}.{key}")

"""SpectralSGD: a drop-in torch.optim.SGD (bitwise trajectories, state, validation) that tracks
the spectrum of every weight matrix.

References: torch.optim.SGD(foreach=False) for the update, float64 torch.linalg.svdvals for the
spectra. Small models only: the whole file runs in well under a minute on two slow CPU cores.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

import lowrank
from lowrank import BackendUnavailable, SpectralSGD, SpectrumResult



pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ----------------------------------------------------------------------------------


class Net(nn.Module):
    """Every kind of parameter the optimizer meets: conv kernels, matrices, biases, a frozen
    layer and a zero-size parameter."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3)  # tracked as 5 x 27
        self.fc = nn.Linear(20, 12)  # 12 x 20
        self.head = nn.Linear(12, 6)  # 6 x 12
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.empty = nn.Parameter(torch.zeros(0, 4))
        self.to(dtype)


TRACKED = {"conv.weight": (5, 27), "fc.weight": (12, 20), "head.weight": (6, 12),
           "frozen.weight": (6, 6)}


def set_grads(model, step, *, none=(), scale=1.0):
    """Deterministic gradients for ``step``; parameters in ``none`` get no gradient."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if not p.requires_grad or name in none:
            p.grad = None
            continue
        g = torch.Generator().manual_seed(1000 * step + i)
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype)


def assert_bitwise(a, b):
    """Equal bit for bit (NaN equal to NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_same_params(m1, m2):
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert n1 == n2
        assert_bitwise(p1, p2)


def exact_svdvals(t, shape=None):
    W = t.detach().to(torch.float64)
    return torch.linalg.svdvals(W.reshape(shape) if shape else W.reshape(W.shape[0], -1))


def gapped_matrix(m, n, sigma, seed=0, dtype=torch.float32):
    """m x n matrix with the given singular values (others zero), random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(min(m, n), dtype=torch.float64)
    s[: len(sigma)] = torch.tensor(sigma, dtype=torch.float64)
    return (Q1[:, : len(s)] * s) @ Q2[:, : len(s)].T


def walk(obj):
    """Every leaf of a nested state dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from walk(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from walk(v)
    else:
        yield obj


# -- trajectories: bitwise torch.optim.SGD ----------------------------------------------------


def _combos():
    out = []
    for momentum in (0.0, 0.9):
        for dampening in (0.0, 0.3):
            for nesterov in (False, True):
                if nesterov and (momentum == 0 or dampening != 0):
                    continue
                for maximize in (False, True):
                    for weight_decay in (0.0, 0.01):
                        out.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                        maximize=maximize, weight_decay=weight_decay))
    return out


def _combo_id(h):
    return (f"mom{h['momentum']:g}-damp{h['dampening']:g}-{'nesterov' if h['nesterov'] else 'plain'}"
            f"-{'max' if h['maximize'] else 'min'}-wd{h['weight_decay']:g}")


def _groups(model):
    """Two named param groups, the second with its own lr."""
    named = dict(model.named_parameters())
    first = ["conv.weight", "conv.bias", "fc.weight", "frozen.weight", "frozen.bias", "empty"]
    return [{"params": [(n, named[n]) for n in first]},
            {"params": [(n, named[n]) for n in ("fc.bias", "head.weight", "head.bias")],
             "lr": 0.02}]


COMBOS = _combos()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("hyper", COMBOS, ids=[_combo_id(h) for h in COMBOS])
def test_trajectory_bitwise_equal_to_torch_sgd(hyper, dtype):
    ref, model = Net(dtype), Net(dtype)
    sgd = torch.optim.SGD(_groups(ref), lr=0.05, foreach=False, **hyper)
    opt = SpectralSGD(_groups(model), lr=0.05, foreach=False, rank=2, **hyper)
    sched_ref = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for step in range(21):
        # fc.weight loses its gradient for one step, head.bias for another (grad set to None).
        none = {7: ("fc.weight",), 13: ("head.bias",)}.get(step, ())
        for m in (ref, model):
            set_grads(m, step, none=none)
        sgd.step()
        opt.step()
        sched_ref.step()
        sched.step()
        assert_same_params(ref, model)
    assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.05 * 0.5 ** 4  # 21 steps, halved every 5
    ours, theirs = opt.state_dict(), sgd.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for idx, st in theirs["state"].items():
        assert ours["state"][idx].keys() == st.keys() == {"momentum_buffer"}
        assert_bitwise(ours["state"][idx]["momentum_buffer"], st["momentum_buffer"])
    # Every >= 2-D non-empty parameter is tracked (conv kernels as out x in*kh*kw), frozen too.
    spectra = opt.spectra()
    assert {n: r.shape for n, r in spectra.items()} == TRACKED
    assert all(r.step == 21 for r in spectra.values())


def test_tensor_lr_and_plain_parameter_list_match_torch_sgd():
    ref, model = Net(), Net()
    sgd = torch.optim.SGD(ref.parameters(), lr=torch.tensor(0.03), momentum=0.5, foreach=False)
    opt = SpectralSGD(model.parameters(), lr=torch.tensor(0.03), momentum=0.5, rank=2)
    for step in range(5):
        set_grads(ref, step)
        set_grads(model, step)
        sgd.step()
        opt.step()
    assert_same_params(ref, model)
    # Unnamed parameters are called param0, param1, ... in order.
    names = [f"param{i}" for i, _ in enumerate(model.parameters())]
    expected = {names[i] for i, (n, _) in enumerate(model.named_parameters()) if n in TRACKED}
    assert set(opt.spectra()) == expected


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_sparse_gradients_match_torch_sgd(momentum):
    torch.manual_seed(0)
    ref = nn.Embedding(10, 4, sparse=True)
    model = copy.deepcopy(ref)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.1, momentum=momentum, rank=4)
    for step in range(4):
        idx = torch.tensor([step, 3, 3, 7])
        for m, o in ((ref, sgd), (model, opt)):
            o.zero_grad()
            (m(idx) ** 2).sum().backward()
            o.step()
    assert_bitwise(model.weight, ref.weight)
    res = opt.spectra()["weight"]
    torch.testing.assert_close(res.sigma, exact_svdvals(model.weight)[:4], rtol=1e-5, atol=0)


def test_param_added_later_is_updated_not_tracked():
    ref, model = Net(), Net()
    sgd = torch.optim.SGD([ref.conv.weight], lr=0.1, foreach=False)
    opt = SpectralSGD([("conv.weight", model.conv.weight)], lr=0.1, rank=2)
    sgd.add_param_group({"params": [ref.fc.weight], "lr": 0.2})
    opt.add_param_group({"params": [("fc.weight", model.fc.weight)], "lr": 0.2})
    for step in range(3):
        set_grads(ref, step)
        set_grads(model, step)
        sgd.step()
        opt.step()
    assert_bitwise(model.fc.weight, ref.fc.weight)
    assert_bitwise(model.conv.weight, ref.conv.weight)
    assert set(opt.spectra()) == {"conv.weight"}


def test_loads_torch_sgd_state_dict_mid_run():
    """Switching from torch.optim.SGD to SpectralSGD mid-run keeps the trajectory."""
    ref, model = Net(), Net()
    sgd = torch.optim.SGD(ref.named_parameters(), lr=0.05, momentum=0.9, foreach=False)
    for step in range(4):
        set_grads(ref, step)
        sgd.step()
        if step == 1:
            model.load_state_dict(ref.state_dict())
            opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2)
            opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
        elif step > 1:
            set_grads(model, step)
            opt.step()
    assert_same_params(ref, model)


# -- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(lr=-0.1),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-4),
    dict(lr=0.1, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    dict(lr=torch.tensor([0.1, 0.2])),
], ids=["negative-lr", "negative-momentum", "negative-weight-decay", "nesterov-no-momentum",
        "nesterov-dampening", "tensor-lr-2-elements"])
def test_hyperparameter_errors_match_torch(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(Net().parameters(), **kwargs)
    with pytest.raises(ValueError) as ours:
        SpectralSGD(Net().named_parameters(), **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("make, exc", [
    (lambda m: [], ValueError),
    (lambda m: m.fc.weight, TypeError),
    (lambda m: [{"params": [m.fc.weight]}, {"params": [m.fc.weight]}], ValueError),
    (lambda m: [m.fc.weight, "not a tensor"], TypeError),
], ids=["empty", "bare-tensor", "param-in-two-groups", "non-tensor"])
def test_param_errors_match_torch(make, exc):
    with pytest.raises(exc) as theirs:
        torch.optim.SGD(make(Net()), lr=0.1)
    with pytest.raises(exc) as ours:
        SpectralSGD(make(Net()), lr=0.1, rank=2)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(rank=2, sketch_rank=1), ValueError, "sketch_rank=1 must be >= rank=2"),
    (dict(rank=2, track_every=0), ValueError, "track_every"),
    (dict(rank=2, track_every=1.5), TypeError, "track_every"),
    (dict(rank=2, audit_every=-1), ValueError, "audit_every"),
    (dict(rank=2, backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (dict(rank=2, include=["fc.wieght"]), ValueError, "include pattern 'fc.wieght' matches no"),
    (dict(rank=2, exclude=["layers.*"]), ValueError, "exclude pattern 'layers.\\*' matches no"),
    (dict(rank=2, include=["fc.bias"]), ValueError, "cannot be tracked"),
    (dict(rank=2, rank_tol=0.0), ValueError, "rank_tol"),
    (dict(rank=2, foreach=True), ValueError, "foreach=True"),
    (dict(rank=2, fused=True), ValueError, "fused=True"),
], ids=["rank-0", "rank-negative", "rank-float", "sketch-rank-below-rank",
        "track-every-0", "track-every-float", "audit-every-negative", "unknown-backend",
        "unknown-include-name", "unknown-exclude-glob", "include-only-1d", "rank-tol-0",
        "foreach", "fused"])
def test_tracking_argument_errors_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SpectralSGD(Net().named_parameters(), lr=0.1, **kwargs)


def test_duplicate_names_raise():
    m = Net()
    with pytest.raises(ValueError, match="unique"):
        SpectralSGD([("w", m.fc.weight), ("w", m.head.weight)], lr=0.1, rank=2)


def _import_triton_now():
    """Triton fixes interpreter mode (TRITON_INTERPRET) when it is first imported, and any
    optimizer construction imports it (through torch._dynamo). Import it under the process's
    own setting before a test changes the variable, so later tests are not affected."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def test_triton_backend_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    _import_triton_now()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable):
        SpectralSGD(Net().named_parameters(), lr=0.1, rank=2, backend="triton")


def test_cupy_backend_on_cpu_is_unavailable():
    with pytest.raises(BackendUnavailable):
        SpectralSGD(Net().named_parameters(), lr=0.1, rank=2, backend="cupy")


# -- what is tracked ---------------------------------------------------------------------------


@pytest.mark.parametrize("include, exclude, expected", [
    (None, None, set(TRACKED)),
    (["fc.weight"], None, {"fc.weight"}),
    (["fc.*"], None, {"fc.weight"}),  # a glob that also matches fc.bias skips it
    ("*.weight", ["frozen.*", "conv.weight"], {"fc.weight", "head.weight"}),
    (None, "*", set()),
], ids=["default", "include-name", "include-glob-with-bias", "include-and-exclude", "exclude-all"])
def test_include_exclude(include, exclude, expected):
    model = Net()
    opt = SpectralSGD(model.named_parameters(), lr=0.1, rank=2, include=include, exclude=exclude)
    set_grads(model, 0)
    opt.step()
    assert set(opt.spectra()) == expected


def test_conv_kernels_tracked_as_out_by_in_times_kernel():
    torch.manual_seed(0)
    model = nn.ModuleDict({"c2": nn.Conv2d(3, 4, (3, 2)), "c1": nn.Conv1d(5, 4, 3)})
    # rank 4 = out channels = min(m, n): the sketch width is the full dimension, so one step
    # recovers the spectrum exactly (to float32 products).
    opt = SpectralSGD(model.named_parameters(), lr=0.01, rank=4)
    assert opt.tracked.trackers["c2.weight"].shape == (4, 18)
    assert opt.tracked.trackers["c1.weight"].shape == (4, 15)
    set_grads(model, 0)
    opt.step()
    for name in ("c2.weight", "c1.weight"):
        res = opt.spectra()[name]
        p = dict(model.named_parameters())[name]
        exact = exact_svdvals(p, opt.tracked.trackers[name].shape)
        assert res.shape == opt.tracked.trackers[name].shape
        torch.testing.assert_close(res.sigma, exact[:4], rtol=1e-5, atol=0)
        # float32 weights: sums of squares accumulate in float32 like the sketch
        # (lowrank/sketch.py), so the norm is exact to ~n * 2^-25, not float64.
        torch.testing.assert_close(res.fro_norm, exact.square().sum().sqrt(), rtol=1e-6, atol=0)


# -- spectra -----------------------------------------------------------------------------------


def _slow_model(dtype=torch.float32):
    """A 48 x 40 weight with a spectral gap and a flat tail, and a rank-3 one."""
    model = nn.ParameterDict({
        "gapped": nn.Parameter(gapped_matrix(48, 40, [10, 7, 5, 3.5] + [0.5] * 36, 1).to(dtype)),
        "rank3": nn.Parameter(gapped_matrix(30, 24, [4, 2, 1], 2).to(dtype)),
    })
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_spectra_match_float64_svdvals_on_slowly_moving_weights(dtype):
    model = _slow_model(dtype)
    opt = SpectralSGD(model.named_parameters(), lr=1e-3, momentum=0.9, rank=4, sketch_rank=8)
    for step in range(30):
        # Small steps: the weights move ~1e-5 per entry and step, the rank-3 weight keeps a
        # null space far below the 1e-3 rank tolerance.
        set_grads(model, step, scale=1e-3)
        opt.step()
    spectra = opt.spectra()
    assert set(spectra) == {"gapped", "rank3"}
    for name, res in spectra.items():
        W = model[name]
        exact = exact_svdvals(W)
        assert isinstance(res, SpectrumResult)
        assert res.step == 30 and res.shape == tuple(W.shape)
        assert res.sigma.shape == (4,) and res.sigma.dtype == torch.float64
        assert bool((res.sigma[:-1] >= res.sigma[1:]).all()), "sigma must be descending"
        rel = ((res.sigma - exact[:4]).abs() / exact[0]).max()
        assert rel < 1e-3, f"{name}: max error {rel:.2e} of sigma_1"
        fro = exact.square().sum().sqrt()
        # float32 weights: sums of squares accumulate in float32 like the sketch
        # (lowrank/sketch.py), so the norm is exact to ~n * 2^-25, not float64.
        torch.testing.assert_close(res.fro_norm, fro, rtol=1e-6, atol=0)
        torch.testing.assert_close(res.stable_rank, res.fro_norm.square() / res.sigma[0].square(),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(res.stable_rank, fro.square() / exact[0].square(),
                                   rtol=2e-3, atol=0)
        assert not bool(res.nonfinite)
    # The top 4 of the gapped weight converge to float32 rounding, far below the 1e-3 target.
    g = spectra["gapped"]
    exact = exact_svdvals(model["gapped"])
    rel_each = ((g.sigma - exact[:4]).abs() / exact[:4]).max()
    assert rel_each < (1e-5 if dtype == torch.float32 else 1e-8)
    # Numerical rank (tol 1e-3): the rank-3 weight has exactly 3 (its moved null space is
    # ~1e-3 * lr-sized, below the threshold); the gapped one has 40 > k = 8: censored.
    r3 = spectra["rank3"]
    exact3 = exact_svdvals(model["rank3"])
    true_rank3 = int((exact3 > 1e-3 * exact3[0]).sum())
    assert int(r3.numerical_rank) == true_rank3
    assert not bool(r3.rank_censored)
    assert int(g.numerical_rank) == 8 and bool(g.rank_censored)
    assert int(g.numerical_rank_upper) >= int((exact > 1e-3 * exact[0]).sum())


def test_track_every_tracks_every_nth_step_and_keeps_sgd_updates():
    ref, model = _slow_model(), _slow_model()
    sgd = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=1e-3, momentum=0.9, rank=4, track_every=3)
    for step in range(10):
        set_grads(ref, step)
        set_grads(model, step)
        sgd.step()
        opt.step()
        expected = step // 3 + 1  # tracked at optimizer steps 0, 3, 6, 9
        assert all(r.step == expected for r in opt.spectra().values())
    assert opt.steps == 10
    assert_same_params(ref, model)


def test_spectra_before_the_first_tracked_step_raise():
    """Before any tracked step the estimates are zeros, which would read as rank 0."""
    opt = SpectralSGD(Net().named_parameters(), lr=0.1, rank=2)
    tracker = lowrank.SpectrumTracker(Net(), rank=2)
    for owner in (opt, tracker):
        with pytest.raises(RuntimeError, match="no tracked step"):
            owner.spectra()
    tracker.step()
    assert all(res.step == 1 for res in tracker.spectra().values())


def test_complex_parameters_are_updated_as_torch_sgd_and_not_tracked():
    """Singular values here are those of real matrices: a complex weight (whose real part alone
    a sketch would read) is updated untracked, bit for bit as torch.optim.SGD does, and an
    include pattern that names only it raises."""
    torch.manual_seed(0)
    c, w = torch.randn(6, 4, dtype=torch.cfloat), torch.randn(5, 3)
    ours = [nn.Parameter(c.clone()), nn.Parameter(w.clone())]
    theirs = [nn.Parameter(c.clone()), nn.Parameter(w.clone())]
    opt = SpectralSGD(list(zip(("c", "w"), ours)), lr=0.1, momentum=0.9, weight_decay=0.01,
                      rank=2)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn(6, 4, dtype=torch.cfloat), torch.randn(5, 3)]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert list(opt.spectra()) == ["w"]
    with pytest.raises(ValueError, match="real floating-point dtype"):
        SpectralSGD([("c", nn.Parameter(c.clone()))], lr=0.1, include=["c"])
    with pytest.raises(ValueError, match="real floating-point dtype"):
        lowrank.SpectrumTracker([("c", nn.Parameter(c.clone()))], rank=2)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matrices_narrower_than_rank_report_all_their_singular_values(backend, tmp_path):
    """The default rank=8 on a model with a 1-unit layer and a 1 x 3 one: no error; each matrix
    reports min(rank, m, n) values (its sketch spans all of them), which converge to its exact
    float64 singular values, in spectra(), the log, the audit and the gradient's columns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1), nn.Linear(1, 3))
    with lowrank.RunLog(tmp_path) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, log=log, audit_every=5,
                          track_grad=True, backend=backend)
        X, y = torch.randn(128, 20), torch.randn(128, 3)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.mse_loss(model(X), y).backward()
            opt.step()
        found = opt.spectra()
    params = dict(model.named_parameters())
    rows = lowrank.load_log(tmp_path).query("step == 29").set_index("name")
    for name, expected_len in (("0.weight", 8), ("2.weight", 1), ("3.weight", 1)):
        res = found[name]
        exact = torch.linalg.svdvals(params[name].detach().double())[:expected_len]
        assert res.sigma.shape == (expected_len,) and len(rows.loc[name, "sigma"]) == expected_len
        assert float(((res.sigma - exact).abs() / exact[0]).max()) < 1e-5, name
        assert res.extra["audit_max_rel_err"] < 1e-5
        assert res.extra["grad_sigma"].shape == (expected_len,)
        assert 0.0 <= float(res.extra["grad_subspace_alignment"]) <= 1.0 + 1e-12
    assert int(found["2.weight"].numerical_rank) == 1 and not bool(found["2.weight"].rank_censored)
    tracker = lowrank.SpectrumTracker(nn.Linear(64, 1), rank=8)
    tracker.step()
    assert tracker.spectra()["weight"].sigma.shape == (1,)


def test_track_grad_matches_svdvals_of_last_grad_and_exact_cosine():
    torch.manual_seed(0)
    W0 = gapped_matrix(40, 30, [3, 2, 1.5, 1] + [0.2] * 26, 3).float()
    G0 = gapped_matrix(40, 30, [5, 3, 2, 1.2] + [0.05] * 26, 4).float()
    W = nn.Parameter(W0.clone())
    opt = SpectralSGD([("w", W)], lr=1e-3, momentum=0.9, weight_decay=1e-2, rank=4,
                      track_grad=True)
    for step in range(25):
        g = torch.Generator().manual_seed(step)
        W.grad = G0 + 1e-4 * torch.randn(W.shape, generator=g)
        W_before = W.detach().clone()
        opt.step()
    res = opt.spectra()["w"]
    G = W.grad.to(torch.float64)
    exact_g = torch.linalg.svdvals(G)
    rel = ((res.extra["grad_sigma"] - exact_g[:4]).abs() / exact_g[0]).max()
    assert rel < 1e-3
    # float32 weights: sums of squares accumulate in float32 like the sketch
    # (lowrank/sketch.py), so the norm is exact to ~n * 2^-25, not float64.
    torch.testing.assert_close(res.extra["grad_fro_norm"], G.norm(), rtol=1e-6, atol=0)
    Wb = W_before.to(torch.float64)
    inner = (G * Wb).sum()
    cosine = inner / (G.norm() * Wb.norm())
    torch.testing.assert_close(res.extra["grad_weight_inner"], inner, rtol=1e-12, atol=0)
    # ||G|| comes from the float32-accumulated sums of squares of the sketch (see above).
    torch.testing.assert_close(res.extra["grad_weight_cosine"], cosine, rtol=1e-6, atol=0)
    assert 0.0 <= float(res.extra["grad_subspace_alignment"]) <= 1.0 + 1e-12


# -- AMP -----------------------------------------------------------------------------------------


def _tracker_state(opt):
    return {n: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                for k, v in t.state_dict().items()} for n, t in opt.tracked.trackers.items()}


def _assert_same_tracker_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            if isinstance(a[name][key], torch.Tensor):
                assert_bitwise(a[name][key], b[name][key])
            else:
                assert a[name][key] == b[name][key], (name, key)


def test_grad_scaler_matches_sgd_on_unscaled_grads_and_skips_overflow():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model = copy.deepcopy(ref)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14)
    for step in range(8):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        overflow = step == 5
        if overflow:
            x[0, 0] = float("inf")  # the scaled backward overflows: found_inf
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        before = ([p.detach().clone() for p in model.parameters()],
                  {i: s["momentum_buffer"].clone() for i, s in opt.state_dict()["state"].items()},
                  _tracker_state(opt), opt.steps)
        scaler.step(opt)
        scaler.update()
        if overflow:
            for p, q in zip(model.parameters(), before[0]):
                assert_bitwise(p, q)
            after = opt.state_dict()["state"]
            for i, buf in before[1].items():
                assert_bitwise(after[i]["momentum_buffer"], buf)
            _assert_same_tracker_state(_tracker_state(opt), before[2])
            assert opt.steps == before[3]
            assert scaler.get_scale() == 2.0 ** 13
            continue
        sgd.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        sgd.step()
        assert_same_params(ref, model)
    assert opt.steps == 7
    assert all(r.step == 7 for r in opt.spectra().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grad_scale_and_found_inf_attributes(dtype):
    """The GradScaler contract simulated: grad_scale / found_inf set on the optimizer."""
    torch.manual_seed(0)
    ref = nn.Linear(10, 6).to(dtype)
    model = copy.deepcopy(ref)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.1, rank=2)
    scale = torch.tensor(2.0 ** 16)  # the GradScaler default; overflows float16
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        # |grad| < 0.9: grad * 2^16 stays below float16's largest finite value (65504).
        grads = {n: (torch.randn(p.shape, generator=g) * 0.2).clamp(-0.9, 0.9).to(dtype)
                 for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = (grads[n].float() * scale).to(dtype)  # exact: power-of-two scale
        # Overflow step: nothing changes.
        before = [p.detach().clone() for p in model.parameters()]
        opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0)
        opt.step()
        for p, q in zip(model.parameters(), before):
            assert_bitwise(p, q)
        assert opt.steps == step
        # Finite step: the update of the unscaled gradients.
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        sgd.step()
        assert_same_params(ref, model)
    assert opt.steps == 3


# -- non-finite gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_grad_follows_sgd_and_is_flagged(bad):
    ref, model = Net(), Net()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2)
    for step in range(6):
        set_grads(ref, step)
        set_grads(model, step)
        if step == 3:
            ref.fc.weight.grad[0, 0] = bad
            model.fc.weight.grad[0, 0] = bad
        sgd.step()
        opt.step()  # never raises
        assert_same_params(ref, model)  # NaN where SGD has NaN
        spectra = opt.spectra()
        assert bool(spectra["fc.weight"].nonfinite) == (step >= 3)
        for name in ("conv.weight", "head.weight", "frozen.weight"):
            res = spectra[name]
            assert not bool(res.nonfinite)
            assert bool(torch.isfinite(res.sigma).all()) and res.step == step + 1
    assert not bool(torch.isfinite(model.fc.weight).all())
    # The flagged tracker keeps its last finite estimates instead of NaN.
    assert bool(torch.isfinite(spectra["fc.weight"].sigma).all())


def test_skip_nonfinite_leaves_parameter_and_buffer_unchanged():
    ref, model = Net(), Net()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2,
                      skip_nonfinite=True)
    for step in range(6):
        # The reference gets no gradient for fc.weight at step 3: what skipping means.
        set_grads(ref, step, none=("fc.weight",) if step == 3 else ())
        set_grads(model, step)
        if step == 3:
            model.fc.weight.grad[2, 5] = float("nan")
            w_before = model.fc.weight.detach().clone()
            buf_before = opt.state[model.fc.weight]["momentum_buffer"].clone()
        sgd.step()
        opt.step()
        if step == 3:
            assert_bitwise(model.fc.weight, w_before)
            assert_bitwise(opt.state[model.fc.weight]["momentum_buffer"], buf_before)
        assert_same_params(ref, model)
    assert bool(torch.isfinite(model.fc.weight).all())
    assert not any(bool(r.nonfinite) for r in opt.spectra().values())


# -- state_dict --------------------------------------------------------------------------------


def _run(model, opt, steps, start=0):
    for step in range(start, start + steps):
        set_grads(model, step, scale=0.1)
        opt.step()


def _make(model, **kw):
    return SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, nesterov=True, rank=2,
                       track_grad=True, audit_every=4, **kw)


def test_state_dict_weights_only_round_trip_resumes_bitwise():
    full_model = Net()
    full = _make(full_model)
    _run(full_model, full, 20)

    model = Net()
    opt = _make(model)
    _run(model, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    allowed = (torch.Tensor, int, float, bool, str, type(None))
    assert all(isinstance(leaf, allowed) for leaf in walk(ckpt["opt"]))

    model2 = Net(seed=123)  # different initial weights: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = _make(model2)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 10
    _run(model2, opt2, 10, start=10)

    assert_same_params(full_model, model2)
    a, b = full.spectra(), opt2.spectra()
    assert a.keys() == b.keys()
    for name in a:
        ra, rb = a[name], b[name]
        assert ra.step == rb.step == 20
        for field, value in ra.__dict__.items():
            if isinstance(value, torch.Tensor):
                assert_bitwise(getattr(rb, field), value)
        assert ra.extra.keys() == rb.extra.keys()
        for key, value in ra.extra.items():
            if isinstance(value, torch.Tensor):
                assert_bitwise(rb.extra[key], value)
            else:
                assert rb.extra[key] == value or (value != value and rb.extra[key] != rb.extra[key])


def test_load_state_dict_rejects_missing_tracker():
    model = Net()
    opt = SpectralSGD(model.named_parameters(), lr=0.1, rank=2)
    sd = opt.state_dict()
    del sd["lowrank"]["trackers"]["fc.weight"]
    with pytest.raises(ValueError, match="fc.weight"):
        SpectralSGD(Net().named_parameters(), lr=0.1, rank=2).load_state_dict(sd)


# -- audit ---------------------------------------------------------------------------------------


def test_audit_reports_exact_svdvals_and_error():
    model = _slow_model()
    opt = SpectralSGD(model.named_parameters(), lr=1e-3, rank=4, audit_every=3)
    for step in range(7):
        set_grads(model, step)
        opt.step()
        spectra = opt.spectra()
        if step == 1:
            assert "audit_sigma" not in spectra["gapped"].extra  # first audit at tracked step 3
    for step in range(7, 9):  # tracked step 9: audited now
        set_grads(model, step)
        opt.step()
    for name, res in opt.spectra().items():
        exact = exact_svdvals(model[name])
        extra = res.extra
        assert extra["audit_step"] == res.step == 9
        torch.testing.assert_close(extra["audit_sigma"], exact[:4], rtol=1e-12, atol=0)
        err = float(((res.sigma - exact[:4]).abs() / exact[0]).max())
        assert extra["audit_max_rel_err"] == pytest.approx(err, rel=1e-9, abs=1e-15)
        assert extra["audit_numerical_rank"] == int((exact > 1e-3 * exact[0]).sum())


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _has_triton(), reason="needs Triton (its CPU interpreter)")
def test_triton_backend_rejects_float64_at_construction(monkeypatch):
    _import_triton_now()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        SpectralSGD(Net(torch.float64).named_parameters(), lr=0.1, rank=2, backend="triton")


@pytest.mark.skipif(not _has_triton() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton and TRITON_INTERPRET=1 from the start of the process "
                           "(as `make test` sets it): Triton reads it when kernels are defined")
def test_triton_backend_under_interpreter_follows_sgd_and_torch_backend():
    """The dispatch of SpectralSGD to a kernel backend: (m, n) views of conv kernels and
    matrices, momentum buffers kept in the parameter's shape. The Triton kernel computes
    W - lr * g with a fused multiply-add, so it may differ from torch by an ulp."""
    ref, model, twin = Net(), Net(), Net()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2,
                      include=["conv.weight", "fc.weight"], backend="triton")
    # The torch twin runs the kernels' schedule explicitly (both sketches every step), so the
    # estimates compare step for step whatever the default schedule.
    ot = SpectralSGD(twin.named_parameters(), lr=0.05, momentum=0.9, rank=2,
                     include=["conv.weight", "fc.weight"], backend="torch", schedule="both")
    assert opt.tracked.backend == {"conv.weight": "triton", "fc.weight": "triton"}
    for step in range(3):
        for m, o in ((ref, sgd), (model, opt), (twin, ot)):
            set_grads(m, step)
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p in (model.conv.weight, model.fc.weight):
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape
        torch.testing.assert_close(buf, sgd.state[dict(zip(model.parameters(), ref.parameters()))[p]]
                                   ["momentum_buffer"], rtol=1e-6, atol=1e-7)
    for name, res in opt.spectra().items():
        torch.testing.assert_close(res.sigma, ot.spectra()[name].sigma, rtol=1e-5, atol=0)


def test_deepcopy_of_model_and_optimizer_keeps_tracking(tmp_path):
    model = Net()
    with lowrank.RunLog(tmp_path) as log:
        opt = SpectralSGD(model.named_parameters(), lr=0.05, momentum=0.9, rank=2, log=log)
        _run(model, opt, 3)
        model2, opt2 = copy.deepcopy((model, opt))
        assert opt2.tracked.log is log  # the sink is shared, not duplicated
        _run(model, opt, 2, start=3)
        _run(model2, opt2, 2, start=3)
    assert_same_params(model, model2)
    assert model2.fc.weight is not model.fc.weight
    assert opt2.steps == opt.steps == 5
    for name, res in opt.spectra().items():
        assert_bitwise(opt2.spectra()[name].sigma, res.sigma)
    # The copy tracks its own parameters.
    assert opt2.tracked.params["fc.weight"] is model2.fc.weight


def test_same_shape_matrices_batched_as_one_at_a_time(monkeypatch):
    """Under the "both" schedule (the GPU's) the tracked matrices of one shape, dtype and param
    group are updated and sketched as one batch after the loop over parameters (one launch of
    the CuPy pass). On the torch backend the batch runs the same per-matrix ops. Cases:
    two param groups (different lr), conv kernels sharing a matrix shape with a linear weight,
    a matrix whose gradient is missing on one step (sketch-only), a non-contiguous gradient
    (its own call), momentum buffers from the first step on. Weights, buffers and sketches must
    equal those of one call per matrix bit for bit; the post-processed state to rounding."""
    def build():
        torch.manual_seed(3)
        params = {"a": nn.Parameter(torch.randn(12, 18)), "b": nn.Parameter(torch.randn(12, 18)),
                  "c": nn.Parameter(torch.randn(12, 2, 3, 3)),  # viewed as 12 x 18
                  "d": nn.Parameter(torch.randn(12, 18)), "e": nn.Parameter(torch.randn(18, 12)),
                  "bias": nn.Parameter(torch.randn(12))}
        groups = [{"params": [params[n] for n in "abce"], "param_names": list("abce")},
                  {"params": [params["d"], params["bias"]], "param_names": ["d", "bias"],
                   "lr": 0.02}]
        opt = SpectralSGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3, rank=2,
                          sketch_rank=4, backend="torch", schedule="both")
        return params, opt

    runs = []
    for batched in (True, False):
        with monkeypatch.context() as mp:
            calls = []
            real = SpectralSGD._fused_step_many
            mp.setattr(SpectralSGD, "_fused_step_many",
                       lambda self, items, hyper: calls.append(len(items)) or real(self, items, hyper))
            if not batched:
                mp.setattr(SpectralSGD, "_batch_key", lambda self, *args: None)
            params, opt = build()
            gen = torch.Generator().manual_seed(4)
            for step in range(4):
                for name, p in params.items():
                    p.grad = torch.randn(p.shape, generator=gen)
                if step == 2:
                    params["b"].grad = None  # sketch-only this step
                    params["c"].grad = torch.randn((3, 3, 2, 12),
                                                   generator=gen).permute(3, 2, 0, 1)
                opt.step()
        assert (sum(calls) > 0) == batched
        if batched:  # a, b, c share a shape and group; d its own group; e its own shape
            assert max(calls) == 3
        runs.append((params, opt))
    (pb, ob), (po, oo) = runs
    for name in pb:  # the update is elementwise: bit for bit
        assert torch.equal(pb[name], po[name]), name
        assert torch.equal(ob.state[pb[name]]["momentum_buffer"],
                           oo.state[po[name]]["momentum_buffer"]), name
    for name in "abcde":
        tb, to = ob.tracked.trackers[name], oo.tracked.trackers[name]
        assert tb.step == to.step == 4
        assert torch.equal(tb.nonfinite, to.nonfinite)
        for key in ("fro2", "row_sq"):  # the sketch itself: the same per-matrix ops
            assert torch.equal(getattr(tb, key), getattr(to, key)), (name, key)
        # The post-processing is batched by group: a batch also splits by param group (d),
        # the one-call-per-matrix path does not, and batched float64 linear algebra of another
        # batch size may round differently; the bases are float32, so an ulp of one (6e-8)
        # moves the float64 estimates by ~1e-7: equal to float32 rounding.
        for key in ("U", "V", "sigma", "sigma_prev", "overlap_u"):
            torch.testing.assert_close(getattr(tb, key), getattr(to, key), rtol=1e-5, atol=1e-6,
                                       msg=f"{name}.{key}")


def test_gradient_inner_product_and_weight_norm_in_chunks_match_float64():
    """The torch reference of op inner_and_square_norm takes <G, W> and ||W||_F^2 of large CPU
    matrices in float64 chunks (no whole float64 copies): the same numbers as the whole-matrix
    float64 sums, to float64 rounding. (The cpu backend's kernel: test_cpu_inner_and_square_norm.py.)"""
    from lowrank.sketch import INNER_CHUNK, inner_and_square_norm_torch

    g = torch.Generator().manual_seed(3)
    for shape in [(300, 500), (17, INNER_CHUNK // 17 + 3), (64, 64)]:
        G, W = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        inner, square = inner_and_square_norm_torch(G, W)
        G64, W64 = G.double(), W.double()
        # another summation order: the error scales with sum |g w|, not with |<G, W>|
        scale = float((G64 * W64).abs().sum())
        torch.testing.assert_close(inner, (G64 * W64).sum(), rtol=0, atol=1e-13 * scale)
        torch.testing.assert_close(square, W64.square().sum(), rtol=1e-13, atol=0)

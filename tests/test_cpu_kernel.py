"""The CPU C kernel (backend "cpu", kernels/cpu/sgd_sketch.c) against the torch reference and
float64 truth: sketch products of every mode, the SGD update bit for bit against
torch.optim.SGD, layouts, errors, and whole tracked runs."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank import backends
from lowrank.sketch import init_bases, sketch_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

if not backends.cpu_kernel_available():  # no C compiler here: what users get is checked below
    pytest.skip("the CPU kernel does not build here", allow_module_level=True)

SK = backends.kernel_module("cpu", "sketch")
FS = backends.kernel_module("cpu", "fused_sgd_sketch")
LOADER = backends.kernel_module("cpu", "_loader")


def pass_calls(monkeypatch) -> list[int]:
    """The matrix count of each call of the list pass kernel (lowrank_sgd_sketch_many_f32),
    recorded from now on (whichever launcher makes the call)."""
    calls, lib = [], LOADER.library()

    class Counting:
        def __getattr__(self, attr):
            fn = getattr(lib, attr)
            if attr != "lowrank_sgd_sketch_many_f32":
                return fn
            return lambda count, *rest: calls.append(count) or fn(count, *rest)

    monkeypatch.setattr(LOADER, "library", Counting)
    return calls


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# Shapes: rows not a multiple of the 8-row blocks, columns past one 256-column tile, k not a
# multiple of 8 (padded chunks) and k over 16 (two chunks), a batch of 2, tall and wide; the last
# is past OVERLAP_MIN (2^19 elements), where the update runs a block ahead of the products, with
# rows and columns that are not multiples of the blocks, tiles or 256-column segments.
CASES = [(1, 37, 53, 5), (1, 300, 129, 12), (2, 64, 576, 24), (1, 5, 1000, 3), (1, 40, 7, 3),
         (1, 1024, 520, 16), (1, 1030, 1100, 13)]


@pytest.mark.parametrize("b,m,n,k", CASES)
@pytest.mark.parametrize("sides", ["both", "y", "z", "power"])
def test_sketch_matches_float64_truth(b, m, n, k, sides):
    W = rand(b, m, n, seed=m + n)
    U, V = init_bases(m, n, k, seed=k, batch=b)
    out = SK.sketch_cpu(W, U, V, sides=sides)
    ref = sketch_torch(W, U, V, sides=sides)
    W64, U64, V64 = W.double(), U.double(), V.double()
    truth = {"Y": W64 @ V64, "Z": W64.mT @ U64, "P": W64.mT @ (W64 @ V64),
             "row_sq": W64.square().sum(-1), "fro2": W64.square().sum((-2, -1))}
    for name in ("Y", "Z", "P"):
        got, want = getattr(out, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.shape == want.shape and got.dtype == torch.float32
            # float32 sums of n products: ~1e-7 relative, like torch's own matmul
            assert rel(got, truth[name]) < 2e-6, name
    assert_square_sums(out, truth)


# The kernel sums squares in float32 partials of 4 (SQ_TERMS in sgd_sketch.c), added in float64:
# each row's relative error is at most 4 roundings of 2^-24 (exact float64 accumulation cost
# 4-10% of a 2048^2 pass; torch's float32 norm, the reference, carries ~1e-7 as well).
SQUARE_SUM_BOUND = 4 * 2.0 ** -24 * (1 + 1e-6) + 1e-12


def assert_square_sums(out, truth):
    for name in ("row_sq", "fro2"):
        worst = float(((getattr(out, name) - truth[name]).abs() / truth[name]).max())
        assert worst <= SQUARE_SUM_BOUND, (name, worst)


# The kernel sums each row per product tile (128 columns here) in groups of 64 into float64
# lanes, checked once per row: 700 ends in a short group of 3 vectors and 12 columns in float64;
# 1030 x 1100 runs over threads.
@pytest.mark.parametrize("m,n", [(40, 700), (1030, 1100)])
def test_square_sums_fall_back_to_float64_where_float32_squares_fail(m, n):
    """Rows whose float32 squares underflow (entries 1e-25, an all-zero row) or overflow
    (entries 1e25) are summed in float64, exact to its rounding; a NaN stays in its row."""
    W = rand(1, m, n, seed=30)
    W[0, 1] *= 1e-25
    W[0, 2] *= 1e25
    W[0, 3] = 0.0
    W[0, 4, : n // 2] *= 1e-25  # half tiny: underflows in float32, negligible beside the rest
    U, V = init_bases(m, n, 4, seed=31)
    out = SK.sketch_cpu(W, U, V, sides="y")
    truth = W.double().square().sum(-1)
    for row in (1, 2):
        assert abs(float(out.row_sq[0, row] / truth[0, row]) - 1) < 1e-12, row
    assert float(out.row_sq[0, 3]) == 0.0
    assert abs(float(out.row_sq[0, 4] / truth[0, 4]) - 1) <= SQUARE_SUM_BOUND
    W[0, 5, 7] = float("nan")
    bad = SK.sketch_cpu(W, U, V, sides="y")
    assert bool(torch.isnan(bad.row_sq[0, 5])) and int(torch.isnan(bad.row_sq).sum()) == 1


# dampening 0.9: torch rounds 1 - dampening from double (a float 1 - 0.9f differs by an ulp);
# momentum 1e-50: nonzero for torch (a buffer is kept) though it rounds to 0 in float32
HYPER = [dict(), dict(weight_decay=1e-2), dict(momentum=0.9), dict(momentum=0.9, nesterov=True,
         weight_decay=5e-3), dict(momentum=0.5, dampening=0.3, maximize=True),
         dict(momentum=0.9, dampening=0.9), dict(momentum=1e-50, dampening=0.99)]


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("m,n,k,sides", [(70, 300, 6, "both"), (1030, 1100, 13, "power")])
def test_fused_update_is_torch_sgd_bit_for_bit(hyper, m, n, k, sides):
    """(The second shape takes the overlap path: the update a block ahead of the products.)"""
    W0 = rand(m, n, seed=1)
    U, V = init_bases(m, n, k, seed=2)
    p = torch.nn.Parameter(W0.clone())
    opt = torch.optim.SGD([p], lr=0.05, foreach=False, **hyper)
    W, buf = W0.clone(), None
    for step in range(3):
        G = rand(m, n, seed=10 + step)
        p.grad = G
        opt.step()
        out, buf = FS.fused_sgd_sketch_cpu(W, G, buf, U, V, lr=0.05, sides=sides, **hyper)
        assert torch.equal(W, p.detach()), f"step {step}: W differs from torch.optim.SGD"
        if hyper.get("momentum"):
            assert torch.equal(buf, opt.state[p]["momentum_buffer"])
        else:
            assert buf is None
    # the sketch is of the updated W
    ref = sketch_torch(W, U, V, sides=sides)
    second = "P" if sides == "power" else "Z"
    assert rel(out.Y, ref.Y) < 2e-6 and rel(getattr(out, second), getattr(ref, second)) < 2e-6


def test_fused_update_of_a_channels_last_conv_weight_writes_back():
    W0 = rand(16, 8, 3, 3, seed=3).to(memory_format=torch.channels_last)
    G = rand(16, 8, 3, 3, seed=4)
    U, V = init_bases(16, 72, 4, seed=5)
    W = W0.clone(memory_format=torch.channels_last)
    out, _ = FS.fused_sgd_sketch_cpu(W, G, None, U, V, lr=0.1)
    expected = W0.add(G, alpha=-0.1)  # torch.optim.SGD's update
    assert not W.is_contiguous() and torch.equal(W, expected)
    assert rel(out.Y, expected.reshape(16, 72) @ V[0]) < 2e-6


def test_results_are_deterministic_and_nan_propagates():
    W, U, V = rand(1, 200, 300, seed=6), *init_bases(200, 300, 8, seed=7)
    a, b = SK.sketch_cpu(W, U, V), SK.sketch_cpu(W, U, V)
    for name in ("Y", "Z", "fro2", "row_sq"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    W[0, 3, 7] = float("nan")
    bad = SK.sketch_cpu(W, U, V)
    assert not bool(torch.isfinite(bad.fro2).all()) and bool(torch.isnan(bad.Z).any())


@pytest.mark.parametrize("sides", ["power", "both"])
def test_two_threads_give_the_one_thread_update_and_reproducible_sketches(sides):
    """The threaded pass (chunks handed out dynamically, the update a block ahead on this
    overlap-path shape): W, Y and the row norms are those of one thread bit for bit; Z (P) sums
    per-chunk partials, whose count follows the thread count, so it is compared with float64
    truth and with a second two-thread run (bit for bit: the schedule does not matter)."""
    m, n, k = 1030, 1100, 16
    W0, G = rand(m, n, seed=20), rand(m, n, seed=21)
    U, V = init_bases(m, n, k, seed=22)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 2):
            torch.set_num_threads(t)
            W = W0.clone()
            out, _ = FS.fused_sgd_sketch_cpu(W, G, None, U, V, lr=0.01, sides=sides)
            runs.append((W, out))
    finally:
        torch.set_num_threads(threads)
    second = "P" if sides == "power" else "Z"
    (W1, one), (W2, two), (W3, three) = runs
    assert torch.equal(W1, W2) and torch.equal(one.Y, two.Y) and torch.equal(one.row_sq, two.row_sq)
    assert torch.equal(W2, W3) and torch.equal(getattr(two, second), getattr(three, second))
    W64 = W1.double()
    truth = W64.mT @ (W64 @ V[0].double()) if sides == "power" else W64.mT @ U[0].double()
    assert rel(getattr(two, second)[0], truth) < 2e-6


def test_empty_and_default_dtype_cases():
    """A matrix with no columns sketches to zeros (no division by its zero tiles), and outputs
    are float32 whatever torch's default dtype."""
    U, V = torch.zeros(1, 16, 2), torch.zeros(1, 0, 2)
    out = SK.sketch_cpu(torch.zeros(1, 16, 0), U, V, sides="y")
    assert torch.equal(out.Y, torch.zeros(1, 16, 2)) and float(out.fro2) == 0.0
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        W, (U, V) = rand(1, 40, 30, seed=8).float(), init_bases(40, 30, 4, seed=9)
        got = SK.sketch_cpu(W, U, V, sides="power")
    finally:
        torch.set_default_dtype(default)
    want = sketch_torch(W, U, V, sides="power")
    assert got.Y.dtype == torch.float32 and rel(got.Y, want.Y) < 2e-6 and rel(got.P, want.P) < 2e-6


def test_bad_inputs_raise_clear_errors():
    U, V = init_bases(8, 6, 2)
    with pytest.raises(TypeError, match="float32"):
        SK.sketch_cpu(torch.ones(8, 6, dtype=torch.float64), U, V)
    with pytest.raises(TypeError, match=r"G must be torch.float32 \(the dtype of W\)"):
        FS.fused_sgd_sketch_cpu(torch.ones(8, 6), torch.ones(8, 6, dtype=torch.float64), None,
                                U, V, lr=0.1)
    with pytest.raises(ValueError, match="do not fit"):
        SK.sketch_cpu(torch.ones(6, 8), U, V)
    with pytest.raises(ValueError, match="sides must be one of"):
        SK.sketch_cpu(torch.ones(8, 6), U, V, sides="x")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 weights"):
        backends.resolve_backend("cpu", "cpu", torch.float64)
    with pytest.raises(ValueError, match="plain learning rate"):
        FS.fused_sgd_sketch_cpu(torch.ones(8, 6), torch.ones(8, 6), None, U, V,
                                lr=torch.tensor(0.1, requires_grad=True))


def test_missing_compiler_is_reported_not_hidden(monkeypatch, tmp_path):
    loader = backends.kernel_module("cpu", "_loader")
    monkeypatch.setattr(loader, "_library", None)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    with pytest.raises(backends.BackendUnavailable, match="C compiler"):
        backends.resolve_backend("cpu", "cpu", torch.float32)
    assert backends.resolve_backend("auto", "cpu", torch.float32) == "torch"


def test_auto_picks_the_kernel_for_32_and_16_bit_weights():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert backends.resolve_backend("auto", "cpu", dtype) == "cpu"
    assert backends.resolve_backend("auto", "cpu", torch.float64) == "torch"


@pytest.mark.parametrize("hyper", HYPER[:5])
def test_list_call_gives_each_matrix_what_its_own_call_gives(hyper):
    """One call for matrices of several shapes and widths (k = 13 padded), each with its own
    sides, a buffer that exists and one that this step creates: the same bits as one call per
    matrix, for the update, the buffers and every sketch."""
    shapes = [(64, 32, 16, "power"), (300, 200, 13, "both"), (1030, 256, 16, "y"),
              (40, 2100, 8, "z"), (33, 70, 8, "power")]
    Ws = [rand(m, n, seed=i) for i, (m, n, _, _) in enumerate(shapes)]
    Gs = [rand(m, n, seed=20 + i) for i, (m, n, _, _) in enumerate(shapes)]
    bufs = [None if i % 2 else rand(m, n, seed=40 + i) for i, (m, n, _, _) in enumerate(shapes)]
    bases = [init_bases(m, n, k, seed=60 + i) for i, (m, n, k, _) in enumerate(shapes)]
    alone_W = [W.clone() for W in Ws]
    alone_buf = [None if b is None else b.clone() for b in bufs]
    got, got_bufs = FS.fused_sgd_sketch_cpu_list(
        Ws, Gs, bufs, [U for U, _ in bases], [V for _, V in bases], [s for *_, s in shapes],
        lr=0.05, **hyper)
    for i, (_, _, _, sides) in enumerate(shapes):
        want, want_buf = FS.fused_sgd_sketch_cpu(alone_W[i], Gs[i], alone_buf[i], *bases[i],
                                                 lr=0.05, sides=sides, **hyper)
        assert torch.equal(Ws[i], alone_W[i]), i
        if hyper.get("momentum"):
            assert torch.equal(got_bufs[i], want_buf), i
        for field in ("Y", "Z", "P", "fro2", "row_sq"):
            a, b = getattr(got[i], field), getattr(want, field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (i, field)


def test_sketch_only_list_call_gives_each_matrix_what_sketch_cpu_gives():
    shapes = [(64, 32, 16, "power"), (300, 200, 13, "both"), (40, 2100, 8, "z")]
    Ws = [rand(m, n, seed=i) for i, (m, n, _, _) in enumerate(shapes)]
    before = [W.clone() for W in Ws]
    bases = [init_bases(m, n, k, seed=60 + i) for i, (m, n, k, _) in enumerate(shapes)]
    got, _ = FS.fused_sgd_sketch_cpu_list(Ws, None, None, [U for U, _ in bases],
                                          [V for _, V in bases], [s for *_, s in shapes])
    for i, (_, _, _, sides) in enumerate(shapes):
        assert torch.equal(Ws[i], before[i])  # W is not written
        want = SK.sketch_cpu(Ws[i], *bases[i], sides=sides)
        for field in ("Y", "Z", "P", "fro2", "row_sq"):
            a, b = getattr(got[i], field), getattr(want, field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (i, field)


def test_spectrum_tracker_sketches_every_matrix_in_one_kernel_call(monkeypatch):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Linear(40, 20),
                              torch.nn.Conv2d(4, 12, 3))
    before = [p.detach().clone() for p in net.parameters()]
    tracker = lowrank.SpectrumTracker(net, rank=4, sketch_rank=8, backend="cpu")
    calls = pass_calls(monkeypatch)
    for _ in range(3):
        tracker.step()
    assert calls == [3] * 3
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # sketch only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_spectral_sgd_steps_each_param_group_in_one_kernel_call(monkeypatch, dtype):
    """Two param groups (a linear and a conv weight of different shapes in one, a linear
    weight in the other, biases untracked): one kernel call per group and step; the weights
    and buffers stay torch.optim.SGD's bit for bit and the estimates match float64 svdvals.
    16-bit weights: torch's update (and the bias's: not the foreach ops, which round a 16-bit
    buffer otherwise), then the kernel's sketch of the 16-bit values."""
    torch.manual_seed(3)
    shapes = {"a": (48, 80), "conv": (32, 8, 3, 3), "b": (64, 40)}

    def decaying(shape):  # a spectrum the tracker converges on within the steps below
        m, n = shape[0], math.prod(shape[1:])
        left, right = torch.linalg.qr(torch.randn(m, 30)).Q, torch.linalg.qr(torch.randn(n, 30)).Q
        return ((left * 0.7 ** torch.arange(30.0)) @ right.T).reshape(shape)

    W0 = {name: decaying(shape).to(dtype) for name, shape in shapes.items()}
    params = {name: torch.nn.Parameter(w.clone()) for name, w in W0.items()}
    bias = torch.nn.Parameter(torch.zeros(48, dtype=dtype))
    copies = {name: torch.nn.Parameter(w.clone()) for name, w in W0.items()}
    bias_copy = torch.nn.Parameter(torch.zeros(48, dtype=dtype))
    named = [("a", params["a"]), ("conv", params["conv"]), ("bias", bias), ("b", params["b"])]
    opt = lowrank.SpectralSGD(named, rank=4, sketch_rank=8, lr=0.05, momentum=0.9,
                              weight_decay=1e-3, backend="cpu")
    ref = torch.optim.SGD([{"params": [copies["a"], copies["conv"], bias_copy]},
                           {"params": [copies["b"]], "lr": 0.02}], lr=0.05, momentum=0.9,
                          weight_decay=1e-3, foreach=False)
    group = opt.param_groups[0]  # split in two: the ref's groups
    group["params"] = [params["a"], params["conv"], bias]
    opt.param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": [params["b"]], "lr": 0.02})
    calls = pass_calls(monkeypatch)
    for step in range(40):
        for name, p in [*params.items(), ("bias", bias)]:
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step
                                                                              + len(name)))
            p.grad = (g * 1e-3).to(dtype)
            (copies.get(name, bias_copy)).grad = p.grad.clone()
        opt.step()
        ref.step()
    assert calls == [2, 1] * 40
    for name, p in params.items():
        assert torch.equal(p.detach(), copies[name].detach()), name
        assert torch.equal(opt.state[p]["momentum_buffer"],
                           ref.state[copies[name]]["momentum_buffer"]), name
        exact = torch.linalg.svdvals(p.detach().reshape(shapes[name][0], -1).double())[:4]
        est = opt.spectra()[name].sigma
        assert float(((est - exact) / exact[0]).abs().max()) < 1e-5, name
    assert torch.equal(bias.detach(), bias_copy.detach())


@pytest.mark.parametrize("schedule", ["sequential", "both", "alternate"])
def test_spectral_sgd_on_the_kernel_tracks_the_exact_spectrum(schedule):
    """A drifting matrix with a decaying spectrum: after warm-up the top-r estimates of every
    schedule match float64 svdvals, and the weights match torch.optim.SGD bit for bit."""
    m, n, k, r = 96, 160, 12, 6
    gen = torch.Generator().manual_seed(8)
    Uw = torch.linalg.qr(torch.randn(m, m, generator=gen)).Q
    Vw = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    s = 0.8 ** torch.arange(m, dtype=torch.float32)
    W0 = (Uw[:, :m] * s) @ Vw[:, :m].T
    p = torch.nn.Parameter(W0.clone())
    q = torch.nn.Parameter(W0.clone())
    opt = lowrank.SpectralSGD([("w", p)], lr=0.05, momentum=0.9, rank=r, sketch_rank=k,
                              backend="cpu", schedule=schedule)
    ref = torch.optim.SGD([q], lr=0.05, momentum=0.9, foreach=False)
    for step in range(60):
        G = 1e-3 * torch.randn(m, n, generator=gen)
        p.grad, q.grad = G, G.clone()
        opt.step()
        ref.step()
    assert torch.equal(p.detach(), q.detach())
    exact = torch.linalg.svdvals(p.detach().double())[:r]
    est = opt.spectra()["w"].sigma
    assert float(((est - exact) / exact[0]).abs().max()) < 1e-5

"""``precision`` and ``deterministic``: validated once, forwarded to the kernels that offer them.

The Triton kernels take both; the torch backend is always exact fp32 and deterministic; the CuPy
kernel is exact fp32 and reduces with atomics. Under ``backend="auto"`` a matrix that lands on
torch (a CPU run, float64 weights) keeps exact products, so one script runs everywhere; an
explicit backend that cannot honour a setting raises instead of ignoring it.
"""

from __future__ import annotations

import os

import pytest
import torch

import lowrank
from lowrank import backends

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.mark.parametrize("cupy_ok,triton_ok", [(True, True), (False, True), (True, False),
                                               (False, False)])
def test_auto_on_cuda_prefers_cupy_for_exact_nondeterministic_sketches(monkeypatch, cupy_ok,
                                                                       triton_ok):
    """No GPU needed: resolve_backend decides from what imports and runs. CuPy for the default
    settings; Triton for TF32 and deterministic sketches (which only it offers) and where CuPy
    does not run; torch for float64 or without either."""
    monkeypatch.setattr(backends, "cupy_runs", lambda device: cupy_ok)
    monkeypatch.setattr(backends, "triton_available", lambda: triton_ok)
    cuda = torch.device("cuda", 0)
    fallback = "triton" if triton_ok else "torch"
    for dtype in (torch.float32, torch.bfloat16, torch.float16, None):
        assert backends.resolve_backend("auto", cuda, dtype) == ("cupy" if cupy_ok else fallback)
        assert backends.resolve_backend("auto", cuda, dtype, precision="tf32") == fallback
        assert backends.resolve_backend("auto", cuda, dtype, deterministic=True) == fallback
    assert backends.resolve_backend("auto", cuda, torch.float64) == "torch"
    # Whatever auto picks takes the settings it was picked for.
    for precision, deterministic in (("fp32", False), ("tf32x3", False), ("fp32", True)):
        resolved = backends.resolve_backend("auto", cuda, torch.float32, precision=precision,
                                            deterministic=deterministic)
        backends.kernel_options("auto", resolved, precision=precision, deterministic=deterministic)


def test_cupy_runs_only_where_its_kernels_load(monkeypatch):
    """No CuPy, or a CuPy whose kernels do not compile (no NVRTC, a CUDA mismatch): "does not
    run", so "auto" and the Triton backend's post-processing take another path."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "_cupy_runs", {})
    monkeypatch.setattr(backends, "cupy_available", lambda: False)
    assert backends.cupy_runs(cuda) is False
    assert backends.cupy_runs(torch.device("cpu")) is False
    loader = backends.kernel_module("cupy", "_loader")

    def no_nvrtc(*args):
        raise RuntimeError("nvrtc: library not found")

    monkeypatch.setattr(backends, "_cupy_runs", {})
    monkeypatch.setattr(backends, "cupy_available", lambda: True)
    monkeypatch.setattr(loader, "function", no_nvrtc)
    assert backends.cupy_runs(cuda) is False
    loaded = []
    monkeypatch.setattr(backends, "_cupy_runs", {})
    monkeypatch.setattr(loader, "function", lambda cu, name, device: loaded.append(name))
    assert backends.cupy_runs(cuda) is True and backends.cupy_runs(cuda) is True
    assert loaded == ["pp_refill", "fused_sgd_sketch_f32_k16"]  # probed once per device


@pytest.mark.parametrize("shared_kb,widest_cupy", [(227, 167), (99, 108)])
def test_auto_takes_cupy_only_for_widths_its_kernels_hold(monkeypatch, shared_kb, widest_cupy):
    """The CuPy eigen solver and pass keep k-sized tiles in shared memory: wider sketches go to
    Triton (k up to 256) under "auto" rather than failing at the first step. 227 KB is the
    H100's per-block limit, 99 KB that of smaller GPUs; the eigen solver is the bound."""
    monkeypatch.setattr(backends, "cupy_runs", lambda device: True)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    loader = backends.kernel_module("cupy", "_loader")
    monkeypatch.setattr(loader, "max_shared_bytes", lambda device: shared_kb * 1024)
    cuda = torch.device("cuda", 0)
    pick = lambda k: backends.resolve_backend("auto", cuda, torch.float32, width=k)  # noqa: E731
    assert pick(16) == "cupy" and pick(widest_cupy) == "cupy"
    assert pick(widest_cupy + 1) == "triton"
    assert backends.resolve_backend("auto", cuda, torch.float32) == "cupy"  # width not given


def test_kernel_options_validation():
    ko = backends.kernel_options
    assert ko("auto", "triton", precision="tf32", deterministic=True) == {
        "precision": "tf32", "deterministic": True}
    assert ko("triton", "triton") == {"precision": "fp32", "deterministic": False}
    assert ko("auto", "torch", precision="tf32x3", deterministic=True) == {}
    assert ko("torch", "torch", deterministic=True) == {}
    with pytest.raises(ValueError, match="precision must be one of"):
        ko("auto", "torch", precision="bf16")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        ko("auto", "torch", deterministic=1)
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        ko("torch", "torch", precision="tf32")
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        ko("cupy", "cupy", precision="tf32x3")
    with pytest.raises(ValueError, match="not offered by the CuPy kernel"):
        ko("cupy", "cupy", deterministic=True)


def _named(shape=(24, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("w", torch.nn.Parameter(torch.randn(*shape, generator=g)))]


def test_optimizer_and_tracker_reject_bad_settings_at_construction():
    with pytest.raises(ValueError, match="parameter 'w'.*needs the Triton kernels"):
        lowrank.SpectralSGD(_named(), lr=0.1, rank=2, backend="torch", precision="tf32")
    with pytest.raises(ValueError, match="precision must be one of"):
        lowrank.SpectrumTracker(_named(), rank=2, precision="fp16")
    # auto on the CPU: a CPU backend (the C kernel where it builds), exact products, and the
    # same numbers as precision="fp32".
    runs = []
    for precision in ("fp32", "tf32"):
        named = _named()
        opt = lowrank.SpectralSGD(named, lr=0.1, rank=2, precision=precision, deterministic=True)
        assert opt.tracked.backend["w"] in ("cpu", "torch") and opt.tracked.options["w"] == {}
        for step in range(3):
            named[0][1].grad = torch.full_like(named[0][1], 0.01 * (step + 1))
            opt.step()
        runs.append(opt.spectra()["w"].sigma)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("precision,deterministic", [("fp32", True), ("tf32x3", False)])
def test_options_reach_the_triton_kernels(monkeypatch, precision, deterministic):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_mod = backends.kernel_module("triton", "fused_sgd_sketch")
    sketch_mod = backends.kernel_module("triton", "sketch")
    seen = []

    def spy(module, fname):
        real = getattr(module, fname)

        def wrapper(*args, **kwargs):
            seen.append((fname, kwargs.get("precision"), kwargs.get("deterministic")))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, fname, wrapper)

    spy(fused_mod, "fused_sgd_sketch_triton")
    spy(sketch_mod, "sketch_triton")
    p = torch.nn.Parameter(torch.randn(40, 24, generator=torch.Generator().manual_seed(3)).to(device))
    q = torch.nn.Parameter(p.detach().clone())
    opt = lowrank.SpectralSGD([("w", p)], lr=0.05, rank=3, backend="triton", precision=precision,
                              deterministic=deterministic)
    ref = lowrank.SpectralSGD([("w", q)], lr=0.05, rank=3, backend="torch", schedule="both")
    for step in range(4):
        g = torch.randn(40, 24, generator=torch.Generator().manual_seed(10 + step)).to(device)
        p.grad, q.grad = (None, None) if step == 2 else (g, g.clone())  # step 2: sketch-only pass
        opt.step()
        ref.step()
    assert ("fused_sgd_sketch_triton", precision, deterministic) in seen
    assert ("sketch_triton", precision, deterministic) in seen
    # tf32x3 keeps about fp32 accuracy (and the interpreter computes fp32 exactly).
    torch.testing.assert_close(opt.spectra()["w"].sigma, ref.spectra()["w"].sigma,
                               rtol=1e-4, atol=0)


def test_settings_are_checked_even_when_nothing_is_tracked():
    biases = [("b", torch.nn.Parameter(torch.zeros(5)))]
    with pytest.raises(ValueError, match="precision must be one of"):
        lowrank.SpectralSGD(biases, lr=0.1, rank=2, precision="bogus")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        lowrank.SpectralSGD(biases, lr=0.1, rank=2, deterministic="yes")

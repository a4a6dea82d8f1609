"""``lowrank report`` and ``lowrank estimate`` as a user runs them (``lowrank demo``:
test_demo.py; ``lowrank bench``: test_bench.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from lowrank import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(run_dir, steps, *, nan_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    X, y = torch.randn(64, 12), torch.randn(64, 5)
    with lowrank.RunLog(run_dir) as log:
        opt = lowrank.SpectralSGD(model.named_parameters(), lr=0.05, rank=3, log=log,
                                  skip_nonfinite=False)
        for step in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(X), y).backward()
            if step == nan_at:
                model[0].weight.grad[0, 0] = float("nan")
            opt.step()
        return model, opt.spectra()


def test_report_prints_each_layers_last_step_and_writes_the_plots(tmp_path, capsys):
    model, found = _train(tmp_path, 12)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("0.", "2."))}
    for name, res in found.items():
        assert f"{float(res.spectral_norm):.4g}" in lines[name] and lines[name].rstrip().endswith("ok")
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["ranks.png", "sigma_trajectories.png", "spectrum_heatmap_0.weight.png",
                    "spectrum_heatmap_2.weight.png"]


def test_report_says_when_a_layers_weights_stopped_being_finite(tmp_path, capsys):
    """A NaN gradient at step 6 (not skipped) makes the first layer NaN from step 6 and the
    second from step 7 (through the NaN activations); the log keeps the last finite estimates,
    and the table must not pass them off as the current state."""
    _train(tmp_path, 10, nan_at=6)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("0.", "2."))}
    assert lines["0.weight"].rstrip().endswith("NOT FINITE since step 6")
    assert lines["2.weight"].rstrip().endswith("NOT FINITE since step 7")
    assert " False " in lines["0.weight"]  # not "converged"


def test_report_of_a_folder_without_a_log_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no log parts" in capsys.readouterr().err


def test_estimate_matches_exact_svdvals(tmp_path, capsys):
    """On a decaying spectrum (a random Gaussian matrix's flat one is the one-shot sketch's
    hard case: errors of a few 1e-3 there) the printed values and error are float64 svdvals'."""
    g = torch.Generator().manual_seed(1)
    Q1 = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    a = (Q1 * 0.7 ** torch.arange(40, dtype=torch.float64)) @ Q2.T
    state = {"a": a.float(), "conv": torch.randn(8, 3, 3, 3, generator=g),
             "bias": torch.randn(40, generator=g), "ints": torch.ones(4, 4, dtype=torch.int64)}
    torch.save(state, tmp_path / "w.pt")
    assert cli.main(["estimate", str(tmp_path / "w.pt"), "-k", "4", "--exact"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["a", "conv"]  # 1-D and integer ones skipped
    for line, W in zip(out, (state["a"], state["conv"].reshape(8, 27))):
        values = [float(v) for v in line.split(":")[1].split("max")[0].split()]
        exact = torch.linalg.svdvals(W.double())[:4]
        assert values == pytest.approx(exact.tolist(), rel=1e-4)  # printed to 5 digits
        assert float(line.split("max rel err")[1]) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["-k", "0"], "-k must be >= 1"),
    (["-k", "-2"], "-k must be >= 1"),
])
def test_estimate_rejects_a_bad_k(tmp_path, capsys, args, message):
    torch.save(torch.randn(5, 5), tmp_path / "w.pt")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["estimate", str(tmp_path / "w.pt"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_estimate_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["estimate", str(tmp_path / "missing.pt")]) == 2
    assert "cannot load" in capsys.readouterr().err

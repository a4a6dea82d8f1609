"""The replayed post-processing (lowrank/post_graphs.py) where no graph is made: CPU steps run
as before, the switch and copies behave. The replays themselves run on a GPU:
tests/test_eager_gpu.py."""

from __future__ import annotations

import copy
import pickle

import torch

from lowrank import SpectralSGD
from lowrank.post_graphs import PostGraphs, _pattern
from lowrank.sketch import sketch_torch


def _opt(schedule="both"):
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(40, 24, generator=g)) for n in ("a", "b")}
    return params, SpectralSGD(list(params.items()), lr=0.05, momentum=0.9, rank=3,
                               sketch_rank=6, backend="torch", schedule=schedule)


def test_cpu_steps_make_no_graph_and_advance_as_before():
    """A CPU TrackedSet with packed ("both") trackers: the pattern is refused (not CUDA), so
    every step runs the eager post-processing: same state as with the graphs switched off."""
    runs = []
    for enabled in (True, False):
        params, opt = _opt()
        opt.tracked.post_graphs.enabled = enabled
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        assert opt.tracked.post_graphs.replays == opt.tracked.post_graphs.captures == 0
        runs.append(opt)
    for name, tr in runs[0].tracked.trackers.items():
        assert tr.step == 4 and torch.equal(tr.sigma, runs[1].tracked.trackers[name].sigma)


def test_pattern_refuses_cpu_specs():
    params, opt = _opt()
    ts = opt.tracked
    names = next(iter(ts._packs))
    sk = sketch_torch(torch.stack([params[n].detach() for n in names]), *ts.bases(names))
    spec = ([ts.trackers[n] for n in names], None, sk, ts.bases(names), ts._packs[names], "torch")
    assert _pattern([spec]) is None


def test_switch_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOWRANK_POST_GRAPHS", "0")
    assert not PostGraphs().enabled
    monkeypatch.setenv("LOWRANK_POST_GRAPHS", "1")
    assert PostGraphs().enabled


def test_copies_keep_the_switch_and_drop_the_graphs():
    """Graphs address the original's state: a deep copy or an unpickled TrackedSet starts
    without them (and keeps whether they are on)."""
    graphs = PostGraphs()
    graphs.enabled = False
    graphs._graphs[("pattern",)] = None
    graphs.replays = 3
    for clone in (copy.deepcopy(graphs), pickle.loads(pickle.dumps(graphs))):
        assert not clone.enabled and clone._graphs == {} and clone.replays == 0
    params, opt = _opt()
    opt.tracked.post_graphs._graphs[("pattern",)] = None
    _, copied = copy.deepcopy((params, opt))
    assert copied.tracked.post_graphs._graphs == {} and copied.tracked.post_graphs.enabled

"""The metrics of many tracked matrices as a few batches, for the run log.

:meth:`MatrixTracker.metrics` runs some sixty small tensor ops per matrix; logged every step
for a network's twenty matrices, that was two to three times the whole step on a CPU (and as
many launches on a GPU). The metrics of :mod:`lowrank.metrics` are batched over a leading
dimension already, and take per-row shapes, so the trackers of one sketch width, device and
history form a :class:`Block`, summarised as one batch. The log goes further
(:class:`Deferred`): each step it keeps a copy of the state a block's metrics read (a few
stacks), and when it flushes it computes the metrics of every buffered step of the block in
one batch.

Every op is elementwise or reduces within a row, so a row's values are those of the tracker's
own :meth:`~lowrank.tracking.MatrixTracker.metrics`, bit for bit on the CPU (tested; a GPU's
reductions may pick another order for another batch size, a last-bit difference).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from . import metrics


class Block(NamedTuple):
    """Trackers whose metrics are one batch: one sketch width, device and history."""

    rows: tuple  # their indices in the list given to plan(), by increasing m
    shape: tuple  # (m, n), float64 (len(rows),) tensors on the device
    m_runs: tuple  # lengths of the runs of equal m in rows (row_sq of one m stack)
    history: bool  # past the first step: the previous estimates and the overlap are read


def history(tracker) -> bool:
    """Whether ``tracker``'s metrics read its previous step (as :meth:`MatrixTracker.metrics`)."""
    return tracker.step > 1


def plan(trackers, histories) -> list[Block]:
    """Group ``trackers`` (with :func:`history` of each) into blocks. Builds small tensors:
    callers keep the plan while the same trackers come with the same histories."""
    groups: dict[tuple, list[int]] = {}
    for i, (tr, hist) in enumerate(zip(trackers, histories)):
        groups.setdefault((tr.k, tr.sigma.device, hist), []).append(i)
    blocks = []
    for (_, device, hist), rows in groups.items():
        rows.sort(key=lambda i: trackers[i].shape[0])
        runs = tuple(len(list(run)) for _, run in
                     itertools.groupby(trackers[i].shape[0] for i in rows))
        # one fill per entry (no host-to-device copy, which could synchronise a GPU stream)
        shape = tuple(torch.cat([torch.full((1,), float(trackers[i].shape[d]), device=device,
                                            dtype=torch.float64) for i in rows])
                      for d in (0, 1))
        blocks.append(Block(tuple(rows), shape, runs, hist))
    return blocks


def snapshot(trackers, block: Block) -> dict:
    """Copies of the state that ``block``'s metrics read, stacked in block order (the state of
    static trackers changes in place): the metrics can be computed later, from the copies."""
    trs = [trackers[i] for i in block.rows]
    keys = ("sigma", "sigma_y", "sigma_z", "fro2", "nonfinite")
    keys += ("sigma_prev", "overlap_u") if block.history else ()
    out = {key: torch.cat([getattr(tr, key) for tr in trs]) for key in keys}
    runs, start = [], 0
    for run in block.m_runs:  # row norms: one stack per run of equal m
        runs.append(torch.cat([tr.row_sq for tr in trs[start:start + run]]))
        start += run
    out["row_sq_runs"] = runs
    return out


def snapshot_metrics(block: Block, snaps: list[dict], r: int, tol: float) -> dict:
    """The metrics of ``block``'s trackers at the steps of ``snaps`` (:func:`snapshot`), in one
    batch: (len(snaps) * len(block.rows), ...) tensors, step by step, block order within a step.
    Each row is what :meth:`MatrixTracker.metrics` gave at that step (whose checks of r each
    tracker passed when it was made)."""
    def cat(key):
        return snaps[0][key] if len(snaps) == 1 else torch.cat([s[key] for s in snaps])

    steps = len(snaps)
    shape = tuple(d.repeat(steps) for d in block.shape)
    sigma, fro2 = cat("sigma"), cat("fro2")
    prev, overlap = (cat("sigma_prev"), cat("overlap_u")) if block.history else (None, None)
    out = metrics.summarize(sigma, cat("sigma_y"), cat("sigma_z"), prev, fro2, None, overlap,
                            shape, r, tol)
    if "subspace_drift" not in out:
        out["subspace_drift"] = torch.ones_like(fro2)
    # near-zero rows per run of equal m over all steps, then back to step-major order
    near_zero = [metrics.near_zero_rows(torch.cat([s["row_sq_runs"][j] for s in snaps]))
                 .view(steps, -1) for j in range(len(block.m_runs))]
    out["near_zero_rows"] = (near_zero[0] if len(near_zero) == 1
                             else torch.cat(near_zero, dim=1)).reshape(-1)
    out["nonfinite"] = cat("nonfinite")
    return out


def block_metrics(trackers, block: Block, r: int, tol: float) -> dict[str, torch.Tensor]:
    """The metrics of ``block``'s trackers now, as (len(block.rows), ...) tensors in block
    order, each its own memory."""
    return snapshot_metrics(block, [snapshot(trackers, block)], r, tol)


class Deferred:
    """One step's metrics of a block as the run log buffers them (:meth:`lowrank.RunLog.
    record_blocks`): the state copied at the step, the metrics computed when the log flushes,
    for all buffered steps of a block in one batch (:meth:`resolve`). ``extra``: per-row values
    computed at the step (an audit's error, the gradient's metrics), added after the metrics."""

    def __init__(self, trackers, block: Block, r: int, tol: float, extra: dict):
        self.block, self.r, self.tol, self.extra = block, r, tol, extra
        self.state = snapshot(trackers, block)
        self.count = len(block.rows)

    @property
    def group(self) -> tuple:
        """Items with equal groups are resolved in one batch: the same block (kept alive by
        each item), rank and tolerance."""
        return (id(self.block), self.r, self.tol)

    @staticmethod
    def resolve(items: list[Deferred]) -> list[dict]:
        """The metrics of ``items`` (one group), one dict of (count, ...) values per item."""
        first = items[0]
        out = snapshot_metrics(first.block, [it.state for it in items], first.r, first.tol)
        count = first.count
        return [{**{key: value[i * count:(i + 1) * count] for key, value in out.items()},
                 **it.extra} for i, it in enumerate(items)]


__all__ = ["Block", "Deferred", "block_metrics", "history", "plan", "snapshot",
           "snapshot_metrics"]

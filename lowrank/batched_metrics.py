"""The metrics of many tracked matrices as a few batches, for the run log.

:meth:`MatrixTracker.metrics` runs some sixty small tensor ops per matrix; logged every step
for a network's twenty matrices, that was two to three times the whole step on a CPU (and as
many launches on a GPU). The metrics of :mod:`lowrank.metrics` are batched over a leading
dimension already, and take per-row shapes, so the trackers of one sketch width, device and
history form a :class:`Block`, summarised as one batch. The log goes further
(:class:`Deferred`): each step it keeps what a block's metrics need (copies of the estimates,
and the two metrics that read the larger state), and when it flushes it computes the metrics
of every buffered step of the block in one batch.

Every op is elementwise or reduces within a row, so a row's values are those of the tracker's
own :meth:`~lowrank.tracking.MatrixTracker.metrics`, bit for bit on the CPU (tested). On a GPU
the last bit may differ: reductions may take another order for another batch size, and CUDA
divides by a Python number as a multiplication by its inverse, by a tensor (the per-row tail
counts here) as a division.
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


def snapshot(trackers, block: Block, r: int) -> dict:
    """What ``block``'s metrics need of this step, in block order, each its own memory (the
    state of static trackers changes in place): copies of the estimates and of ||W||_F^2, and the
    two metrics that read larger state (the overlap, k x k, and the row norms, m per matrix)
    computed now, so a buffered step stays small."""
    trs = [trackers[i] for i in block.rows]
    keys = ("sigma", "sigma_y", "sigma_z", "fro2", "nonfinite")
    keys += ("sigma_prev",) if block.history else ()
    out = {key: torch.cat([getattr(tr, key) for tr in trs]) for key in keys}
    if block.history:  # r capped at k, as metrics.summarize caps it
        overlap = torch.cat([tr.overlap_u for tr in trs])
        out["subspace_drift"] = metrics.subspace_drift(overlap, min(r, overlap.shape[-1]))
    else:
        out["subspace_drift"] = torch.ones_like(out["fro2"])
    near_zero, start = [], 0
    for run in block.m_runs:  # row norms: one stack per run of equal m
        near_zero.append(metrics.near_zero_rows(
            torch.cat([tr.row_sq for tr in trs[start:start + run]])))
        start += run
    out["near_zero_rows"] = near_zero[0] if len(near_zero) == 1 else torch.cat(near_zero)
    return out


def snapshot_metrics(block: Block, snaps: list[dict], r: int, tol: float) -> dict:
    """The metrics of ``block``'s trackers at the steps of ``snaps`` (:func:`snapshot`), in one
    batch: (len(snaps) * len(block.rows), ...) tensors, step by step, block order within a step.
    Each row is what :meth:`MatrixTracker.metrics` gave at that step, with r capped at the
    block's sketch width k (a matrix with fewer than r singular values reports its k)."""
    def cat(key):
        return snaps[0][key] if len(snaps) == 1 else torch.cat([s[key] for s in snaps])

    shape = tuple(d.repeat(len(snaps)) for d in block.shape)
    prev = cat("sigma_prev") if block.history else None
    out = metrics.summarize(cat("sigma"), cat("sigma_y"), cat("sigma_z"), prev, cat("fro2"),
                            None, None, shape, r, tol)
    for key in ("subspace_drift", "near_zero_rows", "nonfinite"):
        out[key] = cat(key)
    return out


def block_metrics(trackers, block: Block, r: int, tol: float) -> dict[str, torch.Tensor]:
    """The metrics of ``block``'s trackers now, as (len(block.rows), ...) tensors in block
    order, each its own memory."""
    return snapshot_metrics(block, [snapshot(trackers, block, r)], r, tol)


class Deferred:
    """One step's metrics of a block as the run log buffers them (:meth:`lowrank.RunLog.
    record_blocks`): the state copied at the step, the metrics computed when the log flushes,
    for all buffered steps of a block in one batch (:meth:`resolve`). ``extra``: per-row values
    computed at the step (an audit's error, the gradient's metrics), added after the metrics."""

    def __init__(self, trackers, block: Block, r: int, tol: float, extra: dict):
        self.block, self.r, self.tol, self.extra = block, r, tol, extra
        self.state = snapshot(trackers, block, r)
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

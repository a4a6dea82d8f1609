"""The metrics of many tracked matrices as a few batches, for the run log.

:meth:`MatrixTracker.metrics` runs some sixty small tensor ops per matrix; logged every step
for a network's twenty matrices, that was two to three times the whole step on a CPU (and as
many launches on a GPU). The metrics of :mod:`lowrank.metrics` are batched over a leading
dimension already, and take per-row shapes, so here the trackers of one sketch width, device
and history are stacked and summarised once: a :class:`Block` per such group.

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


def block_metrics(trackers, block: Block, r: int, tol: float) -> dict[str, torch.Tensor]:
    """The metrics of ``block``'s trackers as (len(block.rows), ...) tensors, rows in block
    order: those of :meth:`MatrixTracker.metrics` (whose checks of r each tracker has passed
    when it was made), each tensor its own memory."""
    trs = [trackers[i] for i in block.rows]

    def stack(key):
        return torch.cat([getattr(tr, key) for tr in trs])

    sigma, fro2 = stack("sigma"), stack("fro2")
    prev, overlap = (stack("sigma_prev"), stack("overlap_u")) if block.history else (None, None)
    out = metrics.summarize(sigma, stack("sigma_y"), stack("sigma_z"), prev, fro2, None, overlap,
                            block.shape, r, tol)
    if "subspace_drift" not in out:
        out["subspace_drift"] = torch.ones_like(fro2)
    near_zero, start = [], 0
    for run in block.m_runs:
        near_zero.append(metrics.near_zero_rows(
            torch.cat([tr.row_sq for tr in trs[start:start + run]])))
        start += run
    out["near_zero_rows"] = near_zero[0] if len(near_zero) == 1 else torch.cat(near_zero)
    out["nonfinite"] = stack("nonfinite")
    return out


__all__ = ["Block", "block_metrics", "history", "plan"]

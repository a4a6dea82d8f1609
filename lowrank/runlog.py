"""Run logs: per-step, per-matrix metrics in Parquet, written without a host sync every step.

A run directory holds

    config.json               the run's configuration: the user's keys, plus "optimizer"
                              (SpectralSGD's arguments) or "tracker" (SpectrumTracker's) and
                              "tracked" (name -> [m, n] of every tracked matrix)
    spectra/part-00000.parquet, part-00001.parquet, ...   one file per flush

Metrics stay on the device in a buffer (SpectralSGD and SpectrumTracker buffer a copy of the
tracker state they are computed from, and the flush computes them for all buffered steps in one
batch); every ``flush_every`` records (and at :meth:`close`) they are copied to the host in one
go and written as a new part file, atomically (temporary file, then rename). A crash loses at most the unflushed buffer; every written part stays
readable. ``pandas.read_parquet(run_dir / "spectra")`` or :func:`load_log` reads them all.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

LOG_SUBDIR = "spectra"


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return repr(value)


def _part_numbers(run_dir: Path) -> list[int]:
    """The numbers of the part files already in ``run_dir``."""
    return [int(p.stem.split("-")[1]) for p in (run_dir / LOG_SUBDIR).glob("part-*.parquet")
            if p.stem.split("-")[1].isdigit()]


class _PartWriter:
    """The buffer and the files of a RunLog. Separate from RunLog so that the finalizer that
    flushes a log dropped without close() can hold it (a finalizer must not hold the log)."""

    def __init__(self, run_dir: Path, flush_every: int, tensorboard: bool, first_part: int):
        self.run_dir = run_dir
        self.flush_every = flush_every
        # Blocks (step, names, shapes, metrics): each metric holds one value per name, the
        # rows (dim 0) of a tensor or the items of a list; or metrics still to be computed
        # (see RunLog.record_blocks), resolved at the flush.
        self.buffer: list[tuple[int, tuple, tuple, dict]] = []
        self.steps_buffered = 0
        self.part = first_part  # after the existing parts: a resumed run overwrites none
        self.closed = False
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def flush(self) -> None:
        if not self.buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, list] = {"step": [], "name": [], "shape": [], "m": [], "n": []}
        resolved = _resolve([metrics for _, _, _, metrics in self.buffer])
        keys = []
        for metrics in resolved:
            for key in metrics:
                if key not in keys:
                    keys.append(key)
        for step, names, shapes, _ in self.buffer:
            for name, shape in zip(names, shapes):
                columns["step"].append(step)
                columns["name"].append(name)
                columns["shape"].append(f"{shape[0]}x{shape[1]}")
                columns["m"].append(shape[0])
                columns["n"].append(shape[1])
        columns.update(_to_host([(metrics, len(names)) for (_, names, _, _), metrics
                                 in zip(self.buffer, resolved)], keys))
        table = pa.table(columns)
        final = self.run_dir / LOG_SUBDIR / f"part-{self.part:05d}.parquet"
        tmp = final.with_name("." + final.name + ".tmp")  # dot-files are ignored by readers
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        if self.tb is not None:
            _write_tensorboard(self.tb, columns)
        self.part += 1
        self.buffer = []
        self.steps_buffered = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            if self.tb is not None:
                self.tb.close()


class RunLog:
    """Buffered Parquet log of tracked spectra; see the module docstring.

    Args:
        run_dir: the run directory (created).
        config: a JSON-able dict saved to config.json (more keys can be added later).
        flush_every: number of tracked steps buffered before a write.
        tensorboard: also write scalars (spectral norm = top sigma, stable rank, numerical rank,
            effective rank) through ``torch.utils.tensorboard`` into run_dir/tb.

        resume: append to the log already in run_dir (a run continued from a checkpoint:
            steps it runs again replace the earlier rows in :func:`load_log`). Without it, a
            run_dir that holds a log raises FileExistsError: a new run's rows would mix with
            the old run's under the same step numbers.

    Use it as a context manager or call :meth:`close`; a log dropped or left open at interpreter
    exit is flushed too (but a killed process loses its unflushed buffer).
    """

    def __init__(self, run_dir, config: dict | None = None, *, flush_every: int = 50,
                 tensorboard: bool = False, resume: bool = False):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        existing = _part_numbers(Path(run_dir))
        if existing and not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run log ({len(existing)} part files); pass "
                "resume=True to append to it (a run continued from a checkpoint), or choose "
                "another folder")
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("RunLog needs pyarrow: pip install 'lowrank-spectra[log]'") from exc
        self.run_dir = Path(run_dir)
        (self.run_dir / LOG_SUBDIR).mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.config: dict = {}
        self._writer = _PartWriter(self.run_dir, flush_every, tensorboard,
                                   max(existing) + 1 if existing else 0)
        self.update_config(config or {})
        # Flush what is buffered when the log is garbage-collected or the interpreter exits
        # without close() (the callback holds the writer, not the log).
        self._finalizer = weakref.finalize(self, self._writer.close)

    def update_config(self, config: dict) -> None:
        """Merge ``config`` into config.json (rewritten atomically)."""
        self.config.update(config)
        tmp = self.run_dir / ".config.json.tmp"
        tmp.write_text(json.dumps(self.config, indent=2, default=_json_default))
        os.replace(tmp, self.run_dir / "config.json")

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def record(self, step: int, metrics_by_name: dict[str, dict], shapes: dict[str, tuple]) -> None:
        """Buffer one step's metrics (device tensors of shape (1, ...) or numbers); no sync."""
        blocks = []
        for name, metrics in metrics_by_name.items():
            rows = {}
            for key, value in metrics.items():
                if not isinstance(value, torch.Tensor):
                    rows[key] = [value]
                elif value.dim() and value.shape[0] == 1:
                    rows[key] = value
                else:  # a 0-d value, or one whose leading size is not 1: one row holds it all
                    rows[key] = value.unsqueeze(0)
            blocks.append(((name,), (tuple(shapes[name]),), rows))
        self.record_blocks(step, blocks)

    def record_blocks(self, step: int, blocks) -> None:
        """Buffer one step's metrics of several matrices at once; no sync. ``blocks``: a list of
        (names, shapes, metrics), where each metric holds one value per name in order: a device
        tensor whose rows (dim 0) are the values, or a list.

        ``metrics`` may also be an object that computes them when the log flushes: with
        ``count`` (the number of names), ``group`` (hashable) and ``resolve(items)``, which
        takes the buffered objects of one group and returns their metrics dicts in order.
        ``SpectralSGD`` and ``SpectrumTracker`` log that way
        (:class:`lowrank.batched_metrics.Deferred`): a copy of the state per step, the metrics
        of all buffered steps in one batch."""
        w = self._writer
        if w.closed:
            raise RuntimeError("RunLog is closed")
        checked = []  # every block is checked before any is buffered: a step whole or not at all
        for names, shapes, metrics in blocks:
            names, shapes = tuple(names), tuple(tuple(s) for s in shapes)
            if len(shapes) != len(names):
                raise ValueError(f"{len(shapes)} shapes for {len(names)} matrices")
            if not isinstance(metrics, dict):
                if metrics.count != len(names):
                    raise ValueError(f"deferred metrics of {metrics.count} matrices for "
                                     f"{len(names)} names")
            else:
                for key, value in metrics.items():
                    if isinstance(value, torch.Tensor):
                        count = value.shape[0] if value.dim() else None
                    else:
                        count = len(value)
                    if count != len(names):
                        raise ValueError(f"metric {key!r} holds {count} values for "
                                         f"{len(names)} matrices")
            if names:  # a block of no matrices adds no rows
                checked.append((int(step), names, shapes, metrics))
        w.buffer += checked
        w.steps_buffered += 1
        if w.steps_buffered >= self.flush_every:
            w.flush()

    def flush(self) -> None:
        """Copy the buffer to the host (one sync) and write it as a new part file."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close. Safe to call twice."""
        self._finalizer()  # runs the writer's close once, then detaches

    def __deepcopy__(self, memo):
        # A log is a sink (files on disk): a deep copy of an optimizer or tracker shares it.
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve(buffered: list) -> list[dict]:
    """The buffered metrics as dicts: deferred ones computed, one ``resolve`` call per group."""
    out = list(buffered)
    groups: dict[tuple, list[int]] = {}
    for i, metrics in enumerate(out):
        if not isinstance(metrics, dict):
            groups.setdefault((type(metrics), metrics.group), []).append(i)
    for idx in groups.values():
        items = [out[i] for i in idx]
        found = type(items[0]).resolve(items)
        if len(found) != len(items):
            raise RuntimeError(f"resolve gave {len(found)} metrics for {len(items)} blocks")
        for i, metrics in zip(idx, found):
            out[i] = metrics
    return out


def _to_host(blocks: list[tuple[dict, int]], keys: list[str]) -> dict[str, list]:
    """Each key's values for every row of ``blocks`` [(metrics, rows)], in row order (None where a
    block lacks the key), as Python values: the device tensors with one transfer per key."""
    total = sum(count for _, count in blocks)
    out = {}
    for key in keys:
        column = [None] * total
        tensors, starts, start = [], [], 0
        for metrics, count in blocks:
            value = metrics.get(key)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                starts.append(start)
            elif value is not None:
                column[start:start + count] = list(value)
            start += count
        if tensors:
            if len({t.device for t in tensors}) > 1:  # a model spread over devices
                tensors = [t.cpu() for t in tensors]
            if len({tuple(t.shape[1:]) for t in tensors}) == 1:
                values = torch.cat(tensors).cpu().tolist()
            else:
                # Ragged (e.g. sigma of matrices tracked with different ranks): one flat copy,
                # split back on the host into each row's list.
                flat = torch.cat([t.reshape(-1) for t in tensors]).cpu().tolist()
                values, at = [], 0
                for t in tensors:
                    size = t[0].numel()
                    for _ in range(t.shape[0]):
                        values.append(flat[at:at + size] if t.dim() > 1 else flat[at])
                        at += size
            at = 0
            for t, begin in zip(tensors, starts):
                column[begin:begin + t.shape[0]] = values[at:at + t.shape[0]]
                at += t.shape[0]
        out[key] = column
    return out


def _write_tensorboard(tb, columns: dict) -> None:
    for i, step in enumerate(columns["step"]):
        name = columns["name"][i]
        for key in ("spectral_norm", "stable_rank", "numerical_rank", "effective_rank"):
            if key in columns and columns[key][i] is not None:
                tb.add_scalar(f"{name}/{key}", float(columns[key][i]), step)
    tb.flush()


def load_log(run_dir):
    """The run's log as a pandas DataFrame sorted by (step, name); ``sigma`` is a list column.
    A step logged more than once (a run resumed from a checkpoint older than its last logged
    step runs those steps again) keeps the rows of the latest part file."""
    import pandas as pd

    parts = sorted((Path(run_dir) / LOG_SUBDIR).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no log parts under {Path(run_dir) / LOG_SUBDIR}")
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.drop_duplicates(["step", "name"], keep="last")  # parts are in write order
    return df.sort_values(["step", "name"], kind="stable").reset_index(drop=True)


def load_config(run_dir) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())

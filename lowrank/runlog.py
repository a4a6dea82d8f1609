"""Run logs: per-step, per-matrix metrics in Parquet, written without a host sync every step.

A run directory holds

    config.json               the run's configuration (optimizer / tracker arguments, user config)
    spectra/part-00000.parquet, part-00001.parquet, ...   one file per flush

Metrics stay on the device in a buffer; every ``flush_every`` records (and at :meth:`close`)
they are copied to the host in one go and written as a new part file, atomically (temporary
file, then rename). A crash loses at most the unflushed buffer; every written part stays
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


class RunLog:
    """Buffered Parquet log of tracked spectra; see the module docstring.

    Args:
        run_dir: the run directory (created).
        config: a JSON-able dict saved to config.json (more keys can be added later).
        flush_every: number of tracked steps buffered before a write.
        tensorboard: also write scalars (spectral norm, stable rank, numerical rank, top sigma)
            through ``torch.utils.tensorboard`` into run_dir/tb.
    """

    def __init__(self, run_dir, config: dict | None = None, *, flush_every: int = 50,
                 tensorboard: bool = False):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("RunLog needs pyarrow: pip install 'lowrank-spectra[log]'") from exc
        self.run_dir = Path(run_dir)
        (self.run_dir / LOG_SUBDIR).mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.config: dict = {}
        self._buffer: list[tuple[int, str, tuple, dict]] = []
        self._steps_buffered = 0
        self._part = len(list((self.run_dir / LOG_SUBDIR).glob("part-*.parquet")))
        self._closed = False
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        self.update_config(config or {})
        # Flush what is buffered if the interpreter exits without close() (finalize runs at exit).
        self._finalizer = weakref.finalize(self, RunLog._flush_at_exit, weakref.ref(self))

    @staticmethod
    def _flush_at_exit(ref):
        log = ref()
        if log is not None and not log._closed:
            log.close()

    def update_config(self, config: dict) -> None:
        """Merge ``config`` into config.json (rewritten atomically)."""
        self.config.update(config)
        tmp = self.run_dir / ".config.json.tmp"
        tmp.write_text(json.dumps(self.config, indent=2, default=_json_default))
        os.replace(tmp, self.run_dir / "config.json")

    def record(self, step: int, metrics_by_name: dict[str, dict], shapes: dict[str, tuple]) -> None:
        """Buffer one step's metrics (device tensors of shape (1, ...) or numbers); no sync."""
        if self._closed:
            raise RuntimeError("RunLog is closed")
        for name, metrics in metrics_by_name.items():
            self._buffer.append((int(step), name, tuple(shapes[name]), metrics))
        self._steps_buffered += 1
        if self._steps_buffered >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Copy the buffer to the host (one sync) and write it as a new part file."""
        if not self._buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, list] = {"step": [], "name": [], "shape": [], "m": [], "n": []}
        keys = []
        for _, _, _, metrics in self._buffer:
            for key in metrics:
                if key not in keys:
                    keys.append(key)
        host = self._to_host([metrics for _, _, _, metrics in self._buffer], keys)
        for (step, name, shape, _), values in zip(self._buffer, host):
            columns["step"].append(step)
            columns["name"].append(name)
            columns["shape"].append(f"{shape[0]}x{shape[1]}")
            columns["m"].append(shape[0])
            columns["n"].append(shape[1])
            for key in keys:
                columns.setdefault(key, []).append(values.get(key))
        table = pa.table(columns)
        final = self.run_dir / LOG_SUBDIR / f"part-{self._part:05d}.parquet"
        tmp = final.with_name("." + final.name + ".tmp")  # dot-files are ignored by readers
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        if self._tb is not None:
            self._write_tensorboard(columns)
        self._part += 1
        self._buffer = []
        self._steps_buffered = 0

    @staticmethod
    def _to_host(rows: list[dict], keys: list[str]) -> list[dict]:
        """All buffered device tensors to Python values with one transfer per metric."""
        out = [dict() for _ in rows]
        for key in keys:
            idx = [i for i, r in enumerate(rows) if key in r]
            tensors = [rows[i][key] for i in idx]
            if all(isinstance(t, torch.Tensor) for t in tensors):
                flat = torch.stack([t.reshape(t.shape[1:]) if t.dim() and t.shape[0] == 1 else t
                                    for t in tensors]).cpu()
                values = flat.tolist()
            else:
                values = [t.item() if isinstance(t, torch.Tensor) else t for t in tensors]
            for i, v in zip(idx, values):
                out[i][key] = v
        return out

    def _write_tensorboard(self, columns: dict) -> None:
        for i, step in enumerate(columns["step"]):
            name = columns["name"][i]
            for key in ("spectral_norm", "stable_rank", "numerical_rank", "effective_rank"):
                if key in columns and columns[key][i] is not None:
                    self._tb.add_scalar(f"{name}/{key}", float(columns[key][i]), step)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
        self._closed = True
        self._finalizer.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_log(run_dir):
    """The run's log as a pandas DataFrame sorted by (step, name); ``sigma`` is a list column."""
    import pandas as pd

    parts = sorted((Path(run_dir) / LOG_SUBDIR).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no log parts under {Path(run_dir) / LOG_SUBDIR}")
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return df.sort_values(["step", "name"], kind="stable").reset_index(drop=True)


def load_config(run_dir) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())

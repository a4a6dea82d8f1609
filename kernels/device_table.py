"""Small int64 tables on the device that kernels read addresses and sizes from (one launch for
several separate tensors of one shape), uploaded once per distinct content: shared by the CuPy
and Triton launchers. Nothing here touches a GPU at import time."""

from __future__ import annotations

import torch

_TABLES: dict = {}  # (device, values) -> (device table, its pinned source); never written again
_TABLES_MAX = 64
# Tables a CUDA graph capture used: a replay reads the table (and, for one uploaded inside the
# capture, copies it again from its pinned source), so they must outlive an eviction from _TABLES.
_CAPTURED: dict = {}


def device_table(values: tuple, device: torch.device) -> torch.Tensor:
    """The int64 device tensor of ``values`` (addresses and sizes that a kernel reads from a
    table), kept for the next call with the same values: parameters, buffers, (with static
    gradients) gradients, and the sketches the caching allocator hands out again each step keep
    their addresses, so a training loop uploads each table once. On CUDA the upload goes
    through pinned memory without a host sync.
    Inside a CUDA graph capture a new table is not cached for eager steps (its upload runs only
    when the graph is replayed)."""
    key = (device, values)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = _TABLES.pop(key, None)
    if entry is not None:
        _TABLES[key] = entry  # the most recently used last: eviction takes the oldest use
    else:
        host = torch.tensor(values, dtype=torch.int64)
        if device.type == "cuda":
            # The pinned block is not reused before the copy has run (the caching host
            # allocator records the copy's stream), so the upload needs no sync.
            host = host.pin_memory()
            table = host.to(device, non_blocking=True)
        else:
            table = host  # the CPU emulation of the tests
        entry = (table, host)
        if not capturing:
            if len(_TABLES) >= _TABLES_MAX:
                _TABLES.pop(next(iter(_TABLES)))  # the least recently used
            _TABLES[key] = entry
    if capturing:
        _CAPTURED[key] = entry  # the graph keeps reading this memory at every replay
    return entry[0]

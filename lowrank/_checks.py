"""Input validation shared by the public entry points: clear errors, raised early."""

from __future__ import annotations

import operator

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_matrix(A, name: str = "A", *, finite: bool = True) -> None:
    """Raise TypeError/ValueError unless ``A`` is a floating tensor with >= 2 dims."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {A.dtype}; expected one of float32, float64, bfloat16, float16"
        )
    if A.layout != torch.strided:
        raise TypeError(f"{name} is a {A.layout} tensor; pass a dense one (e.g. {name}.to_dense())")
    if A.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no values)")
    if A.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (got shape {tuple(A.shape)})")
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)})")
    if finite and not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")


def check_int(value, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int after checking it is an integer (not a bool) >= ``minimum``.

    Integer-like values (numpy integers, 0-d integer tensors) are accepted through
    ``operator.index``; floats are rejected rather than silently truncated.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_rank(k, m: int, n: int, name: str = "k") -> int:
    """Return ``k`` as an int after checking 1 <= k <= min(m, n)."""
    k = check_int(k, name, minimum=1)
    if k > min(m, n):
        raise ValueError(f"{name}={k} exceeds min(m, n) = {min(m, n)} of a {m} x {n} matrix")
    return k


def sketch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the sketch products: float64 for float64 weights, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def host_reads_are_free(t: torch.Tensor) -> bool:
    """True for CPU tensors, where reading a value on the host to choose a code path costs no
    device synchronisation. Per-step code may take such shortcuts only where this is True; on a
    GPU it must take the branch-free path (the no-sync tests force that path on the CPU by
    patching this function)."""
    return t.device.type == "cpu"

"""Spectral metrics: pure functions of a tracked state, batched over matrices, no host sync.

Inputs (all float64, leading batch dimension b):
    sigma   (b, k)  estimated top-k singular values, descending (lower bounds of the true ones)
    fro2    (b,)    exact squared Frobenius norm
    shape   (m, n)  matrix shape, for the number of singular values N = min(m, n): ints, or
                    (b,) tensors on sigma's device for a batch of matrices of several shapes

Each docstring says what is exact and what is estimated. "Exact" means computed from W itself
(up to floating-point rounding); "estimated" means derived from the sketch estimates, which are
lower bounds that converge to the truth as the tracker iterates (see ``convergence``).
"""

from __future__ import annotations

import torch

_TINY = 1e-300


def _tail_count(shape, k: int):
    """min(m, n) - k, the number of singular values beyond the k tracked: a float for one shape,
    a float64 (b,) tensor where ``shape`` holds tensors (a batch of shapes)."""
    m, n = shape
    if isinstance(m, torch.Tensor) or isinstance(n, torch.Tensor):
        return torch.minimum(torch.as_tensor(m), torch.as_tensor(n)).to(torch.float64) - k
    return float(min(m, n) - k)


def top_r(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r singular values (b, r). Estimated: each a lower bound of the true sigma_i."""
    return sigma[..., :r]


def spectral_norm(sigma: torch.Tensor) -> torch.Tensor:
    """||W||_2 = sigma_1 (b,). Estimated, lower bound."""
    return sigma[..., 0]


def fro_norm(fro2: torch.Tensor) -> torch.Tensor:
    """||W||_F (b,). Exact."""
    return fro2.sqrt()


def stable_rank(sigma: torch.Tensor, fro2: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / sigma_1^2 (b,). Numerator exact, sigma_1 estimated: an upper bound of the truth.

    0 for a zero matrix.
    """
    s1 = sigma[..., 0].square()
    return torch.where(s1 > _TINY, fro2 / s1.clamp_min(_TINY), torch.zeros_like(fro2))


def energy_fraction(sigma: torch.Tensor, fro2: torch.Tensor, r: int) -> torch.Tensor:
    """sum_{i<=r} sigma_i^2 / ||W||_F^2 (b,), in [0, 1]. Estimated, lower bound. 0 for W = 0."""
    head = sigma[..., :r].square().sum(-1)
    return torch.where(fro2 > _TINY, (head / fro2.clamp_min(_TINY)).clamp(0.0, 1.0),
                       torch.zeros_like(fro2))


def tail_energy(sigma: torch.Tensor, fro2: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 - sum_{i<=k} sigma_i^2 (b,), >= 0: energy beyond the tracked k. Estimated
    (upper bound, since the sigma are lower bounds), exact once they have converged."""
    return (fro2 - sigma.square().sum(-1)).clamp_min(0.0)


def numerical_rank(sigma: torch.Tensor, fro2: torch.Tensor, shape, tol: float = 1e-3):
    """Number of singular values above ``tol * sigma_1`` (the rank of W/||W|| at tolerance tol).

    Returns (rank, upper, censored), each (b,):
      rank      count among the k tracked estimates (estimated);
      upper     an upper bound: rank plus the most singular values above the threshold that the
                exact tail energy leaves room for, floor(tail / (tol sigma_1)^2), capped at
                min(m, n) - k; equals rank when the tracked k already reaches below tol;
      censored  True where the true rank may exceed what k can see (upper > rank).
    The count assumes converged estimates (see ``convergence``).
    """
    k = sigma.shape[-1]
    thresh = tol * sigma[..., :1]
    above = sigma > thresh
    rank = above.sum(-1)
    room = torch.floor(tail_energy(sigma, fro2) / thresh[..., 0].square().clamp_min(_TINY))
    room = room.clamp(max=_tail_count(shape, k))
    # Only a full window (all k above the threshold) can hide more ranks beyond k.
    full = rank == k
    upper = torch.where(full, rank + room.to(rank.dtype), rank)
    zero = sigma[..., 0] <= _TINY
    rank = torch.where(zero, torch.zeros_like(rank), rank)
    upper = torch.where(zero, torch.zeros_like(upper), upper)
    return rank, upper, upper > rank


def _entropy_rank(p_head: torch.Tensor, tail_values: torch.Tensor, tail_count: torch.Tensor):
    """exp(entropy) of the distribution sigma / sum(sigma) for a head plus `count` equal tail values.

    0 for an all-zero spectrum (a zero matrix), matching its numerical and stable rank.
    """
    raw_total = p_head.sum(-1) + tail_values * tail_count
    total = raw_total.clamp_min(_TINY)
    ph = p_head / total.unsqueeze(-1)
    pt = tail_values / total
    h_head = -(torch.where(ph > 0, ph * torch.log(ph.clamp_min(_TINY)), torch.zeros_like(ph))).sum(-1)
    h_tail = torch.where(pt > 0, -tail_count * pt * torch.log(pt.clamp_min(_TINY)), torch.zeros_like(pt))
    return torch.where(raw_total > 0, torch.exp(h_head + h_tail), torch.zeros_like(raw_total))


def effective_rank(sigma: torch.Tensor, fro2: torch.Tensor, shape):
    """Entropy effective rank exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli 2007).

    Returns (estimate, lower, upper), each (b,). The head (tracked k values) is estimated; the
    tail beyond k is unknown except its exact energy T = ||W||_F^2 - sum sigma_i^2 and that each
    tail value is <= sigma_k. The bounds complete the spectrum with the two extreme tails of that
    energy: all of it in as few values equal to sigma_k as possible (lower) and spread evenly over
    all min(m, n) - k remaining values (upper). ``estimate`` is the midpoint in log scale.
    When k = min(m, n) there is no tail and all three are equal (up to the sigma estimates).
    All three are 0 for a zero matrix.
    """
    rest = _tail_count(shape, sigma.shape[-1])
    T = tail_energy(sigma, fro2)
    batch = isinstance(rest, torch.Tensor)  # several shapes: some rows may have no tail
    if batch or rest <= 0:
        no_tail = _entropy_rank(sigma, torch.zeros_like(T), torch.zeros_like(T))
        if not batch:
            return no_tail, no_tail, no_tail
    # Why these are the extremes: with the head fixed, H is optimised over tails t >= 0 with
    # sum t^2 = T and t <= sigma_k. At a stationary point every tail value strictly inside
    # (0, sigma_k) solves log t + c t = const, so it takes at most two distinct values; and
    # dH/dt -> +inf at t = 0, so the maximum has no zero tail value. Spreading evenly (the most
    # uniform tail, with the largest L1 mass) is the maximum; packing the energy into as few
    # values as the cap allows (c copies of sigma_k and one remainder) is the minimum.
    # tests/test_metrics.py checks both against random spectra and every two-level tail on a grid.
    sk = sigma[..., -1]
    sk2 = sk.square()
    # sigma_k = 0 (rank < k) or so small that its square underflows: the cap forces an empty tail
    # (T is then rounding), so the concentrated tail is empty. Dividing by a clamped sk^2 here
    # used to give 0/0 = NaN, which _entropy_rank's masks then turned into a bogus lower bound of
    # 1 (and a wrong estimate) for every exact low-rank matrix with rank < k.
    live = sk2 > _TINY
    c = torch.where(live, torch.floor(T / sk2.clamp_min(_TINY)), torch.zeros_like(T))
    c = c.clamp(max=rest)
    rem = (T - c * sk2).clamp_min(0.0).sqrt()
    rem = torch.where(live & (c < rest), rem, torch.zeros_like(rem))
    head_plus = torch.cat([sigma, rem.unsqueeze(-1)], dim=-1)
    lower = _entropy_rank(head_plus, sk, c)
    # Spread tail: every remaining value equal.
    spread_val = (T / rest).sqrt()
    upper = _entropy_rank(sigma, spread_val,
                          rest.expand_as(T) if batch else torch.full_like(T, rest))
    lo, hi = torch.minimum(lower, upper), torch.maximum(lower, upper)
    est = (lo * hi).sqrt()
    if batch:  # the rows without a tail take no_tail (their tail terms divided by rest = 0)
        tail = rest > 0
        est, lo, hi = (torch.where(tail, x, no_tail) for x in (est, lo, hi))
    return est, lo, hi


def subspace_drift(overlap: torch.Tensor, r: int) -> torch.Tensor:
    """Root-mean-square sine of the principal angles between the old and new top-r bases (b,).

    ``overlap`` is U_old^T U_new (b, k, k); ||overlap[:r, :r]||_F^2 = sum cos^2 of the angles,
    so no SVD (and no host sync) is needed. 0: same subspace; 1: orthogonal. Exact for the bases.
    """
    k = overlap.shape[-1]
    if not 1 <= r <= k:
        raise ValueError(f"subspace_drift needs 1 <= r <= k = {k}, got r={r}")
    o = overlap[..., :r, :r]
    cos2 = o.square().sum((-2, -1)) / r
    return (1.0 - cos2).clamp_min(0.0).sqrt()


def convergence(sigma_y: torch.Tensor, sigma_z: torch.Tensor, sigma_prev: torch.Tensor | None,
                r: int) -> torch.Tensor:
    """Convergence indicator (b,): the largest relative disagreement among the top-r estimates.

    max_i |sigma_y,i - sigma_z,i| / sigma_1, and the step-to-step change max_i |sigma_i -
    sigma_prev,i| / sigma_1 when ``sigma_prev`` is given. sigma_y and sigma_z are the estimates
    of the two sketches Y = W V and Z = W^T U (two interleaved chains under the "both" schedule,
    two consecutive half steps of one chain under "sequential", the latest of each side under
    "alternate", where they come from consecutive steps' weights); they agree with the truth
    only when converged, so a value below ~1e-3 says the top-r estimates are good to about that
    relative accuracy (a heuristic, not a bound). Returns 1.0 where sigma_1 is zero.
    """
    s1 = torch.maximum(sigma_y[..., 0], sigma_z[..., 0])
    gap = (sigma_y[..., :r] - sigma_z[..., :r]).abs().amax(-1)
    if sigma_prev is not None:
        sig = torch.maximum(sigma_y, sigma_z)[..., :r]
        gap = torch.maximum(gap, (sig - sigma_prev[..., :r]).abs().amax(-1))
    return torch.where(s1 > _TINY, gap / s1.clamp_min(_TINY), torch.ones_like(s1))


def near_zero_rows(row_sq: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Count of rows whose norm is below tol * the largest row norm (vanishing neurons) (b,). Exact."""
    rn = row_sq.clamp_min(0.0).sqrt()
    top = rn.amax(-1, keepdim=True)
    return (rn <= tol * top).sum(-1)


def summarize(sigma, sigma_y, sigma_z, sigma_prev, fro2, row_sq, overlap_u, shape, r: int,
              tol: float = 1e-3) -> dict[str, torch.Tensor]:
    """All metrics of a batch of tracked matrices as a dict of (b, ...) tensors, no host sync.
    ``r`` is capped at the sketch width k: a matrix with fewer than r singular values (its
    sketch spans all min(m, n) of them) reports the k it has."""
    r = min(r, sigma.shape[-1])
    rank, rank_upper, censored = numerical_rank(sigma, fro2, shape, tol)
    erank, erank_lo, erank_hi = effective_rank(sigma, fro2, shape)
    out = {
        "sigma": top_r(sigma, r),
        "spectral_norm": spectral_norm(sigma),
        "fro_norm": fro_norm(fro2),
        "stable_rank": stable_rank(sigma, fro2),
        "energy_fraction": energy_fraction(sigma, fro2, r),
        "numerical_rank": rank,
        "numerical_rank_upper": rank_upper,
        "rank_censored": censored,
        "effective_rank": erank,
        "effective_rank_lower": erank_lo,
        "effective_rank_upper": erank_hi,
        "convergence": convergence(sigma_y, sigma_z, sigma_prev, r),
    }
    if overlap_u is not None:
        out["subspace_drift"] = subspace_drift(overlap_u, r)
    if row_sq is not None:
        out["near_zero_rows"] = near_zero_rows(row_sq)
    return out


__all__ = [
    "top_r", "spectral_norm", "fro_norm", "stable_rank", "energy_fraction", "tail_energy",
    "numerical_rank", "effective_rank", "subspace_drift", "convergence", "near_zero_rows",
    "summarize",
]

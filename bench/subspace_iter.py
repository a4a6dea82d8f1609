"""The strongest simple baseline: warm-started subspace iteration in plain torch.

What a careful user would write without this project: keep a thin basis per matrix, and after
each optimizer step advance a block power iteration on the current weights by one step:

    Y = W Z_prev          (m x k)   one pass over W
    U = qr(Y).Q           (m x k)   orthonormal basis of the dominant column space
    Z = W^T U             (n x k)   second pass over W; Z^T = U^T W, the randomised-SVD projection
    sigma = svdvals(Z)    (k)       Rayleigh-Ritz estimates, each a lower bound of the true value

so one matmul pair and one QR per step, with Z kept unnormalised as the next start
(W Z = W W^T U is the power step). The singular values of Z come from its k x k Gram matrix in
float64. The QR and the small eigenproblem are batched over matrices of the same shape; the
matmuls write into slices of preallocated batches, so no weight is copied (except a bfloat16
weight, cast to float32 once per step for both products).
"""

from __future__ import annotations

from collections import defaultdict

import torch


class WarmSubspaceIteration:
    """Top-r singular values of a fixed list of matrices, advanced one iteration per call.

    ``mats``: 2-D tensors (views of the weights; conv kernels as (out, in*kh*kw)). ``k``: basis
    width (k <= min(m, n) for every matrix). ``seed`` fixes the Gaussian start.
    """

    def __init__(self, mats: list[torch.Tensor], k: int, *, seed: int = 0):
        self.k = k
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, W in enumerate(mats):
            if W.dim() != 2 or k > min(W.shape):
                raise ValueError(f"matrix {i} of shape {tuple(W.shape)} cannot take k={k}")
            groups[(tuple(W.shape), W.device)].append(i)
        self.groups = []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for ((m, n), device), idx in groups.items():
            b = len(idx)
            Z = torch.randn(b, n, k, generator=gen).to(device)
            self.groups.append({
                "idx": idx, "Z": Z, "Z_next": torch.empty_like(Z),
                "Y": torch.empty(b, m, k, device=device),
                "sigma": torch.zeros(b, k, dtype=torch.float64, device=device),
            })

    @torch.no_grad()
    def step(self, mats: list[torch.Tensor]) -> None:
        for g in self.groups:
            Y, Z, Zn = g["Y"], g["Z"], g["Z_next"]
            cast = [mats[i] if mats[i].dtype == torch.float32 else mats[i].float()
                    for i in g["idx"]]
            for j, W in enumerate(cast):
                torch.matmul(W, Z[j], out=Y[j])
            U = torch.linalg.qr(Y).Q
            for j, W in enumerate(cast):
                torch.matmul(W.T, U[j], out=Zn[j])
            Zd = Zn.double()
            evals = torch.linalg.eigvalsh(Zd.mT @ Zd)  # ascending
            g["sigma"] = evals.flip(-1).clamp_min(0).sqrt()
            g["Z"], g["Z_next"] = Zn, Z

    def sigma(self) -> list[torch.Tensor]:
        """Current estimates (k,) float64 per matrix, in the order of ``mats``, descending."""
        out = [None] * sum(len(g["idx"]) for g in self.groups)
        for g in self.groups:
            for j, i in enumerate(g["idx"]):
                out[i] = g["sigma"][j]
        return out

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for g in self.groups for t in (g["Z"], g["Z_next"], g["Y"], g["sigma"]))

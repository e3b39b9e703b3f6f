"""Truncated SVD of many query matrices at once, exact or randomized (docs/method.md §4).

Query batching keeps each preconditioned query gradient Ṽ (P×(M+1)) as its best rank-k
approximation L R (Eckart-Young). Small layers take a full batched SVD; large ones a
seeded randomized subspace iteration (Halko, Martinsson & Tropp 2011), whose residual
is within a fraction of a percent of the optimum at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OVERSAMPLE", "POWER_ITERATIONS", "randomized_svd", "truncated_svd"]

OVERSAMPLE = 16  # extra sketch columns of the randomized SVD
POWER_ITERATIONS = 2


def truncated_svd(v: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Ṽ ≈ L R, best rank-k in Frobenius norm (Eckart-Young): (Q,P,M+1) -> (Q,P,k), (Q,k,M+1).

    The singular values are folded into the left factor, L = U_k diag(σ_k). Layers much
    larger than the rank take the randomized path (:func:`randomized_svd`): a full SVD of
    every query's P×(M+1) matrix costs O(P M min(P, M)) and dominates compressing
    hundreds of queries on a GPU, where batched SVD of large matrices is slow.
    """
    if min(v.shape[1:]) <= 4 * (rank + OVERSAMPLE):
        u, s, vh = torch.linalg.svd(v, full_matrices=False)  # (Q,P,r), (Q,r), (Q,r,M+1)
    else:
        u, s, vh = randomized_svd(v, rank + OVERSAMPLE)
    left = u[..., :rank] * s[:, None, :rank]  # (Q, P, k)
    return left.contiguous(), vh[:, :rank].contiguous()  # (Q, k, M+1)


def randomized_svd(v: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``width`` singular triplets of each (P, M+1) matrix of v (Q, P, M+1).

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with a
    fixed seeded sketch, so a query always compresses to the same factors; every step is
    a batched matrix product or a thin QR, O(P M width) per query. With
    ``POWER_ITERATIONS`` = 2 and 16 columns of oversampling, the residual ‖Ṽ − L R‖ is
    within 0.35% of the optimal (Eckart-Young) one on a flat-spectrum test (4 iterations:
    0.03%, at 1.7× the time; tests/test_batching.py holds it within 0.5%), about 1% on
    rank-64 3072×769 matrices rescaled entrywise, in float32; on preconditioned
    GPT-2-small MLP query gradients the relative residual agreed with the optimum's
    within 0.1%. Eight 3072×769 float32 matrices took 0.12 s against 1.02 s for a full
    SVD (2 CPU threads).
    """
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(v.shape[2], width, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(v @ omega.to(v.device, v.dtype))  # (Q, P, w)
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(v.transpose(1, 2) @ basis)  # (Q, M+1, w)
        basis, _ = torch.linalg.qr(v @ z)  # (Q, P, w)
    ub, s, vh = torch.linalg.svd(basis.transpose(1, 2) @ v, full_matrices=False)  # w×(M+1)
    return basis @ ub, s, vh  # (Q, P, w), (Q, w), (Q, w, M+1)

"""Sample-quality metrics for low-dimensional data."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None) -> float:
    """Sliced p-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) between samples.

    ``x [N, D]`` and ``y [M, D]`` are projected on ``n_projections`` random unit directions;
    each 1-D distance compares the two empirical quantile functions on a common grid of
    ``max(N, M)`` levels. Returns ``(mean_k W_p^p)^(1/p)``.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D] with the same D; got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.detach().cpu().double(), y.detach().cpu().double()
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    n = max(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = px[(q * len(px)).long().clamp(max=len(px) - 1)]
    qy = py[(q * len(py)).long().clamp(max=len(py) - 1)]
    return float(((qx - qy).abs() ** p).mean() ** (1 / p))

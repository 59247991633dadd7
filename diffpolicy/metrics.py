"""Sample-quality metrics for low-dimensional data."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "SlicedWassersteinTo"]


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None) -> float:
    """Sliced p-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) between samples.

    ``x [N, D]`` and ``y [M, D]`` are projected on ``n_projections`` random unit directions;
    each 1-D distance compares the two empirical quantile functions on a common grid of
    ``max(N, M)`` levels. Returns ``(mean_k W_p^p)^(1/p)``.
    """
    _check_pair(x, y)
    return SlicedWassersteinTo(y, n_projections, p, generator)(x)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D] with the same D; got {tuple(x.shape)}, {tuple(y.shape)}")


class SlicedWassersteinTo:
    """:func:`sliced_wasserstein` to a fixed reference ``y``: its projections are drawn and sorted
    once, so scoring many sample sets against one held-out set costs one sort of ``x`` each.
    ``SlicedWassersteinTo(y, generator=g)(x) == sliced_wasserstein(x, y, generator=g)`` for the
    same generator state."""

    def __init__(self, y: Tensor, n_projections: int = 256, p: int = 2, generator: torch.Generator | None = None):
        if y.dim() != 2:
            raise ValueError(f"y must be [M, D], got {tuple(y.shape)}")
        y = y.detach().cpu().double()
        theta = torch.randn(y.shape[1], n_projections, generator=generator, dtype=torch.float64)
        self.theta, self.p = theta / theta.norm(dim=0, keepdim=True), p
        self.py = (y @ self.theta).sort(0).values

    def __call__(self, x: Tensor) -> float:
        D = self.theta.shape[0]
        if x.dim() != 2 or x.shape[1] != D:
            raise ValueError(f"x must be [N, {D}] like the reference y; got {tuple(x.shape)}")
        px = (x.detach().cpu().double() @ self.theta).sort(0).values
        py = self.py
        n = max(len(px), len(py))
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        qx = px[(q * len(px)).long().clamp(max=len(px) - 1)]
        qy = py[(q * len(py)).long().clamp(max=len(py) - 1)]
        return float(((qx - qy).abs() ** self.p).mean() ** (1 / self.p))

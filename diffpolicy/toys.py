"""2-D toy distributions and the exact denoiser of a Gaussian mixture (for tests and the demo)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoiser import DenoiserBase, expand_like
from .parameterization import check_prediction, from_x0_eps, needs_derivatives
from .schedules import Schedule

__all__ = ["TOYS", "make_toy", "eight_gaussians", "two_moons", "GaussianMixtureDenoiser"]


def eight_gaussians(n: int, generator=None, radius: float = 2.0, std: float = 0.1) -> Tensor:
    """Eight isotropic Gaussians evenly spaced on a circle: ``[n, 2]``."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.double() * (2 * math.pi / 8)
    centers = radius * torch.stack([angle.cos(), angle.sin()], -1)
    return (centers + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def two_moons(n: int, generator=None, noise: float = 0.05) -> Tensor:
    """Two interleaved half circles (scikit-learn's ``make_moons``), centred: ``[n, 2]``."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    pts = torch.stack([x - 0.5, y - 0.25], -1) * 1.5
    return pts + noise * torch.randn(n, 2, generator=generator)


TOYS = {"8gaussians": eight_gaussians, "moons": two_moons}


def make_toy(name: str, n: int, generator=None) -> Tensor:
    """``n`` samples of a named toy distribution; unknown names raise a ValueError."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; valid: {', '.join(TOYS)}")
    return TOYS[name](n, generator=generator)


class GaussianMixtureDenoiser(DenoiserBase):
    """The exact denoiser of ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` under any schedule.

    ``p(x_t | k) = N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` and
    ``E[x0 | x_t, k] = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^{-1} (x_t - alpha mu_k)``;
    the result is the responsibility-weighted mean, returned as the prediction ``prediction``.
    ``means [K, D]``, ``covs [K, D, D]``, ``weights [K]``.
    """

    def __init__(self, schedule: Schedule, means: Tensor, covs: Tensor, weights: Tensor | None = None,
                 prediction: str = "x0"):
        super().__init__()
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        self.means, self.covs = means.double(), covs.double()
        k = means.shape[0]
        self.weights = (torch.full((k,), 1.0 / k) if weights is None else weights).double()

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        xd, t = x.double(), t.double()
        if t.dim() == 0 or bool((t == t.reshape(-1)[0]).all()):
            t = t.reshape(-1)[:1]  # one time for the batch (as in samplers): one solve
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        prec = torch.linalg.inv(a**2 * self.covs + s**2 * eye)       # [B or 1, K, D, D]
        diff = xd[:, None, :] - alpha.view(-1, 1, 1) * self.means     # [B, K, D]
        sol = (prec @ diff.unsqueeze(-1)).squeeze(-1)
        logdet = -torch.linalg.slogdet(prec).logabsdet
        logp = self.weights.log() - 0.5 * (logdet + (diff * sol).sum(-1))
        resp = torch.softmax(logp, -1)                                # [B, K]
        x0_k = self.means + alpha.view(-1, 1, 1) * (self.covs @ sol.unsqueeze(-1)).squeeze(-1)
        x0 = (resp.unsqueeze(-1) * x0_k).sum(1)
        alpha, sigma = expand_like(alpha, xd), expand_like(sigma, xd)
        eps = (xd - alpha * x0) / sigma
        d_alpha = d_sigma = None
        if needs_derivatives(self.prediction):
            d_alpha, d_sigma = (expand_like(v, xd) for v in self.schedule.derivatives(t))
        out = from_x0_eps(self.prediction, x0, eps, alpha, sigma, d_alpha, d_sigma, self.schedule.sigma_data)
        return out.to(x.dtype)

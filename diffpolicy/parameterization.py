"""Conversions among a denoiser's possible predictions, and preconditioning scalings.

With ``x_t = alpha_t x_0 + sigma_t eps`` (handbook §2.1) every prediction kind is a linear
function of ``(x_0, eps)`` given ``x_t``, so one pair of functions does every conversion:
``to_x0_eps`` (prediction -> x0, eps) and ``from_x0_eps`` (x0, eps -> prediction).

Kinds (``PREDICTIONS``):

=============  ===========================================================================
``eps``        the noise ``eps`` (Ho et al. 2020)
``x0``         the clean sample ``x_0`` (the "denoiser" D of EDM)
``v``          diffusion v ``alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022 eq. 8-9)
``rf_velocity``the velocity ``dx_t/dt = alpha'_t x_0 + sigma'_t eps``; for rectified flow
               ``eps - x_0`` (Liu et al. 2023; handbook §2.4)
``score``      ``grad log p_t(x_t) = -eps / sigma_t`` (Song et al. 2021)
``trigflow``   TrigFlow's ``F = (dx_t/dt) / sigma_d`` (Lu & Song 2025 eq. 6)
=============  ===========================================================================

Arguments ``alpha, sigma, d_alpha, d_sigma`` may be floats or tensors broadcastable to ``x``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS", "check_prediction", "kind_coefficients", "to_x0_eps", "from_x0_eps", "convert",
    "sde_coefficients", "velocity_from_score", "score_from_velocity",
    "diffusion_v_to_rf_velocity", "rf_velocity_to_diffusion_v", "to_rf_coordinates",
    "edm_scalings", "consistency_scalings", "lcm_scalings",
]

PREDICTIONS = ("eps", "x0", "v", "rf_velocity", "score", "trigflow")
_NEEDS_DERIVATIVES = ("rf_velocity", "trigflow")


def check_prediction(kind: str) -> str:
    """Return ``kind`` or raise a ValueError listing the valid prediction kinds."""
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")
    return kind


def needs_derivatives(kind: str) -> bool:
    """Whether converting ``kind`` needs ``d alpha/dt`` and ``d sigma/dt``."""
    return check_prediction(kind) in _NEEDS_DERIVATIVES


def kind_coefficients(kind, alpha, sigma, d_alpha=None, d_sigma=None, sigma_data=1.0):
    """Coefficients ``(a, b, c, d)`` with ``x0 = a x_t + b pred`` and ``eps = c x_t + d pred``.

    Velocity kinds invert ``[x_t; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]``
    (handbook §2.7: the determinant ``alpha sigma' - sigma alpha'`` is nonzero for every
    schedule here).
    """
    check_prediction(kind)
    if kind == "eps":
        return 1 / alpha, -sigma / alpha, 0.0 * alpha, 1.0 + 0.0 * alpha
    if kind == "x0":
        return 0.0 * sigma, 1.0 + 0.0 * sigma, 1 / sigma, -alpha / sigma
    if kind == "v":
        n = alpha**2 + sigma**2
        return alpha / n, -sigma / n, sigma / n, alpha / n
    if kind == "score":
        return 1 / alpha, sigma**2 / alpha, 0.0 * sigma, -sigma
    if d_alpha is None or d_sigma is None:
        raise ValueError(f"prediction {kind!r} needs the schedule's derivatives d_alpha, d_sigma")
    det = alpha * d_sigma - sigma * d_alpha
    scale = sigma_data if kind == "trigflow" else 1.0
    return d_sigma / det, -sigma * scale / det, -d_alpha / det, alpha * scale / det


def to_x0_eps(kind: str, pred: Tensor, x: Tensor, alpha, sigma, d_alpha=None, d_sigma=None,
              sigma_data: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` from a prediction of ``kind`` at ``x_t`` (see module table)."""
    a, b, c, d = kind_coefficients(kind, alpha, sigma, d_alpha, d_sigma, sigma_data)
    return a * x + b * pred, c * x + d * pred


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, alpha, sigma, d_alpha=None, d_sigma=None,
                sigma_data: float = 1.0) -> Tensor:
    """The prediction of ``kind`` that corresponds to ``(x0, eps)`` (the training target)."""
    check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    if d_alpha is None or d_sigma is None:
        raise ValueError(f"prediction {kind!r} needs the schedule's derivatives d_alpha, d_sigma")
    u = d_alpha * x0 + d_sigma * eps
    return u / sigma_data if kind == "trigflow" else u


def convert(pred: Tensor, src: str, dst: str, x: Tensor, alpha, sigma, d_alpha=None, d_sigma=None,
            sigma_data: float = 1.0) -> Tensor:
    """Convert a prediction of kind ``src`` into kind ``dst`` at ``x_t``."""
    x0, eps = to_x0_eps(src, pred, x, alpha, sigma, d_alpha, d_sigma, sigma_data)
    return from_x0_eps(dst, x0, eps, alpha, sigma, d_alpha, d_sigma, sigma_data)


# ----------------------------------------------------------------------------------------
# Velocity, score and SDE (handbook §2.7: one relation for every schedule)
# ----------------------------------------------------------------------------------------

def sde_coefficients(alpha, sigma, d_alpha, d_sigma):
    """Forward SDE ``dx = f x dt + g dW`` with ``f = alpha'/alpha``, ``g^2 = 2 sigma sigma' - 2 f sigma^2``.

    Kingma et al. 2021 (VDM) eq. 33 / Song et al. 2021 eq. 5, written for any ``(alpha, sigma)``.
    """
    f = d_alpha / alpha
    return f, 2 * sigma * d_sigma - 2 * f * sigma**2


def velocity_from_score(score, x, alpha, sigma, d_alpha, d_sigma):
    """Probability-flow velocity ``u = f x - g^2 / 2 * score`` (Song et al. 2021 eq. 13)."""
    f, g2 = sde_coefficients(alpha, sigma, d_alpha, d_sigma)
    return f * x - 0.5 * g2 * score


def score_from_velocity(u, x, alpha, sigma, d_alpha, d_sigma):
    """Inverse of :func:`velocity_from_score`: ``score = (f x - u) * 2 / g^2``."""
    f, g2 = sde_coefficients(alpha, sigma, d_alpha, d_sigma)
    return (f * x - u) * 2 / g2


# ----------------------------------------------------------------------------------------
# Velocity mapping between a diffusion model and rectified flow (handbook §2.4.5, §2.6.3)
# ----------------------------------------------------------------------------------------

def to_rf_coordinates(x, alpha, sigma):
    """Map ``x_t`` of any schedule onto the RF path: ``(x_t / (alpha + sigma), sigma / (alpha + sigma))``.

    Dividing ``x_t = alpha x0 + sigma eps`` by ``alpha + sigma`` gives ``(1 - s) x0 + s eps``
    with ``s = sigma / (alpha + sigma)``: the same ``(x0, eps)`` pair on the straight path.
    """
    scale = alpha + sigma
    return x / scale, sigma / scale


def diffusion_v_to_rf_velocity(v, x, alpha, sigma):
    """RF velocity ``eps - x0`` from a diffusion-v prediction at ``x_t`` (any schedule).

    For VP (``alpha^2 + sigma^2 = 1``) this is ``(sigma - alpha) x + (alpha + sigma) v``.
    """
    x0, eps = to_x0_eps("v", v, x, alpha, sigma)
    return eps - x0


def rf_velocity_to_diffusion_v(u, x, alpha, sigma):
    """Inverse of :func:`diffusion_v_to_rf_velocity` (``u = eps - x0`` -> ``v``)."""
    y, r = to_rf_coordinates(x, alpha, sigma)  # the same (x0, eps) on the straight path
    x0, eps = to_x0_eps("rf_velocity", u, y, 1 - r, r, -1.0, 1.0)
    return from_x0_eps("v", x0, eps, alpha, sigma)


# ----------------------------------------------------------------------------------------
# Preconditioning scalings
# ----------------------------------------------------------------------------------------

def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM ``c_skip, c_out, c_in, c_noise`` (Karras et al. 2022 Table 1)."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2**0.5
    c_in = 1 / s2**0.5
    c_noise = torch.log(torch.as_tensor(sigma)) / 4
    return c_skip, c_out, c_in, c_noise


def consistency_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model boundary scalings (Song et al. 2023 eq. 7 and App. C).

    ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out = (s - s_min) sd / sqrt(s^2 + sd^2)``,
    so that ``c_skip(s_min) = 1`` and ``c_out(s_min) = 0``: ``f(x, s_min) = x`` exactly.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def lcm_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """Latent consistency model boundary scalings on discrete timesteps (Luo et al. 2023 eq. 9).

    ``c_skip = sd^2 / ((t k)^2 + sd^2)``, ``c_out = t k / sqrt((t k)^2 + sd^2)`` with ``k`` the
    timestep scaling; ``c_skip(0) = 1``, ``c_out(0) = 0``.
    """
    tk = t * timestep_scaling
    c_skip = sigma_data**2 / (tk**2 + sigma_data**2)
    c_out = tk / (tk**2 + sigma_data**2) ** 0.5
    return c_skip, c_out

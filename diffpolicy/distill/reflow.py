"""Straight-path distillation: reflow, InstaFlow's one-step student, and fine-tuning any
diffusion model with the rectified-flow loss through the velocity mapping.

- **Reflow** (Liu et al., ICLR 2023, Alg. 1, "k-rectified flow"): draw noise ``z``, solve the
  teacher's probability-flow ODE to ``x = ODE(z)`` (a deterministic coupling), and train the next
  flow with the flow-matching loss on the coupled pairs, ``x_t = (1 - t) x + t z`` and
  ``|| u(x_t, t) - (z - x) ||^2`` (their eq. 1 with ``(X_0, X_1) = (x, z)`` in our
  noise-at-``t = 1`` convention). The 2-rectified flow's paths are straighter, so few Euler
  steps lose little. :func:`reflow_loss` is :func:`~diffpolicy.losses.diffusion_loss` with the
  noise fixed to the pair's ``z``; it works for any schedule and parameterisation.
- **InstaFlow** (Liu et al., ICLR 2024, eq. 4): a one-step student ``G(z)`` regresses the
  (2-)RF teacher's pairs, ``d(G(z), x)`` (the paper's LPIPS replaced by ``l2`` or
  pseudo-Huber; :func:`pair_regression_loss`). DMD's regression loss is the same function.
- **Velocity mapping** (handbook §2.4.5): at ``x_t = alpha_t x0 + sigma_t eps`` any diffusion
  model's ``(x0_hat, eps_hat)`` is the RF velocity ``eps_hat - x0_hat`` on the straight path at
  ``r = sigma_t / (alpha_t + sigma_t)`` (``parameterization.to_rf_coordinates``).
  :func:`velocity_mapping_loss` fine-tunes the diffusion model with the RF loss
  ``|| (eps_hat - x0_hat) - (eps - x0) ||^2`` in that form, without changing its parameterisation
  or schedule; it then samples along the straight path with ``sample_rf_euler``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffpolicy.denoiser import DenoiserBase, expand_like
from diffpolicy.losses import _mean_per_sample, _metric, diffusion_loss
from diffpolicy.samplers import prior, run_sampler

__all__ = ["ODE_SAMPLERS", "ode_pairs", "one_step", "pair_regression_loss", "reflow_loss", "velocity_mapping_loss"]

ODE_SAMPLERS = ("rf_euler", "euler", "ddim", "heun", "dpmpp_2m")  # deterministic solvers of the probability-flow ODE


@torch.no_grad()
def ode_pairs(teacher: DenoiserBase, shape, steps: int, *, cond=None, sampler: str = "rf_euler",
              generator: torch.Generator | None = None, **sampler_kwargs) -> tuple[Tensor, Tensor]:
    """``(z, x)``: noise ``z`` from the teacher's prior and its deterministic ODE solution ``x``
    (``steps`` steps of ``sampler``; ``rf_euler``, ``ddim``, ``heun`` or ``dpmpp_2m``)."""
    if sampler not in ODE_SAMPLERS or float(sampler_kwargs.get("eta", 0.0)) != 0.0:
        raise ValueError(f"reflow and InstaFlow need a deterministic ODE coupling: sampler one of "
                         f"{', '.join(ODE_SAMPLERS)} (and eta = 0), got {sampler!r} {sampler_kwargs or ''}")
    z = prior(teacher, shape, generator=generator)
    x = run_sampler(sampler, teacher, z.clone(), teacher.schedule.timesteps(steps), cond=cond, **sampler_kwargs)
    return z, x


def reflow_loss(model: DenoiserBase, z: Tensor, x: Tensor, cond=None, **kwargs) -> Tensor:
    """Per-sample reflow loss ``[B]`` on coupled pairs ``(z, x)`` from :func:`ode_pairs`
    (Liu et al. 2023 eq. 1 on ``(x, z)``): the model's own diffusion loss with ``noise = z``.

    ``z`` must be in units of the model's prior (``prior_std`` times a standard normal), as
    :func:`ode_pairs` returns it; it is divided by the prior std here, so VE teachers work too.
    """
    std = model.schedule.prior_std()
    return diffusion_loss(model, x, cond, noise=z / std, **kwargs)


def one_step(model: DenoiserBase, z: Tensor, cond=None) -> Tensor:
    """The model's one-step sample from the prior draw ``z``: its x0 prediction at ``t_max``."""
    t = torch.full((z.shape[0],), model.schedule.t_max, device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
    return model.x0_eps(z, t, cond)[0]


def pair_regression_loss(model: DenoiserBase, z: Tensor, x: Tensor, cond=None, *, metric: str = "l2") -> Tensor:
    """InstaFlow's one-step distillation (Liu et al. 2024 eq. 4) and DMD's regression loss
    (Yin et al. 2024 eq. 9): ``d(G(z), x)`` per sample, ``G`` = :func:`one_step`."""
    return _metric(metric, one_step(model, z, cond), x)


def velocity_mapping_loss(model: DenoiserBase, x0: Tensor, cond=None, *, t: Tensor | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Per-sample RF loss ``|| (eps_hat - x0_hat) - (eps - x0) ||^2`` of any diffusion model
    through the velocity mapping (handbook §2.4.5), at times ``t`` of its own schedule."""
    sched = model.schedule
    B = x0.shape[0]
    tdtype = torch.promote_types(x0.dtype, torch.float32)
    t = sched.sample_t(B, generator=generator, device=x0.device).to(tdtype) if t is None else t.to(tdtype)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t))
    x0_hat, eps_hat = model.x0_eps(alpha * x0 + sigma * eps, t, cond)
    return _mean_per_sample(((eps_hat - x0_hat) - (eps - x0)) ** 2)

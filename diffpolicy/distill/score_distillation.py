"""Score distillation: SDS, VSD and distribution matching distillation (DMD), one gradient.

All three move a differentiable sample ``x = g_theta(...)`` along the difference of two
denoisers' predictions at a re-noised copy ``x_t = alpha_t x + sigma_t eps``:

- **SDS** (Poole et al., DreamFusion, ICLR 2023, eq. 3):
  ``grad_theta = E[ w(t) (eps_real(x_t, t) - eps) dx/dtheta ]`` -- the pre-trained model's
  noise prediction against the noise that was added (``fake=None``). Mode-seeking.
- **VSD** (Wang et al., ProlificDreamer, NeurIPS 2023, eq. 9): the added noise is replaced by a
  second denoiser ``eps_fake`` trained online (:func:`fake_score_loss`) on the current samples:
  ``grad = w(t) (eps_real - eps_fake)``; the particles then follow the KL gradient between the
  sample distribution and the model's, not just its mode.
- **DMD** (Yin et al., CVPR 2024, eq. 7-8): the same KL gradient for a one-step generator,
  written in x0 terms, ``grad = (x0_fake - x0_real) / mean|x - x0_real|`` (their per-sample
  normalisation, ``weighting="dmd"``), plus the regression loss on teacher ODE pairs
  (:func:`~diffpolicy.distill.reflow.pair_regression_loss`, eq. 9) and, in DMD2 (Yin et al.
  2024), an optional GAN head (:mod:`diffpolicy.distill.adversarial`) and the two time-scale
  rule: several fake-score updates per generator update (5 in DMD2; it matters on the toys too).

Because ``eps_hat = (x_t - alpha x0_hat) / sigma``, ``eps_real - eps_fake = (alpha / sigma)
(x0_fake - x0_real)``: the three differ only in the fake prediction and the weight ``w(t)``.
The loss returned is ``0.5 || x - sg(x - grad) ||^2`` per sample, whose gradient in ``x`` is
exactly ``grad`` (the usual stop-gradient trick; the value itself is not meaningful).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpolicy.denoiser import CFGDenoiser, DenoiserBase, expand_like
from diffpolicy.losses import diffusion_loss
from diffpolicy.schedules import VE, DiscreteVP

__all__ = ["WEIGHTINGS", "fake_score_loss", "score_distillation_grad", "score_distillation_loss"]

WEIGHTINGS = ("sds", "dmd", "uniform")


def _times(schedule, n: int, t_range: tuple[float, float], generator, device, dtype) -> Tensor:
    """Times at fractions ``u ~ U(t_range)`` of the schedule's range: linear in ``t`` (integer
    steps for DiscreteVP, as its networks were trained), in ``log sigma`` for VE/EDM (``t = sigma``)."""
    lo, hi = t_range
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"t_range must be fractions 0 <= lo < hi <= 1 of the schedule's time range, got {t_range}")
    u = lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if isinstance(schedule, VE):  # from sigma_min (t_min is 0, the data itself) to sigma_max
        s_lo = max(getattr(schedule, "sigma_min", 0.0) or 0.0, schedule.t_min, 1e-3)
        t = (math.log(s_lo) + u * (math.log(schedule.t_max) - math.log(s_lo))).exp()
    else:
        t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
        if isinstance(schedule, DiscreteVP):
            t = t.round()
    return t.to(dtype)


@torch.no_grad()
def score_distillation_grad(x: Tensor, real: DenoiserBase, cond=None, *, fake: DenoiserBase | None = None,
                            weighting: str = "sds", t_range: tuple[float, float] = (0.02, 0.98),
                            guidance: float | None = None, null_cond: Tensor | None = None,
                            generator: torch.Generator | None = None) -> Tensor:
    """The descent direction on ``x`` (same shape): SDS (``fake=None``), VSD or DMD (module doc).

    ``weighting``: ``"sds"`` ``w = sigma_t^2`` (DreamFusion's choice) on the eps difference;
    ``"dmd"`` the x0 difference over ``mean|x - x0_real|`` per sample; ``"uniform"`` ``w = 1``
    on the eps difference. ``guidance`` wraps the real model in classifier-free guidance.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if guidance is not None:
        real = CFGDenoiser(real, guidance, null_cond)
    sched = real.schedule
    x = x.detach()
    t = _times(sched, x.shape[0], t_range, generator, x.device, torch.promote_types(x.dtype, torch.float32))
    alpha, sigma = (expand_like(v, x) for v in sched.alpha_sigma(t))
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = alpha * x + sigma * eps
    x0_real, eps_real = real.x0_eps(x_t, t, cond)
    if fake is None:
        x0_fake, eps_fake = x, eps  # SDS: the sample itself, with the noise that was added
    else:
        x0_fake, eps_fake = fake.x0_eps(x_t, t, cond)
    if weighting == "dmd":
        norm = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6)
        return (x0_fake - x0_real) / expand_like(norm, x)
    w = sigma**2 if weighting == "sds" else 1.0
    return w * (eps_real - eps_fake)


def score_distillation_loss(x: Tensor, real: DenoiserBase, cond=None, **kwargs) -> Tensor:
    """Per-sample surrogate ``0.5 || x - sg(x - grad) ||^2`` whose ``x``-gradient is
    :func:`score_distillation_grad` (``kwargs`` as there); backpropagate it into the generator."""
    grad = score_distillation_grad(x, real, cond, **kwargs)
    return 0.5 * (x - (x - grad).detach()).square().flatten(1).sum(1)


def fake_score_loss(fake: DenoiserBase, x: Tensor, cond=None, **kwargs) -> Tensor:
    """VSD's / DMD's online fake-score objective: the ordinary diffusion loss on the current
    samples ``x`` (detached: the generator gets no gradient from it)."""
    return diffusion_loss(fake, x.detach(), cond, **kwargs)

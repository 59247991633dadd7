"""Adversarial distillation: the GAN losses, adversarial diffusion distillation (ADD) and the
GAN head of DMD2.

- GAN losses: hinge (Lim & Ye 2017; ADD eq. 2-3) and non-saturating (Goodfellow et al. 2014;
  DMD2 eq. 5), on discriminator logits.
- **ADD** (Sauer et al., ECCV 2024, §3): a few-step student ``x_theta(x_s, s)`` run on data
  noised to one of its own times ``s``; the discriminator compares its samples with real data
  (hinge loss, optional R1 penalty); the distillation loss re-noises the student sample to a
  teacher time ``t``, lets the frozen teacher denoise it, and regresses on that
  (eq. 5): ``c(t) d(x_theta, x_psi(sg(alpha_t x_theta + sigma_t eps'), t))`` with the
  exponential weighting ``c(t) = alpha_t``. Generator loss ``L_adv + lambda L_distill``
  (``lambda = 2.5``).
- **DMD2's GAN head** (Yin et al., NeurIPS 2024, §4.3): a discriminator on noisy samples
  ``D(x_t, t)`` (in the paper a head on the fake-score network's features) with the
  non-saturating loss; :func:`noisy` makes the ``x_t`` for both halves.

The discriminator is any callable ``D(x, t, cond) -> logits [B]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpolicy.denoiser import DenoiserBase, expand_like
from diffpolicy.losses import _metric

__all__ = ["GAN_LOSSES", "ConvDiscriminator", "add_losses", "discriminator_loss", "generator_adv_loss", "noisy", "r1_penalty"]

GAN_LOSSES = ("hinge", "nonsaturating")


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; valid: {', '.join(GAN_LOSSES)}")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Scalar discriminator loss: hinge ``E relu(1 - D(real)) + E relu(1 + D(fake))`` or
    non-saturating ``E softplus(-D(real)) + E softplus(D(fake))``."""
    _check(kind)
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_adv_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Scalar generator loss: hinge ``-E D(fake)`` or non-saturating ``E softplus(-D(fake))``."""
    _check(kind)
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def r1_penalty(discriminator, real: Tensor, t, cond=None) -> Tensor:
    """R1 gradient penalty ``E || grad_x D(x) ||^2`` on real samples (Mescheder et al. 2018 eq. 9)."""
    real = real.detach().requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(real, t, cond).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def noisy(schedule, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``alpha_t x + sigma_t eps``: samples noised to ``t`` (DMD2's discriminator inputs)."""
    alpha, sigma = (expand_like(v, x) for v in schedule.alpha_sigma(t))
    return alpha * x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def add_losses(student: DenoiserBase, teacher: DenoiserBase, discriminator, x0: Tensor, cond=None, *,
               student_times: Tensor, distill_weight: float = 2.5, gan: str = "hinge", metric: str = "l2",
               r1_weight: float = 0.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """ADD's two scalar losses on a batch of real data ``x0``: ``{"generator", "discriminator",
    "adversarial", "distill"}`` (the last two are the generator's parts, for logging).

    ``student_times``: the student's sampling times (e.g. ``schedule.timesteps(4)[:-1]``); each
    sample is noised to one of them. The discriminator is called on clean images as
    ``D(x, None, cond)``. Minimise ``generator`` in the student's parameters and
    ``discriminator`` in the discriminator's: backpropagating ``generator`` also leaves gradients
    in the discriminator, so zero them before its step (``train_student(after_step=...)``).
    """
    if repr(teacher.schedule) != repr(student.schedule):
        raise ValueError(f"teacher ({teacher.schedule!r}) and student ({student.schedule!r}) must share one schedule")
    sched = student.schedule
    B = x0.shape[0]
    tdtype = torch.promote_types(x0.dtype, torch.float32)
    times = student_times.to(device=x0.device, dtype=tdtype)
    s = times[torch.randint(0, len(times), (B,), generator=generator, device=x0.device)]
    x_student = student.x0_eps(noisy(sched, x0, s, generator), s, cond)[0]
    # distillation (eq. 5): the teacher denoises the re-noised student sample; c(t) = alpha_t
    t = sched.sample_t(B, generator=generator, device=x0.device).to(tdtype)
    with torch.no_grad():
        target = teacher.x0_eps(noisy(sched, x_student.detach(), t, generator), t, cond)[0]
    c = sched.alpha_sigma(t)[0].to(x0.dtype)
    distill = (c * _metric(metric, x_student, target)).mean()
    adversarial = generator_adv_loss(discriminator(x_student, None, cond), gan)
    d_loss = discriminator_loss(discriminator(x0, None, cond), discriminator(x_student.detach(), None, cond), gan)
    if r1_weight:
        d_loss = d_loss + r1_weight * r1_penalty(discriminator, x0, None, cond)
    return {"generator": adversarial + distill_weight * distill, "discriminator": d_loss,
            "adversarial": adversarial.detach(), "distill": distill.detach()}


class ConvDiscriminator(nn.Module):
    """A small image discriminator ``D(x, t, cond) -> logits [B]``: strided conv blocks with
    spectral normalisation (Miyato et al. 2018), a linear head, and a class projection term
    ``<embed(c), h>`` (Miyato & Koyama 2018) when ``num_classes > 0``. ``t`` is ignored (ADD's
    discriminator sees clean samples)."""

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 2, num_classes: int = 0):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, ch = [], in_channels
        for i in range(depth):
            layers += [sn(nn.Conv2d(ch, width * 2**i, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            ch = width * 2**i
        self.body = nn.Sequential(*layers)
        self.head = sn(nn.Linear(ch, 1))
        self.embed = sn(nn.Embedding(num_classes + 1, ch)) if num_classes > 0 else None

    def forward(self, x: Tensor, t=None, cond: Tensor | None = None) -> Tensor:
        h = self.body(x).sum((2, 3))
        out = self.head(h).squeeze(-1)
        if self.embed is not None and cond is not None:
            out = out + (self.embed(cond) * h).sum(-1)
        return out

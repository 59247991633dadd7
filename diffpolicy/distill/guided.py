"""Guided distillation (Meng et al., CVPR 2023, "On distillation of guided diffusion models").

Stage one (§3.1, eq. 6): a single student ``x_eta(z_t, c, w)`` that takes the guidance weight
``w`` as an input learns to match the classifier-free-guided teacher
``x^w(z_t) = x(z_t) + w (x(z_t, c) - x(z_t))`` (our CFG convention, ``w = 1`` the conditional
model; the paper's ``1 + w``), for ``w`` drawn uniformly from ``[w_min, w_max]``, with the
truncated-SNR weight of progressive distillation. One student evaluation then replaces the
teacher's two. Stage two (§3.2) runs
:func:`~diffpolicy.distill.progressive.progressive_distillation_loss` on the stage-one student
with the same ``(c, w)`` conditioning, halving its steps each round.

How ``w`` reaches the network is :func:`with_guidance`'s choice: an extra feature for vector
conditions (MLP nets), the pair ``(labels, w)`` for class labels (``Unet2D(guidance_embed=True)``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffpolicy.denoiser import CFGDenoiser, DenoiserBase, expand_like
from diffpolicy.losses import _mean_per_sample

__all__ = ["guided_distillation_loss", "with_guidance"]


def with_guidance(cond, w: Tensor):
    """The student's conditioning for condition ``cond`` and guidance weights ``w [B]``:
    ``cat([cond, w[:, None]])`` for float vectors ``[B, D]``; ``(cond, w)`` for labels or None."""
    if isinstance(cond, Tensor) and cond.dtype.is_floating_point:
        if cond.dim() != 2:
            raise ValueError(f"a float condition must be [B, D] to append w to it; got {tuple(cond.shape)}")
        return torch.cat([cond, w.to(cond.dtype)[:, None]], dim=1)
    return (cond, w)


def guided_distillation_loss(student: DenoiserBase, teacher: DenoiserBase, x0: Tensor, cond, *,
                             null_cond: Tensor, w_range: tuple[float, float] = (1.0, 5.0),
                             generator: torch.Generator | None = None) -> Tensor:
    """Per-sample stage-one loss ``[B]``: ``max(SNR, 1) || x_student(z_t, c, w) - x^w_teacher(z_t, c) ||^2``."""
    if repr(student.schedule) != repr(teacher.schedule):
        raise ValueError(f"teacher ({teacher.schedule!r}) and student ({student.schedule!r}) must share one schedule")
    sched = teacher.schedule
    B = x0.shape[0]
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(B, generator=generator, device=x0.device, dtype=x0.dtype)
    t = sched.sample_t(B, generator=generator, device=x0.device).to(torch.promote_types(x0.dtype, torch.float32))
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t))
    z = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    with torch.no_grad():  # CFG with a per-sample weight: u + w (c - u) on x0
        x_cond = teacher.x0_eps(z, t, cond)[0]
        x_uncond = teacher.x0_eps(z, t, CFGDenoiser._null_like(null_cond, cond))[0]
        target = x_uncond + expand_like(w, x0) * (x_cond - x_uncond)
    x_hat = student.x0_eps(z, t, with_guidance(cond, w))[0]
    weight = (alpha / sigma).square().clamp_min(1.0).reshape(B, -1)[:, 0]
    return weight * _mean_per_sample((x_hat - target) ** 2)

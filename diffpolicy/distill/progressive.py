"""Progressive distillation (Salimans & Ho, ICLR 2022, Alg. 2): a student matches two teacher
DDIM steps with one, halving the number of sampling steps each round.

On the teacher's grid of ``2N`` times ``t_0 > t_1 > ... > t_2N`` (``schedule.timesteps(2N)``),
for a student step ``t = t_2i -> t'' = t_2i+2``: ``z_t = alpha_t x0 + sigma_t eps``, the teacher
takes two deterministic DDIM steps ``z_t -> z_t' -> z_t''``, and the student's x0 target is the
``x~`` for which one DDIM step from ``z_t`` lands exactly on ``z_t''``:

    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)     (Alg. 2)

with the "truncated SNR" weight ``max(alpha_t^2 / sigma_t^2, 1)`` on ``|x0_hat - x~|^2`` (§4).
The student samples with DDIM on ``student_timesteps(schedule, N)`` (every second teacher time).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffpolicy.denoiser import DenoiserBase, expand_like
from diffpolicy.losses import _ddim_step

__all__ = ["progressive_distillation_loss", "student_timesteps"]


def student_timesteps(schedule, n: int, **grid) -> Tensor:
    """The student's ``n``-step grid: every second time of the teacher's ``2n``-step grid (ends included)."""
    return schedule.timesteps(2 * n, **grid)[::2]


def progressive_distillation_loss(student: DenoiserBase, teacher: DenoiserBase, x0: Tensor, cond=None, *,
                                  student_steps: int, grid: dict | None = None,
                                  generator: torch.Generator | None = None) -> Tensor:
    """Per-sample PD loss ``[B]`` for a student of ``student_steps`` steps distilling a ``2 x``-step teacher."""
    if student.schedule is not teacher.schedule and repr(student.schedule) != repr(teacher.schedule):
        raise ValueError("student and teacher must share one schedule")
    sched = teacher.schedule
    ts = sched.timesteps(2 * student_steps, **(grid or {})).to(x0.device)
    B = x0.shape[0]
    i = torch.randint(0, student_steps, (B,), generator=generator, device=x0.device)
    tdtype = torch.promote_types(x0.dtype, torch.float32)
    t, t1, t2 = (ts[2 * i + k].to(tdtype) for k in range(3))
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t))
    alpha2, sigma2 = (expand_like(v, x0) for v in sched.alpha_sigma(t2))
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z = alpha * x0 + sigma * eps
    with torch.no_grad():
        z2 = _ddim_step(teacher, _ddim_step(teacher, z, t, t1, cond), t1, t2, cond)
        ratio = sigma2 / sigma
        target = (z2 - ratio * z) / (alpha2 - ratio * alpha)
    x0_hat = student.x0_eps(z, t, cond)[0]
    weight = (alpha / sigma).square().clamp_min(1.0).reshape(B, -1)[:, 0]
    return weight * (x0_hat - target).square().flatten(1).mean(1)

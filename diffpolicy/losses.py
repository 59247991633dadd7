"""Training losses: diffusion / flow matching / TrigFlow, consistency training and distillation.

Pure functions take a denoiser and clean data and return a per-sample loss ``[B]``;
:class:`DenoisingLoss` is the thin TorchRL ``LossModule`` shell that reads a TensorDict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.objectives import LossModule

from .denoiser import CFGDenoiser, DenoiserBase, expand_like
from .parameterization import from_x0_eps, kind_coefficients
from .schedules import VE, RectifiedFlow, TrigFlow, karras_sigmas

__all__ = [
    "WEIGHTINGS", "loss_weight", "diffusion_loss", "flow_matching_loss", "trigflow_loss",
    "ct_num_scales", "pseudo_huber", "consistency_training_loss", "consistency_distillation_loss",
    "DenoisingLoss",
]

WEIGHTINGS = ("uniform", "min_snr", "edm")


def _mean_per_sample(v: Tensor) -> Tensor:
    return v.flatten(1).mean(1)


def loss_weight(weighting: str, kind: str, alpha, sigma, d_alpha=None, d_sigma=None, sigma_data=1.0,
                min_snr_gamma: float = 5.0):
    """Per-sample weight on the squared error *of the prediction* of ``kind``.

    A weighting is defined on the x0 error (``w_x0 ||x0_hat - x0||^2``); since
    ``x0_hat - x0 = b (pred - target)`` with ``b`` from ``kind_coefficients``, the weight on
    the prediction error is ``w_x0 b^2``:
    ``min_snr``: ``w_x0 = min(SNR, gamma)`` (Hang et al. 2023 eq. 8; for eps this is
    ``min(SNR, gamma)/SNR``); ``edm``: ``w_x0 = (s^2 + sd^2)/(s sd)^2`` with ``s = sigma/alpha``
    (Karras et al. 2022 Table 1).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones_like(torch.as_tensor(sigma))
    snr = alpha**2 / sigma**2
    if weighting == "min_snr" and kind in ("eps", "score"):
        # min(SNR, g) * b^2 with b^2 = 1/SNR (eps) or sigma^2/SNR (score), finite at SNR = 0
        w = torch.clamp(min_snr_gamma / snr, max=1.0)
        return w if kind == "eps" else w * sigma**2
    _, b, _, _ = kind_coefficients(kind, alpha, sigma, d_alpha, d_sigma, sigma_data)
    if weighting == "min_snr":
        w = torch.clamp(snr, max=min_snr_gamma) * b**2
    else:
        s = sigma / alpha
        w = (s**2 + sigma_data**2) / (s * sigma_data) ** 2 * b**2
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"the {weighting!r} weighting is not finite for a {kind!r} prediction where alpha = 0 "
                         f"(zero terminal SNR): use v-prediction or min_snr")
    return w


def diffusion_loss(denoiser: DenoiserBase, x0: Tensor, cond=None, *, t: Tensor | None = None,
                   noise: Tensor | None = None, weighting: str = "uniform", min_snr_gamma: float = 5.0,
                   mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching in the denoiser's own parameterisation (Ho et al. 2020 eq. 14).

    ``x_t = alpha_t x0 + sigma_t eps`` at ``t ~ schedule.sample_t``; the target is
    ``from_x0_eps(kind, x0, eps)`` (eps, x0, v, RF velocity, score or TrigFlow F), so the same
    function is the flow-matching loss for an ``rf_velocity`` denoiser and the TrigFlow
    diffusion objective for a ``trigflow`` one. Returns ``[B]``: each sample's mean squared
    error, over the elements where ``mask`` (broadcastable to ``x0``, e.g. ``[B, Tp, 1]`` for
    the padded steps of an action chunk) is true when it is given.
    """
    sched, kind = denoiser.schedule, denoiser.prediction
    B = x0.shape[0]
    if isinstance(cond, Tensor) and cond.shape[0] != B:
        raise ValueError(f"cond has batch size {cond.shape[0]} but x0 has {B}")
    tdtype = torch.promote_types(x0.dtype, torch.float32)
    if t is None:
        t = sched.sample_t(B, generator=generator, device=x0.device).to(tdtype)
    else:
        t = torch.as_tensor(t, dtype=tdtype, device=x0.device)
        t = t.expand(B) if t.dim() == 0 else t
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape [{B}] (the batch of x0); got {tuple(t.shape)}")
        sched.check_t(t)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t))
    d_alpha, d_sigma = (expand_like(v, x0) for v in sched.derivatives(t))
    x_t = alpha * x0 + sigma * noise
    target = from_x0_eps(kind, x0, noise, alpha, sigma, d_alpha, d_sigma, sched.sigma_data)
    sq = (denoiser(x_t, t, cond) - target) ** 2
    if mask is None:
        err = _mean_per_sample(sq)
    else:
        try:
            m = torch.broadcast_to(mask, x0.shape).to(sq.dtype)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x0 {tuple(x0.shape)}") from None
        err = (sq * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    w = loss_weight(weighting, kind, alpha, sigma, d_alpha, d_sigma, sched.sigma_data, min_snr_gamma)
    return err * w.reshape(B, -1)[:, 0]


def masked_diffusion_loss(denoiser: DenoiserBase, x0: Tensor, cond, mask: Tensor, **kwargs) -> Tensor:
    """Scalar :func:`diffusion_loss` averaged over the elements of the whole batch where ``mask``
    (broadcastable to ``x0``) is true, e.g. the real steps of padded action chunks."""
    per_sample = diffusion_loss(denoiser, x0, cond, mask=mask, **kwargs)  # mean over each sample's masked-in elements
    count = torch.broadcast_to(mask, x0.shape).flatten(1).sum(1).to(per_sample.dtype)
    return (per_sample * count).sum() / count.sum().clamp_min(1.0)


def flow_matching_loss(denoiser: DenoiserBase, x0: Tensor, cond=None, **kwargs) -> Tensor:
    """Conditional flow matching / rectified flow (Lipman et al. 2023 eq. 23; Liu et al. 2023 eq. 1).

    ``|| u(x_t, t) - (eps - x0) ||^2`` on the linear path; time clipping and logit-normal times
    are options of :class:`~diffpolicy.schedules.RectifiedFlow`. This is :func:`diffusion_loss`
    for an ``rf_velocity`` denoiser on a rectified-flow schedule, which it checks.
    """
    if denoiser.prediction != "rf_velocity" or not isinstance(denoiser.schedule, RectifiedFlow):
        raise ValueError("flow_matching_loss needs an 'rf_velocity' denoiser on a RectifiedFlow schedule")
    return diffusion_loss(denoiser, x0, cond, **kwargs)


def trigflow_loss(denoiser: DenoiserBase, x0: Tensor, cond=None, **kwargs) -> Tensor:
    """TrigFlow diffusion objective (Lu & Song 2025 eq. 7): ``|| F(x_t/sd, t) - (cos t z - sin t x0)/sd ||^2``.

    :func:`diffusion_loss` for a ``trigflow`` denoiser on a :class:`TrigFlow` schedule.
    """
    if denoiser.prediction != "trigflow" or not isinstance(denoiser.schedule, TrigFlow):
        raise ValueError("trigflow_loss needs a 'trigflow' denoiser on a TrigFlow schedule")
    return diffusion_loss(denoiser, x0, cond, **kwargs)


# ----------------------------------------------------------------------------------------
# Consistency models
# ----------------------------------------------------------------------------------------

def ct_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretisation curriculum N(k) (Song & Dhariwal 2023 eq. 6).

    ``K' = floor(K / (log2(s1/s0) + 1))``, ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1``.
    """
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Pseudo-Huber metric ``sqrt(||a - b||^2 + c^2) - c`` per sample (Song & Dhariwal 2023 eq. 5).

    Default ``c = 0.00054 sqrt(d)`` with ``d`` the data dimension.
    """
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


def _metric(name: str, a: Tensor, b: Tensor) -> Tensor:
    if name == "pseudo_huber":
        return pseudo_huber(a, b)
    if name == "l2":
        return _mean_per_sample((a - b) ** 2)
    raise ValueError(f"unknown metric {name!r}; valid: l2, pseudo_huber")


def consistency_training_loss(model: DenoiserBase, x0: Tensor, cond=None, *, step: int, total_steps: int,
                              target: DenoiserBase | None = None, s0: int = 10, s1: int = 1280,
                              metric: str = "pseudo_huber", p_mean: float = -1.1, p_std: float = 2.0,
                              generator: torch.Generator | None = None) -> Tensor:
    """Consistency training (Song et al. 2023 Alg. 3 with iCT's choices, Song & Dhariwal 2023).

    Karras sigmas with ``N(step)`` levels; an adjacent pair ``s_i < s_{i+1}`` drawn with iCT's
    log-normal probabilities (eq. 7); ``x = x0 + s z`` shares one ``z``;
    loss ``d(f(x0 + s_{i+1} z), f^-(x0 + s_i z)) / (s_{i+1} - s_i)``. ``f^-`` is ``target``
    (an EMA copy, original CT) or the model itself without gradient (iCT). VE/EDM schedules.
    """
    sched = model.schedule
    if not isinstance(sched, VE):
        raise ValueError("consistency_training_loss needs a VE/EDM schedule (sigma = t)")
    n = ct_num_scales(step, total_steps, s0, s1)
    sig = karras_sigmas(n, sched.sigma_min, sched.sigma_max, sched.rho).flip(0).to(x0.device)  # ascending
    cdf = torch.erf((sig.log() - p_mean) / (math.sqrt(2) * p_std))
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0)
    i = torch.multinomial(probs.float(), x0.shape[0], replacement=True, generator=generator)
    tdtype = torch.promote_types(x0.dtype, torch.float32)
    s_lo, s_hi = sig[i].to(tdtype), sig[i + 1].to(tdtype)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    out = _consistency_fn(model, x0 + expand_like(s_hi, x0) * z, s_hi, cond)
    with torch.no_grad():
        out_target = _consistency_fn(target if target is not None else model,
                                     x0 + expand_like(s_lo, x0) * z, s_lo, cond)
    return _metric(metric, out, out_target) / (s_hi - s_lo)


def _consistency_fn(model: DenoiserBase, x: Tensor, t: Tensor, cond) -> Tensor:
    """The consistency function f(x, t): the model's x0 estimate, whatever it predicts."""
    return model(x, t, cond) if model.prediction == "x0" else model.x0_eps(x, t, cond)[0]


def consistency_distillation_loss(model: DenoiserBase, teacher: DenoiserBase, x0: Tensor, cond=None, *,
                                  num_scales: int = 18, target: DenoiserBase | None = None,
                                  teacher_steps: int = 1, guidance_scale: float | None = None,
                                  null_cond: Tensor | None = None, metric: str = "l2",
                                  generator: torch.Generator | None = None) -> Tensor:
    """Consistency distillation (Song et al. 2023 Alg. 2; LCM's skipping and CFG, Luo et al. 2023).

    On the model schedule's ``num_scales``-step grid, a pair ``t_n > t_{n+1}``: ``x_{t_n}`` from
    data, the teacher's DDIM (eta=0) solution to ``t_{n+1}`` in ``teacher_steps`` sub-steps, and
    ``d(f(x_{t_n}, t_n), f^-(x_hat_{t_{n+1}}, t_{n+1}))`` on the consistency function ``f`` (the
    x0 estimate); at the data end ``f`` is the identity, so the last pair anchors the boundary
    (Song et al. 2023 Alg. 2 includes ``t_1 = eps``). ``guidance_scale`` wraps the teacher
    in classifier-free guidance (CFG-augmented teacher, LCM eq. 11). Works for any schedule.
    """
    sched = model.schedule
    if repr(teacher.schedule) != repr(sched):
        raise ValueError(f"teacher ({teacher.schedule!r}) and student ({sched!r}) must share one schedule")
    if guidance_scale is not None:
        teacher = CFGDenoiser(teacher, guidance_scale, null_cond)
    ts = sched.timesteps(num_scales).to(device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
    n = torch.randint(0, len(ts) - 1, (x0.shape[0],), generator=generator, device=x0.device)
    t_hi, t_lo = ts[n], ts[n + 1]   # the last pair ends at the data end, where f(x) = x
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t_hi))
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = alpha * x0 + sigma * z
    with torch.no_grad():
        x_hat = x
        for k in range(teacher_steps):
            t = t_hi + (t_lo - t_hi) * (k / teacher_steps)
            s = t_hi + (t_lo - t_hi) * ((k + 1) / teacher_steps)
            x_hat = _ddim_step(teacher, x_hat, t, s, cond)
        at_end = expand_like(sched.alpha_sigma(t_lo)[1] == 0, x0)
        t_eval = torch.where(at_end.flatten(), ts[-2], t_lo)  # any valid time; replaced below
        f_target = _consistency_fn(target if target is not None else model, x_hat, t_eval, cond)
        out_target = torch.where(at_end, x_hat / expand_like(sched.alpha_sigma(t_lo)[0], x0), f_target)
    return _metric(metric, _consistency_fn(model, x, t_hi, cond), out_target)


def _ddim_step(denoiser: DenoiserBase, x: Tensor, t: Tensor, s: Tensor, cond) -> Tensor:
    """One deterministic DDIM step ``t -> s`` (per-sample times): ``alpha_s x0_hat + sigma_s eps_hat``."""
    x0, eps = denoiser.x0_eps(x, t, cond)
    alpha_s, sigma_s = (expand_like(v, x) for v in denoiser.schedule.alpha_sigma(s))
    return alpha_s * x0 + sigma_s * eps


# ----------------------------------------------------------------------------------------
# TorchRL shell
# ----------------------------------------------------------------------------------------

class DenoisingLoss(LossModule):
    """TorchRL ``LossModule`` for :func:`diffusion_loss` on a TensorDict of clean samples.

    Reads ``tensor_keys.sample`` (default ``"action"``: diffusion BC on actions) and the
    conditioning ``tensor_keys.cond`` (default ``"observation"``; set it to ``None`` for an
    unconditional model); writes ``loss_diffusion`` (mean over the batch).
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable keys: ``sample`` (clean x0) and ``cond`` (conditioning, or None)."""

        sample: NestedKey = "action"
        cond: NestedKey | None = "observation"

    default_keys = _AcceptedKeys
    out_keys = ["loss_diffusion"]

    def __init__(self, denoiser: DenoiserBase, *, weighting: str = "uniform", min_snr_gamma: float = 5.0):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.denoiser = denoiser
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        keys = [self.tensor_keys.sample]
        return keys + ([self.tensor_keys.cond] if self.tensor_keys.cond is not None else [])

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        x0 = tensordict.get(self.tensor_keys.sample)
        cond = tensordict.get(self.tensor_keys.cond) if self.tensor_keys.cond is not None else None
        loss = diffusion_loss(self.denoiser, x0, cond, weighting=self.weighting, min_snr_gamma=self.min_snr_gamma)
        return TensorDict({"loss_diffusion": loss.mean()}, batch_size=[])


"""The one denoiser contract: ``denoiser(x_t, t, cond) -> prediction`` with a declared kind.

A :class:`Denoiser` wraps a raw network (any ``net(x, net_time, cond)``) together with the
schedule it was trained on and the kind of its output (``parameterization.PREDICTIONS``).
Preconditioners (EDM, consistency boundary, LCM, TrigFlow) are small modules between the two;
guidance and x0 clipping are wrappers that are themselves denoisers. Samplers and losses only
ever see this contract and convert through :mod:`diffpolicy.parameterization`.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from .parameterization import (
    check_prediction, consistency_scalings, edm_scalings, kind_coefficients, lcm_scalings, needs_derivatives,
    to_x0_eps,
)
from .schedules import DiscreteVP, Schedule, TrigFlow

__all__ = [
    "DenoiserBase", "Denoiser", "EDMPrecond", "ConsistencyPrecond", "LCMPrecond", "TrigFlowPrecond",
    "CFGDenoiser", "ClassifierGuidance", "ClipX0", "expand_like", "mark_grid_time", "time_cached",
]


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``[B]`` (or scalar) tensor to broadcast against ``x [B, ...]``."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def mark_grid_time(t: Tensor, schedule: Schedule) -> Tensor:
    """Mark ``t`` as a grid time of ``schedule``, evaluated again at every call (see :func:`time_cached`)."""
    t._time_cache = (weakref.ref(schedule), {})
    return t


def time_cached(t: Tensor, schedule: Schedule, key: tuple, compute: Callable[[], object]):
    """``compute()``, a function of the time ``t`` on ``schedule`` alone, kept on ``t`` when it is a grid time.

    Samplers evaluate the same grid times at every call (a policy acts with one grid at every
    environment step), so schedule coefficients and preconditioner scalings of a grid time
    (:func:`mark_grid_time`; :func:`diffpolicy.samplers.prepare_grid` marks its times) are computed
    once instead of at every network call: at batch 1 they cost as much as a small network.
    ``key`` names by value everything else the result depends on. Any other ``t`` (random training
    times), or a grid time used with another schedule, computes afresh. Kept values carry no
    autograd history and are not inference tensors, so they serve sampling with and without
    gradients alike; they hold no reference to the schedule or the model.
    """
    mark = getattr(t, "_time_cache", None)
    if mark is None or mark[0]() is not schedule:
        return compute()
    value = mark[1].get(key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = mark[1][key] = compute()
    return value


def _time_vector(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}] (the batch of x); got {tuple(t.shape)}")
    return t


class DenoiserBase(nn.Module):
    """Anything with ``schedule``, ``prediction`` and ``forward(x, t, cond)``."""

    schedule: Schedule
    prediction: str

    def coefficients(self, t: Tensor, x: Tensor):
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t``, shaped to broadcast against ``x``."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        d_alpha = d_sigma = None
        if needs_derivatives(self.prediction):
            d_alpha, d_sigma = (expand_like(v, x) for v in self.schedule.derivatives(t))
        return expand_like(alpha, x), expand_like(sigma, x), d_alpha, d_sigma

    def x0_eps(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` at ``(x_t, t)``: the prediction converted by its kind."""
        t = _time_vector(t, x)
        pred = self(x, t, cond)
        a, b, c, d = self._conversion(t, x)
        return torch.addcmul(b * pred, a, x), torch.addcmul(d * pred, c, x)

    def x0(self, x: Tensor, t, cond=None) -> Tensor:
        """``x0_hat`` at ``(x_t, t)``: ``x0_eps(x, t, cond)[0]`` without computing ``eps_hat``."""
        t = _time_vector(t, x)
        pred = self(x, t, cond)
        if self.prediction == "x0":  # nothing to convert (consistency models, EDM, clipped wrappers)
            return pred
        a, b, _, _ = self._conversion(t, x)
        return torch.addcmul(b * pred, a, x)

    def _conversion(self, t: Tensor, x: Tensor):
        """:func:`~diffpolicy.parameterization.kind_coefficients` of this prediction at ``t``, shaped
        against ``x``: ``x0 = a x + b pred``, ``eps = c x + d pred`` (kept on grid times)."""
        return time_cached(t, self.schedule, ("kind_coefficients", self.prediction, x.dim()), lambda: kind_coefficients(
            self.prediction, *self.coefficients(t, x), self.schedule.sigma_data))


class Denoiser(DenoiserBase):
    """Wrap ``net(x, net_time, cond)`` as a denoiser of kind ``prediction`` on ``schedule``.

    Without a preconditioner the network sees ``schedule.net_time(t)`` and its output *is* the
    prediction. With one, the preconditioner decides what the network sees and declares the
    output kind (``prediction`` may then be omitted or must agree).
    """

    def __init__(self, net: Callable, schedule: Schedule, prediction: str | None = None,
                 precond: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.precond = precond
        if precond is not None:
            if prediction is not None and prediction != precond.prediction:
                raise ValueError(f"prediction={prediction!r} disagrees with the preconditioner, "
                                 f"which outputs {precond.prediction!r}; omit prediction")
            prediction = precond.prediction
        self.prediction = check_prediction(prediction or "eps")

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """``x [B, ...]``, ``t [B]`` (schedule time) -> prediction ``[B, ...]``."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.precond is None:
            return self.net(x, self.schedule.net_time(t), cond)
        return self.precond(self.net, x, t, cond, self.schedule)


# ----------------------------------------------------------------------------------------
# Preconditioners: forward(net, x, t, cond, schedule) -> prediction of kind `.prediction`
# ----------------------------------------------------------------------------------------

class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022 eq. 7): ``D = c_skip x + c_out F(c_in x, c_noise)``.

    Written for any schedule through the scaled variables ``x / alpha`` and ``sigma / alpha``
    (EDM §2, ``s(t) = alpha_t``); outputs ``x0``.
    """

    prediction = "x0"

    def __init__(self, sigma_data: float | None = None):
        super().__init__()
        self._sigma_data = sigma_data

    def sd(self, schedule) -> float:
        """``sigma_data``: the one given, else the schedule's (one source of truth)."""
        return schedule.sigma_data if self._sigma_data is None else self._sigma_data

    def _settings(self) -> tuple:
        """What the scalings depend on besides the time and the schedule (a grid time's cache key)."""
        return (self._sigma_data,)

    def scalings(self, sigma, schedule):
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sd(schedule))
        return c_skip, c_out, c_in, 1000.0 * c_noise

    def forward(self, net, x, t, cond, schedule):
        key = (type(self), *self._settings(), x.dim())
        k_skip, c_out, k_in, c_noise = time_cached(t, schedule, key, lambda: self._time_terms(t, schedule, x))
        return torch.addcmul(k_skip * x, c_out, net(k_in * x, c_noise, cond))

    def _time_terms(self, t, schedule, x):
        """``(c_skip / alpha, c_out, c_in / alpha, c_noise)``: the scalings of the scaled ``x / alpha``
        folded into the coefficients of ``x``, shaped to broadcast against it."""
        alpha, sigma = schedule.alpha_sigma(t)
        # (the check reads the device; a CUDA graph being captured skips it: its warm-up ran it)
        if not (alpha.is_cuda and torch.cuda.is_current_stream_capturing()) and bool((alpha == 0).any()):
            raise ValueError(f"{type(self).__name__} divides by alpha_t, which is 0 at t={float(t.max())} on the "
                             f"{schedule.name} schedule: start sampling below that time")
        c_skip, c_out, c_in, c_noise = self.scalings(sigma / alpha, schedule)
        return expand_like(c_skip / alpha, x), expand_like(c_out, x), expand_like(c_in / alpha, x), c_noise


class ConsistencyPrecond(EDMPrecond):
    """Consistency-model parameterisation (Song et al. 2023 eq. 7): ``f(x, sigma_min) = x``.

    Same shape as EDM with the boundary-respecting ``c_skip, c_out`` of
    :func:`~diffpolicy.parameterization.consistency_scalings`; outputs ``x0``. ``sigma_data`` and
    ``sigma_min`` default to the schedule's, so the boundary sits where its grids end.
    """

    def __init__(self, sigma_data: float | None = None, sigma_min: float | None = None):
        super().__init__(sigma_data)
        self._sigma_min = sigma_min

    def _settings(self) -> tuple:
        return (self._sigma_data, self._sigma_min)

    def scalings(self, sigma, schedule):
        sigma_min = getattr(schedule, "sigma_min", 0.002) if self._sigma_min is None else self._sigma_min
        c_skip, c_out, c_in = consistency_scalings(sigma, self.sd(schedule), sigma_min)
        return c_skip, c_out, c_in, 250.0 * torch.log(sigma)


class LCMPrecond(nn.Module):
    """Latent-consistency parameterisation of a diffusion network (Luo et al. 2023 eq. 9).

    The network keeps its diffusion output ``inner`` (e.g. ``eps`` of the teacher it was
    initialised from); ``f = c_skip(t) x + c_out(t) x0_hat`` on a discrete VP schedule.
    """

    prediction = "x0"

    def __init__(self, inner: str = "eps", sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.inner = check_prediction(inner)
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, net, x, t, cond, schedule):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"LCMPrecond needs a DiscreteVP schedule, got {type(schedule).__name__}")
        alpha, sigma = schedule.alpha_sigma(t)
        x0, _ = to_x0_eps(self.inner, net(x, schedule.net_time(t), cond), x,
                          expand_like(alpha, x), expand_like(sigma, x))
        c_skip, c_out = lcm_scalings(t.clamp_min(0), self.sigma_data, self.timestep_scaling)
        return expand_like(c_skip, x) * x + expand_like(c_out, x) * x0


class TrigFlowPrecond(nn.Module):
    """TrigFlow (Lu & Song 2025 eq. 6): the network sees ``x / sigma_d`` and outputs ``F``."""

    prediction = "trigflow"

    def forward(self, net, x, t, cond, schedule):
        if not isinstance(schedule, TrigFlow):
            raise ValueError(f"TrigFlowPrecond needs a TrigFlow schedule, got {type(schedule).__name__}")
        return net(x / schedule.sigma_data, schedule.net_time(t), cond)


# ----------------------------------------------------------------------------------------
# Wrappers that are denoisers themselves
# ----------------------------------------------------------------------------------------

class _Wrapper(DenoiserBase):
    def __init__(self, inner: DenoiserBase, prediction: str | None = None):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.prediction = prediction or inner.prediction


class CFGDenoiser(_Wrapper):
    """Classifier-free guidance (Ho & Salimans 2022 eq. 6): ``u + w (c - u)``.

    ``w = 1`` is the conditional model, ``w = 0`` the unconditional one (``w = 1 + w'`` for the
    ``w'`` of Ho & Salimans' eq. 6, diffusers' convention). All prediction kinds
    are affine in ``(x0, eps)`` given ``x_t``, so guiding the raw prediction is the same as
    guiding eps. ``null_cond`` is the conditioning meaning "none" (e.g. the null class); when
    it is given both halves run as one batch, otherwise the inner denoiser gets ``cond=None``.
    """

    def __init__(self, inner: DenoiserBase, scale: float, null_cond: Tensor | None = None):
        super().__init__(inner)
        self.scale = scale
        self.null_cond = null_cond

    @staticmethod
    def _null_like(null_cond: Tensor | None, cond: Tensor) -> Tensor | None:
        """``null_cond`` broadcast to the batch of ``cond`` (None stays None: the inner model gets no cond)."""
        return None if null_cond is None else null_cond.to(cond).expand_as(cond)

    def forward(self, x, t, cond=None):
        if cond is None:
            raise ValueError("CFGDenoiser needs the conditioning cond (the unconditional half is made here)")
        if self.null_cond is None:
            cond_out, uncond_out = self.inner(x, t, cond), self.inner(x, t, None)
        else:
            null = self._null_like(self.null_cond, cond)
            out = self.inner(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
            cond_out, uncond_out = out.chunk(2)
        return uncond_out + self.scale * (cond_out - uncond_out)


class ClassifierGuidance(_Wrapper):
    """Classifier guidance (Dhariwal & Nichol 2021 eq. 14): ``eps - s sigma grad log p(y | x_t)``.

    ``classifier(x_t, t) -> logits [B, classes]``; ``cond`` holds the labels ``y [B]``. The
    inner denoiser is called with ``inner_cond`` (``None`` by default: unconditional model).
    Outputs ``eps``.
    """

    def __init__(self, inner: DenoiserBase, classifier: Callable, scale: float, pass_cond: bool = False):
        super().__init__(inner, prediction="eps")
        self.classifier, self.scale, self.pass_cond = classifier, scale, pass_cond

    def forward(self, x, t, cond=None):
        if cond is None:
            raise ValueError("ClassifierGuidance needs the target labels as cond")
        _, eps = self.inner.x0_eps(x, t, cond if self.pass_cond else None)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t), -1)
            grad, = torch.autograd.grad(logp.gather(-1, cond.long().view(-1, 1)).sum(), xg)
        _, sigma = self.schedule.alpha_sigma(t)
        return eps - self.scale * expand_like(sigma, x) * grad


class ClipX0(_Wrapper):
    """Clip the x0 prediction to ``[-clip, clip]``, or Imagen's dynamic thresholding.

    Dynamic thresholding (Saharia et al. 2022 §2.3): ``s = max(quantile(|x0|, p), clip)`` per
    sample, ``x0 <- clamp(x0, -s, s) * clip / s``. Outputs ``x0``, so samplers recompute eps
    from the clipped x0 (diffusers' ``use_clipped_model_output``).
    """

    def __init__(self, inner: DenoiserBase, clip: float = 1.0, dynamic_quantile: float | None = None):
        super().__init__(inner, prediction="x0")
        if dynamic_quantile is not None and not 0 < dynamic_quantile < 1:
            raise ValueError(f"dynamic_quantile must be in (0, 1), got {dynamic_quantile}")
        self.clip, self.dynamic_quantile = clip, dynamic_quantile

    def forward(self, x, t, cond=None):
        x0 = self.inner.x0(x, t, cond)
        if self.dynamic_quantile is None:
            return x0.clamp(-self.clip, self.clip)
        s = torch.quantile(x0.flatten(1).abs(), self.dynamic_quantile, dim=1).clamp_min(self.clip)
        s = expand_like(s, x0)
        return torch.maximum(torch.minimum(x0, s), -s) * (self.clip / s)

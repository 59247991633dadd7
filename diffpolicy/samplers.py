"""Samplers: short functions ``sampler(denoiser, x, ts, *, cond, ...) -> x``.

``ts`` is a descending grid of ``n + 1`` schedule times (``schedule.timesteps(n)``): the
sampler evaluates the denoiser at ``ts[:-1]`` and ends at ``ts[-1]``. Samplers never
disable gradients (Diffusion-QL, DRaFT and ReFL backpropagate through them): wrap the call
in ``torch.no_grad()`` when sampling only.

Every per-step coefficient is computed once, in float64, before the loop; the loop itself
is a network call plus one or two fused tensor ops, because every prediction kind is
linear in ``(x_t, prediction)`` (see :mod:`diffpolicy.parameterization`).

=============  ======================================================  ==================
name           algorithm                                               NFE for n steps
=============  ======================================================  ==================
ddpm           ancestral, fixed small/large variance (Ho et al. 2020)  n
ddim           DDIM with eta (Song et al. 2021a eq. 12)                n
euler          probability-flow ODE, Euler                             n
heun           probability-flow ODE, Heun (Karras et al. 2022 Alg. 1)  2n - 1
sde            reverse SDE, Euler-Maruyama (Song et al. 2021b eq. 6)   n
dpmpp_2m       DPM-Solver++(2M) (Lu et al. 2022 Alg. 2)                n
langevin       annealed Langevin dynamics (Song & Ermon 2019 Alg. 1)   n * n_steps_each
rf_euler       Euler on the straight RF path, velocity/x0/eps forms    n
consistency    consistency multistep (Song et al. 2023 Alg. 1)         n
lcm            LCM multistep (Luo et al. 2023 Alg. 3) = consistency    n
trigflow       sCM multistep on TrigFlow (Lu & Song 2025) = consist.   n
=============  ======================================================  ==================
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .denoiser import ClipX0, DenoiserBase, mark_grid_time
from .parameterization import kind_coefficients, sde_coefficients
from .schedules import DiscreteVP, TrigFlow

__all__ = [
    "SAMPLERS", "sample", "run_sampler", "prior", "tempered", "noise_draws", "consistency_timesteps", "grid_timesteps", "prepare_grid", "ddim_std", "ddim_coefficients",
    "sample_ddpm", "sample_ddim", "sample_euler", "sample_heun", "sample_sde", "sample_dpmpp_2m",
    "sample_langevin", "sample_rf_euler", "sample_consistency", "sample_lcm", "sample_trigflow",
]


# ----------------------------------------------------------------------------------------
# Pure step formulas (shared with the chain MDP)
# ----------------------------------------------------------------------------------------

def _sqrt_pos(v):
    return v.clamp_min(0).sqrt() if isinstance(v, Tensor) else math.sqrt(max(v, 0.0))


def ddim_std(alpha_t, sigma_t, alpha_s, sigma_s, eta=1.0):
    """DDIM's noise std (Song et al. 2021a eq. 16) for a step ``t -> s`` of any schedule.

    ``eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)``; for VP this is
    diffusers' ``eta * sqrt((1 - abar_s)/(1 - abar_t) * (1 - abar_t/abar_s))`` and ``eta = 1``
    is the DDPM posterior std. It is 0 for a step to ``sigma_s = 0``.
    """
    ratio = alpha_t * sigma_s / (alpha_s * sigma_t)
    return eta * sigma_s * _sqrt_pos(1 - ratio**2)


def ddim_coefficients(a, b, c, d, alpha_s, sigma_s, std):
    """``(A, B)`` with DDIM's mean ``alpha_s x0 + sqrt(sigma_s^2 - std^2) eps = A x_t + B pred``.

    ``x0 = a x_t + b pred`` and ``eps = c x_t + d pred`` come from ``kind_coefficients``.
    """
    k = _sqrt_pos(sigma_s**2 - std**2)
    return alpha_s * a + k * c, alpha_s * b + k * d


# ----------------------------------------------------------------------------------------
# Grid preparation
# ----------------------------------------------------------------------------------------

@dataclass
class _Grid:
    n: int
    t: list            # [n] network time vectors, each [B]
    ts: list           # [n + 1] floats
    alpha: list
    sigma: list
    d_alpha: list
    d_sigma: list
    coef: list         # [n + 1] tuples (a, b, c, d): x0 = a x + b p, eps = c x + d p
    memo: dict = field(default_factory=dict)  # per-sampler precomputations on this grid


# Prepared grids, per schedule: a policy samples with the same grid at every environment
# step, so the float64 coefficient work is done once (what diffusers' set_timesteps does).
_GRIDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GRIDS_PER_SCHEDULE = 32


def prepare_grid(denoiser: DenoiserBase, x: Tensor, ts, cond=None) -> _Grid:
    """Per-step float64 coefficients of ``ts`` for ``denoiser`` and batch ``x`` (cached per schedule)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [B, ...] of initial noise")
    if isinstance(cond, Tensor) and cond.shape[0] != x.shape[0]:
        raise ValueError(f"cond has batch size {cond.shape[0]} but x has {x.shape[0]}")
    ts = tuple(ts.tolist()) if isinstance(ts, Tensor) else tuple(float(t) for t in ts)
    sched = denoiser.schedule
    key = (denoiser.prediction, sched.sigma_data, ts, x.shape[0], x.dtype, x.device)
    cache = _GRIDS.setdefault(sched, {})
    grid = cache.get(key)
    if grid is None:
        if len(cache) >= _GRIDS_PER_SCHEDULE:
            cache.clear()
        with torch.inference_mode(False):  # cached tensors must also serve later autograd calls
            grid = cache[key] = _make_grid(denoiser, torch.tensor(ts, dtype=torch.float64), x)
    return grid


def _make_grid(denoiser: DenoiserBase, ts: Tensor, x: Tensor) -> _Grid:
    if ts.numel() < 2:
        raise ValueError("ts must hold at least two times (start and end); use schedule.timesteps(n)")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be strictly decreasing (from noise to data)")
    sched = denoiser.schedule
    sched.check_t(ts, "ts")
    alpha, sigma = sched.alpha_sigma(ts)
    d_alpha, d_sigma = sched.derivatives(ts)
    coef = kind_coefficients(denoiser.prediction, alpha, sigma, d_alpha, d_sigma, sched.sigma_data)
    coef = torch.stack([torch.as_tensor(c, dtype=torch.float64).expand_as(ts) for c in coef], -1)
    if not bool(coef[:-1].isfinite().all()):
        bad = float(ts[:-1][~coef[:-1].isfinite().all(-1)][0])
        raise ValueError(f"a {denoiser.prediction!r} prediction cannot be converted at t={bad} on the "
                         f"{sched.name} schedule (alpha or sigma is 0 there): start the grid inside "
                         f"the interval or use another prediction kind")
    B = x.shape[0]
    tdtype = torch.promote_types(x.dtype, torch.float32)  # bf16 would round t = 999 to 1000
    tvec = [mark_grid_time(torch.full((B,), float(t), dtype=tdtype, device=x.device), sched) for t in ts[:-1].tolist()]
    return _Grid(len(ts) - 1, tvec, ts.tolist(), alpha.tolist(), sigma.tolist(),
                 d_alpha.tolist(), d_sigma.tolist(), [tuple(c) for c in coef.tolist()])


def _noise(noise: Tensor | None, generator, x: Tensor, n: int) -> Callable[[int], Tensor]:
    """Fresh Gaussian noise per step, or step ``i`` of an injected ``noise [n, *x.shape]``."""
    if noise is not None:
        if noise.shape[0] < n or noise.shape[1:] != x.shape:
            raise ValueError(f"noise must have shape [{n}, {', '.join(map(str, x.shape))}], got {tuple(noise.shape)}")
        return lambda i: noise[i]
    return lambda i: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _callback(callback, g: _Grid, i: int, x: Tensor, p: Tensor):
    if callback is not None:
        a, b, _, _ = g.coef[i]
        callback({"i": i, "t": g.ts[i], "x": x, "x0": a * x + b * p})


# ----------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------

def sample_ddim(denoiser, x, ts, *, cond=None, eta: float = 0.0, noise=None, generator=None,
                callback=None, _variance: str = "small"):
    """DDIM (Song et al. 2021a eq. 12): ``x_s = alpha_s x0 + sqrt(sigma_s^2 - std^2) eps + std z``.

    ``eta = 0`` is deterministic; ``eta = 1`` is DDPM ancestral sampling. Works on any
    subsequence ``ts`` of any schedule.
    """
    g = prepare_grid(denoiser, x, ts, cond)
    z = _noise(noise, generator, x, g.n)
    steps = g.memo.get(("ddim", eta, _variance))
    if steps is None:
        with torch.inference_mode(False):
            steps = g.memo[("ddim", eta, _variance)] = _ddim_steps(g, eta, _variance, x)
    for i, (A, B, std) in enumerate(steps):
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        x_next = x.mul(A).add_(p, alpha=B)
        x = x_next.add_(z(i), alpha=std) if std > 0 else x_next
    return x


def _ddim_steps(g: _Grid, eta: float, variance: str, x: Tensor) -> list:
    """Per step ``(A, B, std)``: ``x_s = A x_t + B pred + std z``; ``A`` as a 0-d tensor (cheaper mul)."""
    steps = []
    for i in range(g.n):
        at, st, as_, ss = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        std = ddim_std(at, st, as_, ss, eta)
        A, B = ddim_coefficients(*g.coef[i], as_, ss, std)
        if variance == "large" and ss > 0:  # DDPM's sigma_t^2 = beta_t (Ho et al. 2020 §3.2)
            std = _sqrt_pos(st**2 - (at / as_) ** 2 * ss**2)
        steps.append((torch.tensor(A, dtype=x.dtype, device=x.device), B, std))
    return steps


def sample_ddpm(denoiser, x, ts, *, cond=None, variance: str = "small", noise=None, generator=None,
                callback=None):
    """DDPM ancestral sampling (Ho et al. 2020 Alg. 2) on any timestep subsequence.

    ``variance="small"``: the posterior variance ``beta~_t``; ``"large"``: ``beta_t`` (i.e.
    ``sigma_{t|s}^2``). The mean is the posterior mean in both cases; the step into ``sigma = 0``
    adds no noise.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; valid: small, large")
    return sample_ddim(denoiser, x, ts, cond=cond, eta=1.0, noise=noise, generator=generator,
                       callback=callback, _variance=variance)


def _velocity_coefficients(g: _Grid, i: int):
    """``(U1, U2)`` with the PF-ODE velocity ``u = alpha' x0 + sigma' eps = U1 x + U2 pred``."""
    a, b, c, d = g.coef[i]
    da, ds = g.d_alpha[i], g.d_sigma[i]
    return da * a + ds * c, da * b + ds * d


def sample_euler(denoiser, x, ts, *, cond=None, callback=None):
    """Probability-flow ODE, Euler: ``x_s = x_t + (s - t) u``, ``u = alpha' x0 + sigma' eps``.

    The velocity is the unified one of handbook §2.7 (for rectified flow ``eps - x0``).
    """
    g = prepare_grid(denoiser, x, ts, cond)
    for i in range(g.n):
        h = g.ts[i + 1] - g.ts[i]
        U1, U2 = _velocity_coefficients(g, i)
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        x = x.mul(1 + h * U1).add_(p, alpha=h * U2)
    return x


def sample_heun(denoiser, x, ts, *, cond=None, callback=None):
    """Heun's 2nd-order method on the PF-ODE (Karras et al. 2022 Alg. 1, no churn).

    The last step into ``sigma = 0`` is a plain Euler step, as in EDM.
    """
    g = prepare_grid(denoiser, x, ts, cond)
    for i in range(g.n):
        h = g.ts[i + 1] - g.ts[i]
        U1, U2 = _velocity_coefficients(g, i)
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        u = p.mul(U2).add_(x, alpha=U1)
        x_e = x + h * u
        if g.sigma[i + 1] == 0:
            x = x_e
            continue
        V1, V2 = _velocity_coefficients(g, i + 1)
        t_next = torch.full_like(g.t[i], g.ts[i + 1])
        u2 = denoiser(x_e, t_next, cond).mul(V2).add_(x_e, alpha=V1)
        x = x + (0.5 * h) * (u + u2)
    return x


def sample_sde(denoiser, x, ts, *, cond=None, noise=None, generator=None, callback=None):
    """Reverse-time SDE ``dx = [f x - g^2 score] dt + g dW`` by Euler-Maruyama (Song et al. 2021b eq. 6).

    ``f, g`` come from ``parameterization.sde_coefficients``. The step into ``sigma = 0`` returns
    the denoised ``x0_hat`` (Tweedie), as Song et al. do.
    """
    g = prepare_grid(denoiser, x, ts, cond)
    z = _noise(noise, generator, x, g.n)
    f_g2 = torch.stack(sde_coefficients(*(torch.tensor(v[:-1], dtype=torch.float64) for v in
                                          (g.alpha, g.sigma, g.d_alpha, g.d_sigma))), -1)
    if not bool(f_g2.isfinite().all()) or bool((f_g2[:, 1] < 0).any()):
        raise ValueError(f"the reverse SDE of the {denoiser.schedule.name} schedule is singular on this "
                         f"grid (alpha = 0 at its start?): start the grid below t_max")
    for i in range(g.n):
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        a, b, c, d = g.coef[i]
        if g.sigma[i + 1] == 0:
            return x.mul(a).add_(p, alpha=b)
        h = g.ts[i + 1] - g.ts[i]  # negative
        f, g2 = f_g2[i].tolist()
        k = h * g2 / g.sigma[i]  # drift f x - g^2 score with score = -(c x + d p) / sigma
        x = x.mul(1 + h * f + k * c).add_(p, alpha=k * d).add_(z(i), alpha=math.sqrt(-h * g2))
    return x


def sample_dpmpp_2m(denoiser, x, ts, *, cond=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2), data prediction, first order on the last step.

    ``x_s = (sigma_s/sigma_t) x_t + (alpha_s - alpha_t sigma_s/sigma_t) D`` with
    ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1}/h_i``, ``h = lambda_s - lambda_t``,
    ``lambda = log(alpha/sigma)``.
    """
    g = prepare_grid(denoiser, x, ts, cond)
    lam = [math.log(a / s) if a > 0 and s > 0 else (math.inf if s == 0 else -math.inf)
           for a, s in zip(g.alpha, g.sigma)]
    x0_prev, h_prev = None, None
    for i in range(g.n):
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        a, b, _, _ = g.coef[i]
        x0 = x.mul(a).add_(p, alpha=b)
        ratio = g.sigma[i + 1] / g.sigma[i]
        h = lam[i + 1] - lam[i]
        D = x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            r2 = 0.5 * h / h_prev  # 1 / (2 r)
            D = x0.mul(1 + r2).add_(x0_prev, alpha=-r2)
        x = x.mul(ratio).add_(D, alpha=g.alpha[i + 1] - g.alpha[i] * ratio)
        x0_prev, h_prev = x0, h
    return x


def sample_langevin(denoiser, x, ts, *, cond=None, n_steps_each: int = 10, step_lr: float = 2e-5,
                    denoise: bool = True, noise=None, generator=None, callback=None):
    """Annealed Langevin dynamics (Song & Ermon 2019 Alg. 1) over the noise levels ``ts[:-1]``.

    At level ``i``: ``n_steps_each`` steps ``x += a_i/2 score + sqrt(a_i) z`` with
    ``a_i = step_lr * sigma_i^2 / sigma_last^2``. With ``denoise`` the result is the Tweedie
    ``x0_hat`` at the last level (Jolicoeur-Martineau et al. 2021).
    """
    g = prepare_grid(denoiser, x, ts, cond)
    z = _noise(noise, generator, x, g.n * n_steps_each)
    s_last = g.sigma[g.n - 1]
    p = None
    for i in range(g.n):
        a, b, c, d = g.coef[i]
        step = step_lr * (g.sigma[i] / s_last) ** 2
        k = -0.5 * step / g.sigma[i]  # a/2 * score = -a/(2 sigma) (c x + d p)
        for j in range(n_steps_each):
            p = denoiser(x, g.t[i], cond)
            _callback(callback, g, i, x, p)
            x = x.mul(1 + k * c).add_(p, alpha=k * d).add_(z(i * n_steps_each + j), alpha=math.sqrt(step))
    if denoise:
        a, b, _, _ = g.coef[g.n - 1]
        x = x.mul(a).add_(denoiser(x, g.t[g.n - 1], cond), alpha=b)
    return x


RF_FORMS = ("velocity", "x0", "eps")


def sample_rf_euler(denoiser, x, ts, *, cond=None, form: str = "velocity", callback=None):
    """Euler on the straight rectified-flow path (Liu et al. 2023; handbook §2.4.5, Alg. 6-8).

    Any schedule is first mapped onto the RF path, ``y = x_t / (alpha + sigma)`` at
    ``r = sigma / (alpha + sigma)`` (``parameterization.to_rf_coordinates``), with velocity
    ``eps - x0``. The step is written in one of three algebraically equal forms:
    ``velocity``: ``y + (r' - r)(eps - x0)``; ``x0`` (InstaFlow): ``x0 + (r'/r)(y - x0)``;
    ``eps``: ``eps + ((1 - r')/(1 - r))(y - eps)``. On any schedule this equals DDIM (eta=0).
    """
    if form not in RF_FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(RF_FORMS)}")
    g = prepare_grid(denoiser, x, ts, cond)
    if form == "eps" and any(g.alpha[i] == 0 for i in range(g.n)):
        raise ValueError("the eps form divides by 1 - r, which is 0 where alpha = 0 (t = "
                         f"{g.ts[0]}): use form='velocity' or 'x0', or start the grid below that time")
    for i in range(g.n):
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        a, b, c, d = g.coef[i]
        scale, scale_s = g.alpha[i] + g.sigma[i], g.alpha[i + 1] + g.sigma[i + 1]
        r, r_s = g.sigma[i] / scale, g.sigma[i + 1] / scale_s
        y = x / scale
        x0, eps = x.mul(a).add_(p, alpha=b), x.mul(c).add_(p, alpha=d)
        if form == "velocity":
            y = y + (r_s - r) * (eps - x0)
        elif form == "x0":
            y = x0 + (r_s / r) * (y - x0)
        else:
            y = eps + ((1 - r_s) / (1 - r)) * (y - eps)
        x = y * scale_s
    return x


def sample_consistency(denoiser, x, ts, *, cond=None, noise=None, generator=None, callback=None):
    """Consistency multistep sampling (Song et al. 2023 Alg. 1; handbook Alg. 4).

    ``x0 = f(x, ts[0])``; then for each later time ``t`` in ``ts[1:-1]``: re-noise
    ``x = alpha_t x0 + sigma_t z`` and ``x0 = f(x, t)``. Returns ``x0``. With a consistency
    parameterisation ``f`` is the denoiser's ``x0`` prediction. Build ``ts`` with
    :func:`consistency_timesteps`, so that no evaluation lands on ``sigma_min``.
    """
    g = prepare_grid(denoiser, x, ts, cond)
    z = _noise(noise, generator, x, g.n)
    x0 = None
    for i in range(g.n):
        if i > 0:
            x = z(i).mul(g.sigma[i]).add_(x0, alpha=g.alpha[i])
        p = denoiser(x, g.t[i], cond)
        _callback(callback, g, i, x, p)
        a, b, _, _ = g.coef[i]
        x0 = p if denoiser.prediction == "x0" else x.mul(a).add_(p, alpha=b)
    return x0


def sample_lcm(denoiser, x, ts, **kwargs):
    """LCM multistep sampling (Luo et al. 2023 Alg. 3; handbook Alg. 5) on a discrete VP schedule.

    The same loop as :func:`sample_consistency`, for a denoiser with ``LCMPrecond``.
    """
    if not isinstance(denoiser.schedule, DiscreteVP):
        raise ValueError("the lcm sampler needs a DiscreteVP schedule; use 'consistency' otherwise")
    return sample_consistency(denoiser, x, ts, **kwargs)


def sample_trigflow(denoiser, x, ts, **kwargs):
    """sCM multistep sampling on TrigFlow (Lu & Song 2025 §2; ``x0 = cos t x - sin t sigma_d F``).

    The same loop as :func:`sample_consistency` for a TrigFlow-parameterised consistency model
    (1 or 2 steps, e.g. ``ts = [pi/2, 1.1, 0]``).
    """
    if not isinstance(denoiser.schedule, TrigFlow):
        raise ValueError("the trigflow sampler needs a TrigFlow schedule")
    return sample_consistency(denoiser, x, ts, **kwargs)


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun,
    "sde": sample_sde, "dpmpp_2m": sample_dpmpp_2m, "langevin": sample_langevin,
    "rf_euler": sample_rf_euler, "consistency": sample_consistency, "lcm": sample_lcm,
    "trigflow": sample_trigflow,
}


def prior(denoiser: DenoiserBase, shape, *, generator=None, device=None, dtype=None) -> Tensor:
    """Initial noise ``sigma_{t_max} * N(0, I)`` of ``shape`` for the denoiser's schedule."""
    return denoiser.schedule.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)


def noise_draws(sampler: str, n: int, **kwargs) -> int:
    """How many per-step noise tensors ``sampler`` draws on an ``n``-step grid (0: deterministic)."""
    if "noise" not in inspect.signature(SAMPLERS[sampler]).parameters and sampler not in ("lcm", "trigflow"):
        return 0
    if sampler == "ddim" and kwargs.get("eta", 0.0) == 0:
        return 0
    return n * int(kwargs.get("n_steps_each", 10)) if sampler == "langevin" else n


def tempered(x: Tensor, n: int, temperature: float, generator=None) -> tuple[Tensor, Tensor | None]:
    """The prior draw ``x`` and ``n`` steps of sampler noise, both scaled by ``temperature``.

    ``1`` is the model's distribution (and returns ``(x, None)``, leaving the random stream
    untouched); below 1 concentrates samples on the high-density region (IDQL's code scales its
    DDPM step noise the same way, ``ddpm_temperature``); ``0`` follows the noise-free path from
    ``x_T = 0``, a deterministic "mode" action. For a Gaussian target the probability-flow ODE
    is linear, so the samples' std scales by ``temperature``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 1.0:
        return x, None
    if n == 0:  # a deterministic sampler: only the prior scales
        return x * temperature, None
    noise = torch.randn((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return x * temperature, noise * temperature


def sample(denoiser: DenoiserBase, shape, steps: int, sampler: str = "ddim", *, cond=None,
           generator=None, device=None, clip_x0: float | None = None, grid: dict | None = None,
           temperature: float = 1.0, **kwargs) -> Tensor:
    """Draw samples of ``shape`` with ``steps`` steps of ``sampler`` (see the module table).

    ``grid`` passes options to ``schedule.timesteps`` (e.g. ``{"spacing": "trailing"}``);
    ``clip_x0`` clips the x0 prediction (``ClipX0``); ``temperature`` scales the prior and every
    step's noise (:func:`tempered`); other keywords go to the sampler.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if clip_x0 is not None:
        denoiser = ClipX0(denoiser, clip_x0)
    ts = grid_timesteps(denoiser.schedule, steps, **(grid or {}))
    x = prior(denoiser, shape, generator=generator, device=device)
    if temperature != 1.0:
        if "noise" in kwargs:
            raise ValueError("give temperature or injected noise, not both")
        if sampler == "langevin":  # its noise is per inner step, and its temperature is step_lr's business
            raise ValueError("temperature is not defined for the langevin sampler")
        x, noise = tempered(x, noise_draws(sampler, len(ts) - 1, **kwargs), temperature, generator)
        if noise is not None:
            kwargs["noise"] = noise
    return run_sampler(sampler, denoiser, x, ts, cond=cond, generator=generator, **kwargs)


def run_sampler(name: str, denoiser: DenoiserBase, x: Tensor, ts, *, cond=None, generator=None, **kwargs):
    """Run the sampler called ``name``; ``generator`` is passed only to stochastic samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]
    if _takes_generator(fn):
        kwargs["generator"] = generator
    return fn(denoiser, x, ts, cond=cond, **kwargs)


@functools.lru_cache(maxsize=None)
def _takes_generator(fn) -> bool:
    params = inspect.signature(fn).parameters
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def consistency_timesteps(schedule, n: int, **grid) -> Tensor:
    """A grid for ``n``-step consistency sampling: ``schedule.timesteps(n + 1)`` without its last
    evaluation time, which on EDM-type grids is ``sigma_min``, where ``f`` is the identity.
    Computed once per schedule and arguments (see :func:`grid_timesteps`)."""
    def compute():
        ts = schedule.timesteps(n + 1, **grid)
        return torch.cat([ts[:-2], ts[-1:]])
    return _cached_times(schedule, "consistency", n, grid, compute)


def grid_timesteps(schedule, n: int, **grid) -> Tensor:
    """``schedule.timesteps(n, **grid)``, computed once per schedule and arguments: a policy samples
    with the same grid at every environment step. The tensor is shared: clone it to change it in place."""
    return _cached_times(schedule, "timesteps", n, grid, lambda: schedule.timesteps(n, **grid))


_TIMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached_times(schedule, kind: str, n: int, grid: dict, compute: Callable[[], Tensor]) -> Tensor:
    try:
        key = (kind, n, tuple(sorted(grid.items())))
        hash(key)
    except TypeError:  # unhashable grid options: computed afresh
        return compute()
    cache = _TIMES.setdefault(schedule, {})
    ts = cache.get(key)
    if ts is None:
        if len(cache) >= _GRIDS_PER_SCHEDULE:
            cache.clear()
        with torch.inference_mode(False):
            ts = cache[key] = compute()
    return ts

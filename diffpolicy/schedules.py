"""Noise schedules: ``x_t = alpha_t * x_0 + sigma_t * eps`` (handbook §2.1 notation).

Every schedule answers the same questions, as tensors of the shape of ``t``:

* ``alpha_sigma(t)``  -> ``(alpha_t, sigma_t)``
* ``derivatives(t)``  -> ``(d alpha_t / dt, d sigma_t / dt)``
* ``timesteps(n)``    -> a descending grid of ``n + 1`` times: ``n`` network evaluations and the
  time the chain ends at (where ``sigma = 0``, or DDIM's ``final_alpha_cumprod``)
* ``sample_t(n)``     -> training times
* ``net_time(t)``     -> the time value the network sees (roughly spanning ``[0, 1000]``)

Time always runs from data (small ``t``) to noise (large ``t``). Rectified flow uses
``x_t = (1 - t) x_0 + t eps`` with noise at ``t = 1`` and velocity ``dx_t/dt = eps - x_0``;
convert other codebases' conventions at the edges (see ``parameterization``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Schedule", "DiscreteVP", "VPSDE", "VE", "EDM", "RectifiedFlow", "TrigFlow",
    "make_betas", "rescale_zero_terminal_snr", "karras_sigmas", "make_schedule", "SCHEDULES",
    "BETA_SCHEDULES", "SPACINGS",
]


def _choice(kind: str, name: str, valid) -> str:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
    return name


class Schedule:
    """Base class: subclasses define ``alpha_sigma`` and ``derivatives`` on ``[t_min, t_max]``."""

    name = "schedule"
    t_min: float = 0.0
    t_max: float = 1.0
    sigma_data: float = 1.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def net_time(self, t: Tensor) -> Tensor:
        """Network time input: ``1000 t`` for unit-interval schedules."""
        return t * 1000.0

    def timesteps(self, n: int) -> Tensor:
        """``n + 1`` uniformly spaced times from ``t_max`` down to ``t_min`` (the data end)."""
        _check_steps(n)
        return torch.linspace(self.t_max, self.t_min, n + 1, dtype=torch.float64)

    def logsnr_times(self, n: int, t_hi: float, t_lo: float) -> Tensor:
        """``n`` times from ``t_hi`` to ``t_lo`` uniform in ``lambda = log(alpha/sigma)``.

        The grid DPM-Solver recommends for few steps (Lu et al. 2022, §3.3 / App. D.1); the
        inverse of ``lambda(t)`` is read off a dense table (``alpha`` and ``sigma`` must be
        positive at both ends).
        """
        _check_steps(n)
        dense = torch.linspace(t_lo, t_hi, 20001, dtype=torch.float64)
        alpha, sigma = self.alpha_sigma(dense)
        lam = (alpha / sigma).log()  # decreasing in t
        if not bool(lam[[0, -1]].isfinite().all()):
            raise ValueError(f"a log-SNR grid needs alpha, sigma > 0 on [{t_lo}, {t_hi}] ({self.name})")
        target = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)
        idx = torch.searchsorted(-lam, -target).clamp(1, len(dense) - 1)
        lo, hi = dense[idx - 1], dense[idx]
        w = (target - lam[idx - 1]) / (lam[idx] - lam[idx - 1])
        return (lo + w * (hi - lo)).clamp(t_lo, t_hi)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training times, uniform on ``(t_min, t_max]``."""
        u = torch.rand(n, generator=generator, device=device)
        return self.t_max - u * (self.t_max - self.t_min)

    def prior_std(self) -> float:
        """Std of the initial noise ``x_{t_max} ~ N(0, sigma_{t_max}^2 I)`` used by samplers (computed once)."""
        std = self.__dict__.get("_prior_std")
        if std is None:
            std = self._prior_std = float(self.alpha_sigma(torch.tensor(self.t_max, dtype=torch.float64))[1])
        return std

    def check_t(self, t: Tensor, name: str = "t") -> Tensor:
        """Raise a ValueError naming ``name`` when any time lies outside ``[t_min, t_max]``."""
        t = torch.as_tensor(t)
        lo, hi = self.t_min, self.t_max
        if t.numel() and (bool((t < lo - 1e-6).any()) or bool((t > hi + 1e-6).any())):
            raise ValueError(
                f"{name} must lie in [{lo}, {hi}] for the {self.name} schedule; "
                f"got values in [{float(t.min())}, {float(t.max())}]"
            )
        return t

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict:
        return {}


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of sampling steps must be a positive int, got {n!r}")


# ----------------------------------------------------------------------------------------
# Discrete VP (DDPM) schedules
# ----------------------------------------------------------------------------------------

def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor(
        [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64
    )


def _vp_betas(n: int, beta_min: float = 0.1, beta_max: float = 10.0) -> Tensor:
    """Diffusion-QL's discretised VP-SDE (Wang et al. 2023, after Song et al. 2021 eq. 33)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    alpha = torch.exp(-beta_min / n - 0.5 * (beta_max - beta_min) * (2 * i - 1) / n**2)
    return 1 - alpha


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "vp")


def make_betas(name: str, n: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas of a discrete VP schedule (float64), by the names diffusers uses.

    linear: Ho et al. 2020; scaled_linear: Stable Diffusion (linear in sqrt beta);
    squaredcos_cap_v2: Nichol & Dhariwal 2021; sigmoid: GeoDiff (Xu et al. 2022);
    vp: Diffusion-QL's VP discretisation with beta_min 0.1, beta_max 10 (beta_start and
    beta_end do not apply).
    """
    _choice("beta schedule", name, BETA_SCHEDULES)
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n)
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    return _vp_betas(n)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2024, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


SPACINGS = ("leading", "linspace", "trailing", "logsnr", "quadratic", "power")


class DiscreteVP(Schedule):
    """DDPM's discrete VP schedule: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``.

    Times are the integer indices ``0 .. N-1`` of Ho et al. 2020 (eq. 4). The chain ends at
    the extra time ``-1`` whose ``abar`` is 1 (``final_alpha_one=True``, diffusers'
    ``set_alpha_to_one``) or ``abar_0``. Between integers ``abar`` is interpolated linearly, so
    ``derivatives`` are the table's finite differences (used only by the SDE/ODE samplers).
    """

    name = "discrete_vp"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False,
                 final_alpha_one: bool = True, steps_offset: int = 0):
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        self.zero_terminal_snr = zero_terminal_snr
        self.final_alpha_one = final_alpha_one
        self.steps_offset = steps_offset
        betas = make_betas(beta_schedule, self.num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        final = torch.ones(1, dtype=torch.float64) if final_alpha_one else self.alphas_cumprod[:1]
        self._abar = torch.cat([final, self.alphas_cumprod])  # index t + 1
        self.t_min, self.t_max = -1.0, float(self.num_train_timesteps - 1)

    def _config(self):
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, zero_terminal_snr=self.zero_terminal_snr,
                    final_alpha_one=self.final_alpha_one, steps_offset=self.steps_offset)

    def _abar_on(self, device) -> Tensor:
        """The cumulative-alpha table on ``device``, copied once per device (no host copy per call:
        a CUDA graph can capture the lookup)."""
        if device.type == "cpu":
            return self._abar
        tables = self.__dict__.setdefault("_abar_devices", {})
        if device not in tables:
            tables[device] = self._abar.to(device)
        return tables[device]

    def _abar_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        u = (t.double() + 1).clamp(0, self.num_train_timesteps)
        table = self._abar_on(u.device)
        i = u.floor().long().clamp(max=self.num_train_timesteps - 1)
        slope = table[i + 1] - table[i]
        abar = table[i] + (u - i) * slope
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        return abar.to(dtype), slope.to(dtype)

    def alpha_sigma(self, t):
        abar, _ = self._abar_and_slope(t)
        return abar.sqrt(), (1 - abar).clamp_min(0).sqrt()

    def derivatives(self, t):
        abar, slope = self._abar_and_slope(t)
        alpha, sigma = abar.sqrt(), (1 - abar).clamp_min(0).sqrt()
        return slope / (2 * alpha), -slope / (2 * sigma)

    def net_time(self, t):
        return t

    def timesteps(self, n: int, spacing: str = "trailing", power: float = 2.0) -> Tensor:
        """diffusers' timestep spacings (Lin et al. 2024, Table 2) followed by the end time -1.

        The default is ``"trailing"``, which starts every grid at ``N - 1`` (Lin et al. 2024
        §3.3); diffusers' DDIM default is ``"leading"``.

        Not in diffusers, rounded to integer timesteps: ``"logsnr"``, uniform in log-SNR between
        ``N - 1`` and 0, and ``"quadratic"``, ``(N - 1) u^2`` for ``u`` uniform on ``[0, 1]``
        (DPM-Solver's few-step grids, Lu et al. 2022 App. D.1); ``"power"`` is
        ``(N - 1) u^power``, the time-polynomial family the quadratic grid belongs to (a larger
        ``power`` puts more of the steps at low noise). These three grids end at timestep 0.
        """
        _check_steps(n)
        _choice("timestep spacing", spacing, SPACINGS)
        if spacing != "power" and power != 2.0:
            raise ValueError(f"power={power} only applies to spacing='power' (got spacing={spacing!r})")
        if not power > 0:
            raise ValueError(f"power must be positive, got {power}")
        N = self.num_train_timesteps
        if n > N:
            raise ValueError(f"n={n} sampling steps exceed the {N} training timesteps")
        if spacing in ("logsnr", "quadratic", "power"):
            if spacing == "logsnr":
                ts = self.logsnr_times(n, N - 1.0, 0.0).round()
            else:
                ts = ((N - 1) * torch.linspace(1, 0, n, dtype=torch.float64) ** power).round()
            for k in range(n - 2, -1, -1):  # rounding can merge the small times: keep them distinct
                ts[k] = max(ts[k], ts[k + 1] + 1)
            if ts[0] > N - 1:
                raise ValueError(f"{n} {spacing} steps do not fit into {N} timesteps; use fewer")
        elif spacing == "linspace":  # numpy arithmetic, so that .5 ties round as in diffusers
            ts = torch.from_numpy(np.linspace(0, N - 1, n).round()[::-1].copy())
        elif spacing == "leading":
            ts = torch.from_numpy((np.arange(0, n) * (N // n)).round()[::-1] + float(self.steps_offset))
        else:  # numpy's arange can yield n + 1 points here; the extra one is the end time
            ts = torch.from_numpy(np.round(np.arange(N, 0, -N / n))[:n] - 1.0)
        return torch.cat([ts, ts.new_full((1,), -1.0)])

    def sample_t(self, n, generator=None, device=None):
        """Training indices uniform on ``{0, ..., N-1}`` (as floats)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).float()

    def prior_std(self):
        return 1.0


# ----------------------------------------------------------------------------------------
# Continuous schedules
# ----------------------------------------------------------------------------------------

class VPSDE(Schedule):
    """Continuous VP-SDE (Song et al. 2021 eq. 11, 29): ``log alpha_t = -t^2 (b1 - b0)/4 - t b0/2``."""

    name = "vp_sde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_eps: float = 1e-3):
        self.beta_min, self.beta_max, self.t_eps = beta_min, beta_max, t_eps
        self.t_min, self.t_max = 0.0, 1.0

    def _config(self):
        return dict(beta_min=self.beta_min, beta_max=self.beta_max, t_eps=self.t_eps)

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t):
        t = torch.as_tensor(t)
        alpha = self._log_alpha(t).exp()
        return alpha, (-torch.expm1(2 * self._log_alpha(t))).clamp_min(0).sqrt()

    def derivatives(self, t):
        t = torch.as_tensor(t)
        alpha, sigma = self.alpha_sigma(t)
        beta = self.beta_min + t * (self.beta_max - self.beta_min)  # d log alpha/dt = -beta/2
        d_alpha = -0.5 * beta * alpha
        return d_alpha, -alpha * d_alpha / sigma

    def sample_t(self, n, generator=None, device=None):
        u = torch.rand(n, generator=generator, device=device)
        return self.t_eps + u * (1 - self.t_eps)

    def timesteps(self, n, grid: str = "uniform"):
        """``n`` times from 1 to ``t_eps`` (uniform, uniform in log-SNR, or DPM-Solver's
        time-quadratic ``t_eps + (1 - t_eps) u^2``), then 0."""
        _choice("vp_sde grid", grid, ("uniform", "logsnr", "quadratic"))
        _check_steps(n)
        if grid == "logsnr":
            ts = self.logsnr_times(n, 1.0, self.t_eps)
        elif grid == "quadratic":
            ts = self.t_eps + (1 - self.t_eps) * torch.linspace(1, 0, n, dtype=torch.float64) ** 2
        else:
            ts = torch.linspace(1.0, self.t_eps, n, dtype=torch.float64)
        return torch.cat([ts, ts.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM sigmas (Karras et al. 2022 eq. 5): (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class VE(Schedule):
    """Variance exploding: ``alpha_t = 1``, ``sigma_t = t`` (time *is* sigma, as in EDM §2).

    ``grid="geometric"`` gives NCSN's geometric sigmas (Song & Ermon 2019), ``"karras"`` EDM's.
    """

    name = "ve"
    default_grid = "geometric"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, rho: float = 7.0,
                 sigma_data: float = 1.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_data = sigma_data
        self.t_min, self.t_max = 0.0, float(sigma_max)

    def _config(self):
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho, sigma_data=self.sigma_data)

    def alpha_sigma(self, t):
        t = torch.as_tensor(t)
        return torch.ones_like(t), t.clone()

    def derivatives(self, t):
        t = torch.as_tensor(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def net_time(self, t):
        """EDM's ``c_noise = ln(sigma)/4`` (Karras et al. 2022 Table 1), times 1000."""
        return 250.0 * t.clamp_min(1e-20).log()

    def timesteps(self, n, grid: str | None = None):
        """``n`` sigmas from ``sigma_max`` to ``sigma_min`` (geometric or Karras), then 0."""
        grid = _choice("sigma grid", grid or self.default_grid, ("geometric", "karras"))
        if grid == "karras":
            s = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
        else:
            _check_steps(n)
            s = torch.logspace(math.log10(self.sigma_max), math.log10(self.sigma_min), n, dtype=torch.float64)
        return torch.cat([s, s.new_zeros(1)])

    def sample_t(self, n, generator=None, device=None):
        """Log-uniform sigmas on ``[sigma_min, sigma_max]`` (NCSN's noise-level sampling)."""
        u = torch.rand(n, generator=generator, device=device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u


class EDM(VE):
    """EDM (Karras et al. 2022): VE with Karras sigmas and log-normal training sigmas (Table 1)."""

    name = "edm"
    default_grid = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__(sigma_min, sigma_max, rho, sigma_data)
        self.p_mean, self.p_std = p_mean, p_std

    def sample_t(self, n, generator=None, device=None):
        """``ln sigma ~ N(P_mean, P_std^2)`` (Karras et al. 2022 Table 1)."""
        z = torch.randn(n, generator=generator, device=device)
        return (self.p_mean + self.p_std * z).exp()


class RectifiedFlow(Schedule):
    """Rectified flow / linear interpolant (Liu et al. 2023): ``alpha_t = 1 - t``, ``sigma_t = t``.

    Noise at ``t = 1``; the velocity is ``dx_t/dt = eps - x_0``. ``time_sampling="logit_normal"``
    draws ``t = sigmoid(N(m, s^2))`` (Esser et al. 2024 eq. 19); ``t_eps`` clips times away
    from the data end.
    """

    name = "rectified_flow"

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, t_eps: float = 1e-3, shift: float = 1.0):
        self.time_sampling = _choice("time sampling", time_sampling, ("uniform", "logit_normal"))
        self.logit_mean, self.logit_std, self.t_eps = logit_mean, logit_std, t_eps
        self.shift = shift
        self.t_min, self.t_max = 0.0, 1.0

    def _config(self):
        return dict(time_sampling=self.time_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                    t_eps=self.t_eps, shift=self.shift)

    def alpha_sigma(self, t):
        t = torch.as_tensor(t)
        return 1 - t, t.clone()

    def derivatives(self, t):
        t = torch.as_tensor(t)
        return -torch.ones_like(t), torch.ones_like(t)

    def sample_t(self, n, generator=None, device=None):
        if self.time_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        else:
            t = torch.rand(n, generator=generator, device=device)
        return t.clamp(self.t_eps, 1.0)

    def timesteps(self, n):
        """Uniform grid, optionally shifted ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024 §5.3.2)."""
        t = super().timesteps(n)
        return self.shift * t / (1 + (self.shift - 1) * t)


class TrigFlow(Schedule):
    """TrigFlow (Lu & Song 2025 eq. 5): ``x_t = cos(t) x_0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``.

    In our notation ``alpha_t = cos t`` and ``sigma_t = sigma_d sin t`` on ``t in [0, pi/2]``.
    Training times follow ``t = arctan(exp(tau) / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4,
                 t_max: float = math.pi / 2):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.t_min, self.t_max = 0.0, float(t_max)

    def _config(self):
        return dict(sigma_data=self.sigma_data, p_mean=self.p_mean, p_std=self.p_std, t_max=self.t_max)

    def alpha_sigma(self, t):
        t = torch.as_tensor(t)
        return t.cos().clamp_min(0), self.sigma_data * t.sin()  # float32(pi/2) > pi/2

    def derivatives(self, t):
        t = torch.as_tensor(t)
        return -t.sin(), self.sigma_data * t.cos()

    def net_time(self, t):
        return t * (2000.0 / math.pi)

    def sample_t(self, n, generator=None, device=None):
        tau = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return torch.atan(tau.exp() / self.sigma_data)

    def timesteps(self, n, grid: str = "uniform"):
        """Uniform in ``t``, or EDM's Karras sigmas mapped by ``t = arctan(sigma / sigma_d)``."""
        _choice("trigflow grid", grid, ("uniform", "karras"))
        if grid == "uniform":
            return super().timesteps(n)
        s = karras_sigmas(n, 0.002, 80.0)
        t = torch.atan(s / self.sigma_data).clamp(max=self.t_max)
        return torch.cat([t, t.new_zeros(1)])


SCHEDULES = {
    "discrete_vp": DiscreteVP,
    "vp_sde": VPSDE,
    "ve": VE,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
    "trigflow": TrigFlow,
}


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name; an unknown name raises a ValueError listing the valid ones."""
    return SCHEDULES[_choice("schedule", name, SCHEDULES)](**kwargs)

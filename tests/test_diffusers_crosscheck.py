"""Cross-checks of the discrete VP (DDPM) core against Hugging Face diffusers.

Covered: beta schedules and ``alphas_cumprod`` (with and without zero terminal SNR), the forward
process (``add_noise``), the v target (``get_velocity``), the timestep spacings, single DDIM
steps and full DDIM loops (eta 0 / 0.5 / 1; eps, x0 and v predictions) with injected noise,
and a full-length DDPM chain (fixed small / fixed large variance) with the noise diffusers
draws replaced by ours.

diffusers keeps its tables in float32 while we use float64; tolerances below are set by that
float32 arithmetic and say so where they are looser than 1e-6.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402
from diffusers.schedulers.scheduling_ddim import (  # noqa: E402
    rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr,
)

from diffpolicy.denoiser import Denoiser  # noqa: E402
from diffpolicy.parameterization import from_x0_eps  # noqa: E402
from diffpolicy.samplers import ddim_std, sample_ddim, sample_ddpm  # noqa: E402
from diffpolicy.schedules import DiscreteVP, make_betas  # noqa: E402

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
# diffusers' prediction_type -> ours
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _beta_range(beta_schedule):
    """Stable Diffusion's range for scaled_linear, DDPM's (the defaults) otherwise."""
    return dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == "scaled_linear" else {}


def _pair(N=1000, beta_schedule="linear", zero_snr=False, final_alpha_one=True, steps_offset=0, **ddim_kwargs):
    """Our DiscreteVP and the equivalent diffusers DDIMScheduler (no sample clipping)."""
    rng = _beta_range(beta_schedule)
    ours = DiscreteVP(N, beta_schedule, zero_terminal_snr=zero_snr, final_alpha_one=final_alpha_one,
                      steps_offset=steps_offset, **rng)
    theirs = DDIMScheduler(num_train_timesteps=N, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                           set_alpha_to_one=final_alpha_one, clip_sample=False, steps_offset=steps_offset,
                           **rng, **ddim_kwargs)
    return ours, theirs


def _use_float64_tables(sched, ours):
    """Give a diffusers scheduler our float64 tables, so that its step / add_noise formulas run
    in float64 and can be compared with ours at ~1e-12 (the tables themselves are compared with
    diffusers' float32 ones in ``test_betas_and_alphas_cumprod_match_diffusers``)."""
    sched.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM
        sched.final_alpha_cumprod = ours._abar[0].clone()
    if hasattr(sched, "one"):  # DDPM
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


# tolerances (rtol, atol) with diffusers' own float32 tables, and with our float64 tables
_TOL = {"float32": (1e-5, 1e-5), "float64": (1e-10, 1e-10)}


class _Net:
    """A fixed, deterministic network ``net(x, t, cond)`` (plain python, no parameters to train).

    A random linear map of ``x`` squashed by tanh plus a smooth function of ``t``: nonlinear in
    both arguments, so any mismatch in the time a step evaluates at, or in the order of steps,
    changes the result.
    """

    def __init__(self, dim=3, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        self.calls.append(t[0, 0].item())
        W, b = self.W.to(x.dtype), self.b.to(x.dtype)
        return torch.tanh(x @ W + 0.5 * b) + 0.3 * torch.sin(t / 150.0 + b)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------
# 1. Beta schedules and alphas_cumprod
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [1000, 50])
@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule, zero_snr, N):
    rng = _beta_range(beta_schedule)
    ours = DiscreteVP(N, beta_schedule, zero_terminal_snr=zero_snr, **rng)
    schedulers = [DDPMScheduler(num_train_timesteps=N, beta_schedule=beta_schedule,
                                rescale_betas_zero_snr=zero_snr, **rng)]
    if beta_schedule != "sigmoid":  # DDIMScheduler implements every schedule but sigmoid
        schedulers.append(DDIMScheduler(num_train_timesteps=N, beta_schedule=beta_schedule,
                                        rescale_betas_zero_snr=zero_snr, **rng))
    for sched in schedulers:
        assert sched.betas.dtype == torch.float32
        betas, abar = sched.betas.double(), sched.alphas_cumprod.double()
        assert ours.betas.shape == betas.shape == ours.alphas_cumprod.shape == (N,)
        if zero_snr:
            # float32 rescaling cancels sqrt(abar_t) - sqrt(abar_T) near the end (measured up to
            # 7e-6 absolute on betas); the float64 identity is checked exactly just below.
            torch.testing.assert_close(ours.betas, betas, rtol=0, atol=1e-5)
            assert ours.alphas_cumprod[-1] == 0 and sched.alphas_cumprod[-1] == 0
            assert ours.betas[-1] == 1 and sched.betas[-1] == 1
        else:
            torch.testing.assert_close(ours.betas, betas, rtol=1e-6, atol=0)
        # a float32 cumprod of N factors accumulates up to ~N ulps of relative error (measured
        # up to 1.3e-5 at the cosine schedule's 2e-9 tail, 3.8e-5 with zero terminal SNR)
        torch.testing.assert_close(ours.alphas_cumprod, abar, rtol=5e-5, atol=1e-7)
    if zero_snr:  # same algorithm: diffusers' own rescaling function run in float64
        expected = diffusers_rescale_zero_terminal_snr(make_betas(beta_schedule, N, **rng))
        assert expected.dtype == torch.float64
        torch.testing.assert_close(ours.betas, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.alphas_cumprod, torch.cumprod(1 - expected, 0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("final_alpha_one", [True, False])
def test_end_time_is_final_alpha_cumprod(final_alpha_one):
    ours, theirs = _pair(100, final_alpha_one=final_alpha_one)
    alpha, sigma = ours.alpha_sigma(torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(alpha**2, theirs.final_alpha_cumprod.double().reshape(1), rtol=1e-6, atol=0)
    # 1 - abar in float32 near abar = 1 is only good to an ulp of 1 (6e-8)
    torch.testing.assert_close(sigma**2, 1 - theirs.final_alpha_cumprod.double().reshape(1), rtol=0, atol=1e-7)
    if not final_alpha_one:  # 1 - abar_0 = beta_0
        torch.testing.assert_close(sigma**2, theirs.betas[:1].double(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------
# 2-3. Forward process and the v target
# ----------------------------------------------------------------------------------------

_TABLES = [("linear", False, 1000), ("scaled_linear", False, 1000), ("squaredcos_cap_v2", False, 1000),
           ("sigmoid", False, 50), ("linear", True, 1000), ("scaled_linear", True, 50)]


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("beta_schedule,zero_snr,N", _TABLES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, zero_snr, N, tables):
    rng = _beta_range(beta_schedule)
    ours = DiscreteVP(N, beta_schedule, zero_terminal_snr=zero_snr, **rng)
    sched = DDPMScheduler(num_train_timesteps=N, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr, **rng)
    dtype = torch.float32
    if tables == "float64":
        _use_float64_tables(sched, ours)
        dtype = torch.float64
    B = 64
    g = torch.Generator().manual_seed(3)
    timesteps = torch.randint(0, N, (B,), generator=g)
    timesteps[:2] = torch.tensor([0, N - 1])  # both ends of the table
    x0, noise = torch.randn(B, 3, 2, generator=g).to(dtype), torch.randn(B, 3, 2, generator=g).to(dtype)

    alpha, sigma = ours.alpha_sigma(timesteps.double())
    alpha, sigma = alpha.view(B, 1, 1), sigma.view(B, 1, 1)
    xt_ours = (alpha * x0.double() + sigma * noise.double()).to(dtype)
    v_ours = from_x0_eps("v", x0.double(), noise.double(), alpha, sigma).to(dtype)

    xt_theirs = sched.add_noise(x0, noise, timesteps)
    v_theirs = sched.get_velocity(x0, noise, timesteps)
    assert xt_theirs.dtype == v_theirs.dtype == dtype
    if tables == "float32":
        # sqrt(1 - abar) from a float32 abar near 1 is off by up to ~3e-8 / sigma (measured
        # 5.6e-6 absolute at t = 0 of the zero-SNR table): atol 1e-5
        rtol, atol = 1e-5, 1e-5
    else:
        rtol, atol = _TOL["float64"]
    torch.testing.assert_close(xt_ours, xt_theirs, rtol=rtol, atol=atol)
    torch.testing.assert_close(v_ours, v_theirs, rtol=rtol, atol=atol)
    # sanity: the targets are not trivially the inputs
    assert not torch.allclose(v_theirs, noise, atol=1e-2) and not torch.allclose(xt_theirs, x0, atol=1e-2)


# ----------------------------------------------------------------------------------------
# 4. Timestep spacings
# ----------------------------------------------------------------------------------------

def _diffusers_timesteps(N, n, spacing, steps_offset=0):
    sched = DDIMScheduler(num_train_timesteps=N, timestep_spacing=spacing, steps_offset=steps_offset)
    sched.set_timesteps(n)
    return sched.timesteps


_SPACING_CASES = [
    *[(1000, n, sp, 0) for sp in ("leading", "linspace", "trailing") for n in (1, 7, 10, 25, 50, 100, 1000)],
    *[(50, n, sp, 0) for sp in ("leading", "linspace", "trailing") for n in (7, 10, 25, 50)],
    *[(1000, n, "leading", 1) for n in (7, 10, 25, 50)],
    (50, 20, "leading", 1),
]


@pytest.mark.parametrize("N,n,spacing,steps_offset", _SPACING_CASES)
def test_timestep_spacing_matches_diffusers(N, n, spacing, steps_offset):
    ts = DiscreteVP(N, steps_offset=steps_offset).timesteps(n, spacing=spacing)
    assert ts.dtype == torch.float64 and ts[-1] == -1
    expected = _diffusers_timesteps(N, n, spacing, steps_offset)
    assert ts[:-1].tolist() == expected.tolist()
    assert len(ts) == n + 1


@pytest.mark.parametrize("N,spacing,steps_offset", [
    *[(N, sp, 0) for N in (1000, 50) for sp in ("leading", "linspace", "trailing")], (50, "leading", 1)])
def test_timestep_spacing_scan_against_diffusers(N, spacing, steps_offset):
    """Every n in 1..N gives diffusers' grid exactly (numpy arithmetic, so .5 ties agree).
    Where diffusers' trailing grid has an (n+1)-th entry -1 (see below), ours ends at the end
    time -1 after n evaluation times instead."""
    ours_sched = DiscreteVP(N, steps_offset=steps_offset)
    sched = DDIMScheduler(num_train_timesteps=N, timestep_spacing=spacing, steps_offset=steps_offset)
    for n in range(1, N + 1):
        sched.set_timesteps(n)
        theirs = sched.timesteps.tolist()
        ours = [int(v) for v in ours_sched.timesteps(n, spacing=spacing)[:-1].tolist()]
        assert ours == theirs[:n], n
        assert len(theirs) == n or (len(theirs) == n + 1 and theirs[-1] == -1), n


@pytest.mark.parametrize("N,n", [(1000, 61), (50, 29)])
def test_diffusers_trailing_grid_can_have_n_plus_one_steps(N, n):
    """diffusers' quirk, for reference: ``arange(N, 0, -N/n)`` has n + 1 entries when N / (N/n)
    rounds above n, so diffusers' grid ends with a timestep -1 (its DDIM then reads
    alphas_cumprod[-1], the pure-noise end of the table)."""
    expected = _diffusers_timesteps(N, n, "trailing")
    assert len(expected) == n + 1 and expected[-1] == -1


@pytest.mark.parametrize("N,n", [(1000, 61), (50, 29)])
def test_trailing_grid_has_n_plus_one_decreasing_times(N, n):
    ts = DiscreteVP(N).timesteps(n, spacing="trailing")
    assert len(ts) == n + 1 and bool((ts[1:] < ts[:-1]).all()), f"{len(ts)} times, ending {ts[-4:].tolist()}"


# ----------------------------------------------------------------------------------------
# 5. DDIM
# ----------------------------------------------------------------------------------------

def _diffusers_ddim_step(sched, net, x, t, eta, z):
    out = net(x, torch.full((x.shape[0],), float(t)))
    return sched.step(out, int(t), x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample


def _ddim_setup(tables, N, beta_schedule, **kwargs):
    ours, sched = _pair(N, beta_schedule, **kwargs)
    if tables == "float64":
        _use_float64_tables(sched, ours)
        return ours, sched, torch.float64
    return ours, sched, torch.float32


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("final_alpha_one", [True, False], ids=["alpha_one", "alpha_0"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
def test_ddim_step_matches_diffusers(prediction_type, eta, final_alpha_one, tables):
    N, n = 1000, 10
    ours, sched, dtype = _ddim_setup(tables, N, "scaled_linear", final_alpha_one=final_alpha_one,
                                     prediction_type=prediction_type)
    sched.set_timesteps(n)
    den = Denoiser(_Net(), ours, PREDICTIONS[prediction_type])
    rtol, atol = _TOL[tables]
    # the top, a step onto t = 0, a step from t < N // n to the end, and the step from 0 to the end
    for t in (999, 100, 37, 0):
        prev_t = t - N // n
        x, z = _randn(6, 3, seed=t, dtype=dtype), _randn(6, 3, seed=t + 1, dtype=dtype)
        expected = _diffusers_ddim_step(sched, den.net, x, t, eta, z)
        assert expected.dtype == dtype

        ts = torch.tensor([t, prev_t if prev_t >= 0 else -1], dtype=torch.float64)
        den.net.calls.clear()
        got = sample_ddim(den, x, ts, eta=eta, noise=z[None])
        assert den.net.calls == [float(t)]  # the network sees the integer index
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"t={t}: {m}")
        if t == 0 and not final_alpha_one:  # a step from abar_0 to abar_0 leaves x where it is
            torch.testing.assert_close(got, x, rtol=rtol, atol=atol)
        else:
            assert not torch.allclose(got, x, atol=1e-3)


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("final_alpha_one,steps_offset", [(True, 0), (False, 0), (True, 1)],
                         ids=["alpha_one", "alpha_0", "alpha_one-offset1"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
def test_ddim_loop_matches_diffusers(prediction_type, eta, final_alpha_one, steps_offset, tables):
    N, n = 1000, 10
    ours, sched, dtype = _ddim_setup(tables, N, "linear", final_alpha_one=final_alpha_one,
                                     steps_offset=steps_offset, prediction_type=prediction_type)
    sched.set_timesteps(n)
    ts = ours.timesteps(n, spacing="leading")
    assert ts[:-1].tolist() == sched.timesteps.tolist()
    net = _Net()
    x_T, noise = _randn(5, 3, seed=7, dtype=dtype), _randn(n, 5, 3, seed=8, dtype=dtype)

    x = x_T
    for i, t in enumerate(sched.timesteps):
        x = _diffusers_ddim_step(sched, net, x, t, eta, noise[i])
    expected, their_calls = x, list(net.calls)

    net.calls.clear()
    got = sample_ddim(Denoiser(net, ours, PREDICTIONS[prediction_type]), x_T, ts, eta=eta, noise=noise)
    assert net.calls == their_calls
    rtol, atol = _TOL[tables]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trailing_zero_snr_v_loop_matches_diffusers(eta, tables):
    """Lin et al. 2024's recipe: zero terminal SNR, trailing spacing, v prediction (the first
    step is at abar = 0, where only v and x0 predictions can be converted)."""
    N, n = 1000, 10

    def diffusers_loop(tables):
        ours, sched, dtype = _ddim_setup(tables, N, "scaled_linear", zero_snr=True, prediction_type="v_prediction",
                                         timestep_spacing="trailing")
        sched.set_timesteps(n)
        x_T, noise = _randn(5, 3, seed=9, dtype=dtype), _randn(n, 5, 3, seed=10, dtype=dtype)
        x = x_T
        for i, t in enumerate(sched.timesteps):
            x = _diffusers_ddim_step(sched, net, x, t, eta, noise[i])
        return ours, sched, x_T, noise, x

    net = _Net(seed=4)
    ours, sched, x_T, noise, x = diffusers_loop(tables)
    ts = ours.timesteps(n, spacing="trailing")
    assert ts[:-1].tolist() == sched.timesteps.tolist() and ts[0] == N - 1
    got = sample_ddim(Denoiser(net, ours, "v"), x_T, ts, eta=eta, noise=noise)
    assert torch.isfinite(got).all()
    rtol, atol = _TOL[tables]
    if tables == "float32":
        # diffusers' float32 zero-SNR table is off by up to 1e-6 in abar (see the table test);
        # through the eta = 1 noise std that reaches 6e-5 here, and 1e-15 with float64 tables
        rtol, atol = 1e-4, 1e-4
        if not torch.isfinite(x).all():
            # At the first step (abar = 0) sigma^2 = 1 - abar_prev exactly, and diffusers takes
            # sqrt(1 - abar_prev - sigma^2) unclamped: with its float32 table's last bits (which
            # follow the CPU's MKL kernels) that can round to -6e-8 and give NaN. Only its own
            # rounding is at fault: the reference is then its loop on float64 tables.
            t0, t1 = int(sched.timesteps[0]), int(sched.timesteps[1])
            sigma = eta * sched._get_variance(t0, t1) ** 0.5
            assert 1 - sched.alphas_cumprod[t1] - sigma**2 < 0
            x = diffusers_loop("float64")[-1].float()
    torch.testing.assert_close(got, x, rtol=rtol, atol=atol)


@pytest.mark.parametrize("spacing,n", [("linspace", 10), ("trailing", 7)])
def test_ddim_non_leading_spacing_differs_by_design(spacing, n):
    """By design we step along the grid itself. diffusers' DDIMScheduler.step always goes to
    ``t - N // n`` (diffusers issues #11347, #12633), which is not the next grid time for
    linspace (999 -> 899, then evaluates at 888) or for trailing with N % n != 0; its
    DDPMScheduler looks the next time up, as we do. Assert both halves: diffusers' loop equals
    our DDIM on its actual (t, t - N // n) pairs, and differs from our DDIM on the grid."""
    N = 1000
    ours, sched, dtype = _ddim_setup("float64", N, "linear", timestep_spacing=spacing)
    sched.set_timesteps(n)
    ts = ours.timesteps(n, spacing=spacing)
    assert ts[:-1].tolist() == sched.timesteps.tolist()
    net = _Net()
    x_T = _randn(5, 3, seed=13, dtype=dtype)
    x, x_pairs = x_T, x_T
    den = Denoiser(net, ours, "eps")
    for t in sched.timesteps:
        x = _diffusers_ddim_step(sched, net, x, t, 0.0, None)
        prev_t = int(t) - N // n
        x_pairs = sample_ddim(den, x_pairs, torch.tensor([float(t), max(prev_t, -1)], dtype=torch.float64))
    torch.testing.assert_close(x_pairs, x, rtol=1e-10, atol=1e-10)
    on_grid = sample_ddim(den, x_T, ts)
    assert (on_grid - x).abs().max() > 1.0


# ----------------------------------------------------------------------------------------
# 6. DDPM
# ----------------------------------------------------------------------------------------

_DDPM_BETAS = dict(beta_start=1e-3, beta_end=0.2)  # 20 steps that reach abar ~ 0.13


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_variance_matches_diffusers(variance, tables):
    N = 20
    ours = DiscreteVP(N, "linear", **_DDPM_BETAS)
    sched = DDPMScheduler(num_train_timesteps=N, variance_type=f"fixed_{variance}", clip_sample=False, **_DDPM_BETAS)
    if tables == "float64":
        _use_float64_tables(sched, ours)
    sched.set_timesteps(N)
    ts = ours.timesteps(N)
    alpha, sigma = ours.alpha_sigma(ts)
    for i in range(N - 1):  # t = 19 .. 1; diffusers adds no noise at t = 0
        t = int(ts[i])
        at, st, as_, ss = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if variance == "small":
            var = ddim_std(at, st, as_, ss, 1.0) ** 2
        else:  # what sample_ddim(_variance="large") uses: beta_t
            var = st**2 - (at / as_) ** 2 * ss**2
        # float32: 1 - abar_{t-1} at t = 1 is 1e-3 from a float32 abar near 1 (measured 1.4e-5 relative)
        rtol = 1e-4 if tables == "float32" else 1e-10
        torch.testing.assert_close(var, sched._get_variance(t).double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("tables", ["float32", "float64"])
@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_chain_matches_diffusers(variance, prediction_type, tables, monkeypatch):
    N = 20
    ours = DiscreteVP(N, "linear", **_DDPM_BETAS)
    sched = DDPMScheduler(num_train_timesteps=N, variance_type=f"fixed_{variance}", clip_sample=False,
                          prediction_type=prediction_type, **_DDPM_BETAS)
    dtype = torch.float32
    if tables == "float64":
        _use_float64_tables(sched, ours)
        dtype = torch.float64
    sched.set_timesteps(N)
    ts = ours.timesteps(N)
    assert ts[:-1].tolist() == sched.timesteps.tolist() == list(range(N - 1, -1, -1))

    x_T, noise = _randn(4, 3, seed=11, dtype=dtype), _randn(N, 4, 3, seed=12, dtype=dtype)
    drawn = []

    def injected_randn(shape, generator=None, device=None, dtype=None, **kwargs):
        drawn.append(tuple(shape))
        return noise[len(drawn) - 1].to(dtype=dtype).reshape(shape)

    # DDPMScheduler.step calls the randn_tensor it imported into its own module
    assert scheduling_ddpm.randn_tensor is diffusers.utils.torch_utils.randn_tensor
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", injected_randn)

    net = _Net(seed=5)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(net(x, torch.full((x.shape[0],), float(t))), t, x).prev_sample
    expected = x
    assert expected.dtype == dtype
    assert drawn == [tuple(x_T.shape)] * (N - 1)  # no noise on the last step (t = 0)

    den = Denoiser(net, ours, PREDICTIONS[prediction_type])
    got = sample_ddpm(den, x_T, ts, variance=variance, noise=noise)
    rtol, atol = _TOL[tables]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    # the injected noise is used step for step: the last one (step into sigma = 0) is unused,
    # changing the first one changes the result
    noise2 = noise.clone()
    noise2[-1] += 1.0
    torch.testing.assert_close(sample_ddpm(den, x_T, ts, variance=variance, noise=noise2), got)
    noise2[0] += 1.0
    assert not torch.allclose(sample_ddpm(den, x_T, ts, variance=variance, noise=noise2), got, atol=1e-3)

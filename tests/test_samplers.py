"""Every sampler on a Gaussian toy whose exact denoiser is known in closed form."""
import math

import pytest
import torch

from diffpolicy import schedules as S
from diffpolicy.samplers import SAMPLERS, prior, run_sampler, sample, sample_ddim, sample_rf_euler
from diffpolicy.toys import GaussianMixtureDenoiser
from gaussian_toy import COV, MU, N, GaussianFlowMap, moments_ok as _moments_ok

SCHEDS = {"dvp": S.DiscreteVP(1000, "linear"), "vpsde": S.VPSDE(), "edm": S.EDM(),
          "rf": S.RectifiedFlow(), "trig": S.TrigFlow()}
KINDS = {"dvp": "eps", "vpsde": "v", "edm": "x0", "rf": "rf_velocity", "trig": "trigflow"}
STEPS = {"ddpm": 200, "sde": 200, "ddim": 50, "euler": 100, "heun": 30, "dpmpp_2m": 30, "rf_euler": 50}


@pytest.mark.parametrize("sampler", list(STEPS))
@pytest.mark.parametrize("sched_name", list(SCHEDS))
def test_sampler_matches_gaussian_moments(sampler, sched_name):
    sched = SCHEDS[sched_name]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction=KINDS[sched_name])
    grid = {}
    if sampler == "dpmpp_2m":  # DPM-Solver's recommended few-step grid where log-SNR is finite
        grid = {"dvp": {"spacing": "logsnr"}, "vpsde": {"grid": "logsnr"}}.get(sched_name, {})
    ts = sched.timesteps(STEPS[sampler], **grid)
    if sampler == "sde" and sched_name in ("rf", "trig"):  # the reverse SDE is singular at alpha = 0
        ts = torch.cat([ts[:1] - 1e-3, ts[1:]])
    g = torch.Generator().manual_seed(1)
    x = prior(den, (N, 2), generator=g)
    out = run_sampler(sampler, den, x, ts, generator=g)
    _moments_ok(out)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("sched_name", ["dvp", "edm", "rf"])
def test_deterministic_samplers_converge_to_exact_flow_map(sampler, sched_name):
    """Same start x_T, growing step count: the error to the exact PF-ODE solution shrinks."""
    sched = SCHEDS[sched_name]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction=KINDS[sched_name])
    x = prior(den, (256, 2), generator=torch.Generator().manual_seed(2))
    t0 = sched.timesteps(4)[0]
    assert all(float(sched.timesteps(n)[0]) == float(t0) for n in (16, 64))
    exact = GaussianFlowMap(sched)(x, t0.float().expand(256))
    errs = [(run_sampler(sampler, den, x, sched.timesteps(n)) - exact).abs().mean().item() for n in (4, 16, 64)]
    assert errs[2] < errs[1] and errs[2] < errs[0], errs
    assert errs[2] < 0.1 * errs[0] and errs[2] < 0.05, errs
    order = math.log2(errs[1] / errs[2]) / 2  # 16 -> 64 steps
    if sampler in ("heun", "dpmpp_2m") and sched_name != "rf":
        assert order > 1.6, (order, errs)  # second-order methods
    elif sampler in ("ddim", "euler"):
        assert order < 1.3, (order, errs)  # first-order methods


def test_stochastic_samplers_with_injected_noise_are_reproducible():
    sched = SCHEDS["dvp"]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    x = torch.randn(8, 2)
    noise = torch.randn(20, 8, 2)
    for name in ("ddpm", "sde"):
        a = SAMPLERS[name](den, x, sched.timesteps(20), noise=noise)
        b = SAMPLERS[name](den, x, sched.timesteps(20), noise=noise)
        assert torch.equal(a, b)
        c = SAMPLERS[name](den, x, sched.timesteps(20), noise=noise * 0.5)
        assert not torch.allclose(a, c)


def test_ddpm_large_variance_differs_but_matches_moments():
    sched = SCHEDS["vpsde"]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    g = torch.Generator().manual_seed(3)
    x = prior(den, (N, 2), generator=g)
    out = run_sampler("ddpm", den, x, sched.timesteps(300), variance="large", generator=g)
    _moments_ok(out, cov_tol=0.08)
    with pytest.raises(ValueError, match="small, large"):
        run_sampler("ddpm", den, x, sched.timesteps(3), variance="huge")


def test_annealed_langevin_on_ve():
    sched = S.VE(0.05, 10.0)
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    g = torch.Generator().manual_seed(4)
    ts = sched.timesteps(30)
    x = prior(den, (N, 2), generator=g)
    out = run_sampler("langevin", den, x, ts, n_steps_each=20, step_lr=0.5 * 0.05**2, generator=g)
    _moments_ok(out)


@pytest.mark.parametrize("sched_name", ["dvp", "vpsde", "edm", "rf", "trig"])
def test_rf_euler_forms_equal_ddim(sched_name):
    """handbook §2.4.5: DDIM is Euler on the straight path; the three step forms agree."""
    sched = SCHEDS[sched_name]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction=KINDS[sched_name])
    x = prior(den, (64, 2), generator=torch.Generator().manual_seed(5)).double()
    ts = sched.timesteps(7)
    if sched_name in ("rf", "trig"):  # the eps form divides by 1 - r, zero where alpha = 0
        ts = torch.cat([ts[:1] - 1e-2, ts[1:]])
    ref = sample_ddim(den, x, ts)
    for form in ("velocity", "x0", "eps"):
        torch.testing.assert_close(sample_rf_euler(den, x, ts, form=form), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,sched", [("consistency", S.EDM()), ("lcm", S.DiscreteVP()), ("trigflow", S.TrigFlow())])
@pytest.mark.parametrize("steps", [1, 3])
def test_consistency_samplers_with_exact_consistency_function(name, sched, steps):
    den = GaussianFlowMap(sched)
    g = torch.Generator().manual_seed(6)
    x = prior(den, (N, 2), generator=g)
    ts = sched.timesteps(steps)
    _moments_ok(run_sampler(name, den, x, ts, generator=g))


def test_lcm_and_trigflow_check_schedule():
    with pytest.raises(ValueError, match="DiscreteVP"):
        run_sampler("lcm", GaussianFlowMap(S.EDM()), torch.zeros(2, 2), S.EDM().timesteps(2))
    with pytest.raises(ValueError, match="TrigFlow"):
        run_sampler("trigflow", GaussianFlowMap(S.EDM()), torch.zeros(2, 2), S.EDM().timesteps(2))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_propagate_gradients(name):
    """No no_grad inside: Diffusion-QL / DRaFT backpropagate through the chain."""
    from diffpolicy import Denoiser
    sched = S.TrigFlow() if name == "trigflow" else S.DiscreteVP(1000)
    net = torch.nn.Linear(2, 2)
    den = Denoiser(lambda x, t, c: net(x), sched, "x0" if name in ("consistency", "lcm", "trigflow") else "eps")
    ts = sched.timesteps(5)
    if name == "trigflow":
        ts = torch.cat([ts[:1] - 0.01, ts[1:]])
    out = run_sampler(name, den, torch.randn(4, 2), ts)
    out.sum().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_grid_cache_made_in_inference_mode_serves_autograd_later():
    from diffpolicy import Denoiser
    sched = S.DiscreteVP(1000)
    net = torch.nn.Linear(2, 2)
    den = Denoiser(lambda x, t, c: net(x), sched, "eps")
    with torch.inference_mode():
        sample_ddim(den, torch.randn(3, 2), sched.timesteps(4))
    sample_ddim(den, torch.randn(3, 2), sched.timesteps(4)).sum().backward()
    assert net.weight.grad is not None


def test_low_precision_samples_keep_float32_times():
    seen = []
    from diffpolicy import Denoiser
    sched = S.DiscreteVP(1000)
    den = Denoiser(lambda x, t, c: (seen.append(t), torch.zeros_like(x))[1], sched, "eps")
    sample_ddim(den, torch.randn(2, 2, dtype=torch.bfloat16), sched.timesteps(3))
    assert seen[0].dtype == torch.float32 and float(seen[0][0]) == 999.0


def test_dpmpp_10_steps_matches_ddim_50_on_the_exact_gaussian():
    """The demo's claim on a toy with a known denoiser: DPM-Solver++(2M) at 10 NFE is at least as
    close to the target moments as DDIM at 50 NFE (log-SNR grid for DPM-Solver, default for DDIM)."""
    sched = S.VPSDE()
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    x = prior(den, (20000, 2), generator=torch.Generator().manual_seed(7))
    err = lambda out: float((torch.cov(out.T) - COV[0]).abs().max() + (out.mean(0) - MU[0]).abs().max())
    dpm = err(run_sampler("dpmpp_2m", den, x, sched.timesteps(10, grid="logsnr")))
    ddim = err(run_sampler("ddim", den, x, sched.timesteps(50)))
    assert dpm <= ddim, (dpm, ddim)


def test_callback_and_sample_entry_point():
    sched = S.EDM()
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="x0")
    seen = []
    out = sample(den, (16, 2), 5, "heun", generator=torch.Generator().manual_seed(0),
                 callback=lambda d: seen.append(d["i"]))
    assert out.shape == (16, 2) and seen == [0, 1, 2, 3, 4]
    clipped = sample(den, (64, 2), 5, "ddim", clip_x0=0.2, generator=torch.Generator().manual_seed(0))
    assert clipped.abs().max() <= 0.2 + 1e-5


def test_bad_inputs_name_the_argument():
    sched = S.DiscreteVP()
    den = GaussianMixtureDenoiser(sched, MU, COV)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="valid: ddpm, ddim"):
        sample(den, (4, 2), 5, "plms")
    with pytest.raises(ValueError, match="cond has batch size 3"):
        sample_ddim(den, x, sched.timesteps(3), cond=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_ddim(den, x, sched.timesteps(3), eta=1.0, noise=torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(den, x, torch.tensor([10.0, 20.0]))
    with pytest.raises(ValueError, match="ts must lie"):
        sample_ddim(den, x, torch.tensor([5000.0, -1.0]))
    rf = S.RectifiedFlow()
    with pytest.raises(ValueError, match="cannot be converted at t=1"):
        sample_ddim(GaussianMixtureDenoiser(rf, MU, COV, prediction="eps"), x, rf.timesteps(3))
    with pytest.raises(ValueError, match="singular"):
        run_sampler("sde", GaussianMixtureDenoiser(rf, MU, COV, prediction="rf_velocity"), x, rf.timesteps(3))
    with pytest.raises(ValueError, match="eps form"):
        sample_rf_euler(GaussianMixtureDenoiser(rf, MU, COV, prediction="rf_velocity"), x, rf.timesteps(3), form="eps")


def test_temperature_scales_an_exact_gaussian_flow_and_zero_is_deterministic():
    """With a Gaussian's exact denoiser every DDIM step is affine in x, so the whole sampler is an
    affine map of the prior draw: a prior scaled by T lands at ``x(0) + T (x(1) - x(0))`` for the
    same draw (covariance T^2 Sigma). T = 0 is the noise-free path; T = 1 leaves the random stream
    exactly as without it."""
    sched = SCHEDS["dvp"]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    draw = lambda sampler, t, seed: sample(den, (N, 2), 50, sampler, temperature=t,  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed)).double()
    one, zero, half = draw("ddim", 1.0, 0), draw("ddim", 0.0, 0), draw("ddim", 0.5, 0)
    _moments_ok(one.float())
    torch.testing.assert_close(half, zero + 0.5 * (one - zero), atol=1e-4, rtol=0)
    for sampler in ("ddpm", "ddim", "sde", "heun"):
        zero = draw(sampler, 0.0, 0)
        torch.testing.assert_close(zero, draw(sampler, 0.0, 1))  # no randomness left
        assert zero.std(0).max() < 1e-3 and (zero.mean(0) - MU[0]).abs().max() < 0.05
        torch.testing.assert_close(draw(sampler, 1.0, 3), sample(den, (N, 2), 50, sampler,
                                                                 generator=torch.Generator().manual_seed(3)).double())
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        draw("ddpm", -1.0, 0)
    with pytest.raises(ValueError, match="not defined for the langevin"):
        draw("langevin", 0.5, 0)


def test_grid_timesteps_are_the_schedules_computed_once():
    from diffpolicy.samplers import consistency_timesteps, grid_timesteps
    for sched in (S.DiscreteVP(1000), S.EDM()):
        ts = grid_timesteps(sched, 5)
        torch.testing.assert_close(ts, sched.timesteps(5))
        assert grid_timesteps(sched, 5) is ts and grid_timesteps(sched, 6) is not ts
    vp = S.DiscreteVP(1000)
    torch.testing.assert_close(grid_timesteps(vp, 5, spacing="leading"), vp.timesteps(5, spacing="leading"))
    edm = S.EDM()
    full = edm.timesteps(3)
    torch.testing.assert_close(consistency_timesteps(edm, 2), torch.cat([full[:2], full[3:]]))
    assert consistency_timesteps(edm, 2) is consistency_timesteps(edm, 2)


@pytest.mark.parametrize("sched_name", ["vp", "edm", "rf"])
def test_mixture_oracle_score_is_the_autograd_score_of_the_noised_mixture(sched_name):
    """The reference denoiser behind many tests, checked on its own: with unequal weights and
    full covariances, its score prediction equals the autograd gradient of
    ``log sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` (torch.distributions)."""
    g = torch.Generator().manual_seed(0)
    sched = {"vp": S.VPSDE(), "edm": S.EDM(), "rf": S.RectifiedFlow()}[sched_name]
    means = torch.tensor([[-1.5, 0.5], [1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)
    L = torch.randn(3, 2, 2, generator=g, dtype=torch.float64) * 0.4
    covs = L @ L.transpose(-1, -2) + 0.05 * torch.eye(2, dtype=torch.float64)
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    oracle = GaussianMixtureDenoiser(sched, means, covs, weights, prediction="score")
    for frac in (0.01, 0.1, 0.5, 0.9):
        t = sched.t_min + frac * (sched.t_max - sched.t_min)
        tt = torch.tensor(t, dtype=torch.float64)
        alpha, sigma = (v.item() for v in sched.alpha_sigma(tt))
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=weights),
            torch.distributions.MultivariateNormal(alpha * means, alpha**2 * covs + sigma**2 * torch.eye(2, dtype=torch.float64)))
        x = (torch.randn(64, 2, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
        (ref,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
        got = oracle(x.detach(), torch.full((64,), t, dtype=torch.float64))
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)

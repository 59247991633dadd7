"""The denoiser contract, preconditioners and wrappers."""
import pytest
import torch

from diffpolicy import schedules as S
from diffpolicy.denoiser import (
    CFGDenoiser, ClassifierGuidance, ClipX0, ConsistencyPrecond, Denoiser, EDMPrecond, LCMPrecond, TrigFlowPrecond,
)
from diffpolicy.nets import MLPDenoiser, Unet2D
from diffpolicy.parameterization import consistency_scalings, edm_scalings


def _net(x_dim=2, obs_dim=0):
    return MLPDenoiser(x_dim=x_dim, obs_dim=obs_dim, hidden=32, depth=2, time_dim=8)


def test_edm_precond_is_the_paper_formula():
    net, sched = _net(), S.EDM()
    den = Denoiser(net, sched, precond=EDMPrecond(0.5))
    x, t = torch.randn(5, 2), torch.rand(5) * 10 + 0.01
    c_skip, c_out, c_in, c_noise = edm_scalings(t, 0.5)
    ref = c_skip[:, None] * x + c_out[:, None] * net(c_in[:, None] * x, 1000 * c_noise, None)
    torch.testing.assert_close(den(x, t), ref)
    assert den.prediction == "x0"


def test_edm_precond_on_vp_uses_scaled_variables():
    """EDM §2 with s(t) = alpha_t: D(x_t) = D_edm(x_t / alpha, sigma / alpha)."""
    net, vp, edm = _net(), S.VPSDE(), S.EDM()
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    a, s = vp.alpha_sigma(t)
    out = Denoiser(net, vp, precond=EDMPrecond(0.5))(x, t)
    ref = Denoiser(net, edm, precond=EDMPrecond(0.5))(x / a[:, None], s / a)
    torch.testing.assert_close(out, ref)


def test_consistency_boundary_holds_for_any_network():
    net, sched = _net(), S.EDM()
    den = Denoiser(net, sched, precond=ConsistencyPrecond(0.5, 0.002))
    x = torch.randn(6, 2)
    torch.testing.assert_close(den(x, torch.full((6,), 0.002)), x)
    c_skip, c_out, _ = consistency_scalings(torch.tensor(3.0), 0.5, 0.002)
    assert 0 < float(c_skip) < 1 and float(c_out) > 0


def test_lcm_precond_boundary_and_inner_kind():
    net, sched = _net(), S.DiscreteVP()
    den = Denoiser(net, sched, precond=LCMPrecond("eps"))
    x = torch.randn(3, 2)
    torch.testing.assert_close(den(x, torch.zeros(3)), x)  # c_skip(0) = 1, c_out(0) = 0
    # at large t the output is ~ the x0 of the eps network
    t = torch.full((3,), 800.0)
    a, s = sched.alpha_sigma(t)
    x0 = (x - s[:, None] * net(x, t, None)) / a[:, None]
    torch.testing.assert_close(den(x, t), x0, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="DiscreteVP"):
        Denoiser(net, S.EDM(), precond=LCMPrecond())(x, torch.ones(3))


@pytest.mark.parametrize("sd,smin", [(0.5, 0.002), (1.0, 0.05)])
def test_consistency_precond_matches_a_diffusers_cm_step(sd, smin):
    """On each of 40 Karras levels, ConsistencyPrecond's f(x, sigma) is diffusers' denoised sample:
    scale_model_input (c_in), the network at its timestep 250 ln(sigma) (c_noise), then step's
    c_skip x + c_out F (s_noise = 0, no clipping, so step returns exactly that)."""
    diffusers = pytest.importorskip("diffusers")
    cm = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=smin, sigma_max=80.0,
                                                  sigma_data=sd, s_noise=0.0, clip_denoised=False)
    cm.set_timesteps(timesteps=list(range(39, -1, -1)))
    net = _net()
    den = Denoiser(net, S.EDM(sigma_min=smin, sigma_max=80.0, sigma_data=sd), precond=ConsistencyPrecond())
    g = torch.Generator().manual_seed(0)
    for k, t_k in enumerate(cm.timesteps):
        sigma = cm.sigmas[k]
        x = 3 * torch.randn(8, 2, generator=g)
        with torch.no_grad():
            out = net(cm.scale_model_input(x, t_k), t_k.float().expand(8), None)
            want = cm.step(out, t_k, x).prev_sample
            got = den(x, sigma.expand(8))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(sigma) == pytest.approx(smin)  # the last level is the boundary, f = x


@pytest.mark.parametrize("kind,prediction_type", [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
@pytest.mark.parametrize("scaling", [10.0, 0.1])
def test_lcm_precond_matches_a_diffusers_lcm_step(kind, prediction_type, scaling):
    """LCMPrecond's f(x, t) is the ``denoised`` of diffusers' LCMScheduler.step at each of its timesteps:
    c_skip(t) x + c_out(t) x0_hat with the same inner prediction and timestep scaling."""
    diffusers = pytest.importorskip("diffusers")
    lcm = diffusers.LCMScheduler(prediction_type=prediction_type, timestep_scaling=scaling)
    lcm.set_timesteps(timesteps=[999, 600, 250, 40, 10, 5, 2, 1, 0], original_inference_steps=1000)  # to the boundary
    net = _net()
    sched = S.DiscreteVP(1000, "scaled_linear", 0.00085, 0.012)
    den = Denoiser(net, sched, precond=LCMPrecond(kind, timestep_scaling=scaling))
    g = torch.Generator().manual_seed(0)
    for t_k in lcm.timesteps:
        x = torch.randn(8, 2, generator=g)
        t = t_k.float().expand(8)
        with torch.no_grad():
            want = lcm.step(net(x, t, None), t_k, x, generator=g).denoised
            got = den(x, t)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        if int(t_k) == 0:
            torch.testing.assert_close(got, x)  # c_skip(0) = 1, c_out(0) = 0


def test_trigflow_precond_scales_input():
    seen = {}
    def net(x, t, cond):
        seen["x"] = x
        return torch.zeros_like(x)
    sched = S.TrigFlow(sigma_data=0.5)
    den = Denoiser(net, sched, precond=TrigFlowPrecond())
    x = torch.randn(2, 3)
    den(x, torch.full((2,), 0.3))
    torch.testing.assert_close(seen["x"], x / 0.5)
    assert den.prediction == "trigflow"


def test_prediction_must_agree_with_precond():
    with pytest.raises(ValueError, match="disagrees with the preconditioner"):
        Denoiser(_net(), S.EDM(), "eps", precond=EDMPrecond())
    with pytest.raises(ValueError, match="valid: eps"):
        Denoiser(_net(), S.EDM(), "noise")


def test_cfg_endpoints_and_batched_null_class():
    net = Unet2D(in_channels=1, base_channels=8, channel_mults=(1, 2), num_classes=3, groups=4).eval()
    den = Denoiser(net, S.DiscreteVP(), "eps")
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 2])
    cond_out, uncond_out = den(x, t, y), den(x, t, None)
    torch.testing.assert_close(CFGDenoiser(den, 1.0)(x, t, y), cond_out)
    torch.testing.assert_close(CFGDenoiser(den, 0.0)(x, t, y), uncond_out)
    two_calls = CFGDenoiser(den, 3.0)(x, t, y)
    torch.testing.assert_close(two_calls, uncond_out + 3.0 * (cond_out - uncond_out))
    batched = CFGDenoiser(den, 3.0, null_cond=torch.tensor(net.null_class))(x, t, y)
    torch.testing.assert_close(batched, two_calls, atol=1e-5, rtol=1e-5)


def test_classifier_guidance_shifts_eps_by_the_log_likelihood_gradient():
    sched = S.DiscreteVP()
    den = Denoiser(lambda x, t, c: torch.zeros_like(x), sched, "eps")
    W = torch.randn(2, 3)
    guided = ClassifierGuidance(den, lambda x, t: x @ W, scale=2.0)
    x, t, y = torch.randn(4, 2), torch.full((4,), 300.0), torch.tensor([0, 1, 2, 1])
    p = torch.softmax(x @ W, -1)
    grad = W.T[y] - p @ W.T  # d/dx log softmax(xW)_y
    _, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(guided(x, t, y), -2.0 * sigma[:, None] * grad)
    with pytest.raises(ValueError, match="labels"):
        guided(x, t, None)


def test_clip_x0_static_and_dynamic():
    sched = S.DiscreteVP()
    den = Denoiser(lambda x, t, c: 3 * x, sched, "x0")
    x, t = torch.randn(4, 10), torch.full((4,), 10.0)
    torch.testing.assert_close(ClipX0(den, 1.0)(x, t), (3 * x).clamp(-1, 1))
    dyn = ClipX0(den, 1.0, dynamic_quantile=0.9)(x, t)
    s = torch.quantile((3 * x).abs(), 0.9, dim=1).clamp_min(1.0)[:, None]
    torch.testing.assert_close(dyn, (3 * x).clamp(-s, s) / s)
    assert dyn.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="dynamic_quantile"):
        ClipX0(den, 1.0, dynamic_quantile=1.5)


def test_x0_eps_rejects_bad_time_shape():
    den = Denoiser(_net(), S.DiscreteVP(), "eps")
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        den.x0_eps(torch.randn(4, 2), torch.zeros(3))


def test_wrappers_and_preconditioners_reject_bad_use():
    den = Denoiser(_net(), S.DiscreteVP(), "eps")
    with pytest.raises(ValueError, match="needs the conditioning"):
        CFGDenoiser(den, 2.0)(torch.randn(2, 2), torch.zeros(2), None)
    rf = Denoiser(_net(), S.RectifiedFlow(), precond=EDMPrecond())
    with pytest.raises(ValueError, match="divides by alpha_t"):
        rf(torch.randn(2, 2), torch.ones(2))


def test_consistency_precond_defaults_to_the_schedule():
    den = Denoiser(_net(), S.VE(sigma_min=0.01, sigma_max=10.0, sigma_data=1.0), precond=ConsistencyPrecond())
    x = torch.randn(3, 2)
    torch.testing.assert_close(den(x, torch.full((3,), 0.01)), x)


def test_envs_and_agents_are_subpackages():
    import diffpolicy.agents
    import diffpolicy.envs
    assert diffpolicy.envs.__name__ == "diffpolicy.envs" and diffpolicy.agents.__name__ == "diffpolicy.agents"


# ----------------------------------------------------------------------------------------
# Grid-time cache: a sampler's time-only work done once per grid, never changing a result
# ----------------------------------------------------------------------------------------

def _grid_t(value, sched, n=4):
    from diffpolicy.denoiser import mark_grid_time
    return mark_grid_time(torch.full((n,), value), sched)


@pytest.mark.parametrize("precond,sched", [(EDMPrecond(0.5), S.VPSDE()), (ConsistencyPrecond(0.5), S.EDM()),
                                           (EDMPrecond(0.5), S.EDM())])
def test_preconditioner_on_a_grid_time_equals_a_fresh_time(precond, sched):
    den = Denoiser(_net(), sched, precond=precond)
    x, t_value = torch.randn(4, 2), 0.5
    t = _grid_t(t_value, sched)
    first, again = den(x, t), den(x + 1, t)  # the second call reads the kept scalings
    torch.testing.assert_close(first, den(x, torch.full((4,), t_value)))
    torch.testing.assert_close(again, den(x + 1, torch.full((4,), t_value)))
    assert len(t._time_cache[1]) == 1


def test_time_cached_computes_once_per_grid_time_and_always_for_others():
    from diffpolicy.denoiser import time_cached
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3)
    sched = S.EDM()
    plain, grid = torch.zeros(3), _grid_t(0.0, sched, 3)
    for _ in range(3):
        time_cached(plain, sched, ("k",), compute)
    assert len(calls) == 3
    for _ in range(3):
        time_cached(grid, sched, ("k",), compute)
    assert len(calls) == 4
    time_cached(grid, sched, ("other",), compute)  # another key is another quantity
    time_cached(grid, S.EDM(), ("k",), compute)  # another schedule: not this grid's
    assert len(calls) == 6


def test_time_cache_filled_in_inference_mode_serves_autograd_later():
    net, sched = _net(), S.EDM()
    den = ClipX0(Denoiser(net, sched, precond=ConsistencyPrecond(0.5)), 1.0)
    t, x = _grid_t(2.0, sched), torch.randn(4, 2)
    with torch.inference_mode():
        den(x, t)
    den(x, t).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_x0_and_x0_eps_are_the_parameterization_formulas_on_any_time():
    from diffpolicy.parameterization import to_x0_eps
    sched = S.VPSDE()
    x, t = torch.randn(5, 2), torch.full((5,), 0.3)
    alpha, sigma = (v[:, None] for v in sched.alpha_sigma(t))
    d_alpha, d_sigma = (v[:, None] for v in sched.derivatives(t))
    for kind in ("eps", "x0", "v", "rf_velocity", "score"):
        den = Denoiser(_net(), sched, prediction=kind)
        ref = to_x0_eps(kind, den(x, t), x, alpha, sigma, d_alpha, d_sigma, sched.sigma_data)
        for time in (t, _grid_t(0.3, sched, 5)):
            for got, want in zip(den.x0_eps(x, time), ref):
                torch.testing.assert_close(got, want)
            torch.testing.assert_close(den.x0(x, time), ref[0])


def test_edm_precond_still_refuses_alpha_zero_on_a_grid_time():
    sched = S.RectifiedFlow()
    den = Denoiser(_net(), sched, precond=EDMPrecond(0.5))
    with pytest.raises(ValueError, match="alpha_t"):
        den(torch.randn(4, 2), _grid_t(1.0, sched))


def test_grid_time_cache_keeps_no_model_or_schedule_alive():
    import gc
    import weakref
    from diffpolicy.samplers import sample
    sched = S.EDM()
    den = ClipX0(Denoiser(_net(), sched, precond=ConsistencyPrecond(0.5)), 1.0)
    sample(den, (3, 2), 2, "consistency")
    alive = weakref.ref(sched), weakref.ref(den)
    del den, sched
    gc.collect()
    assert alive[0]() is None and alive[1]() is None


def test_grid_time_cache_tells_preconditioner_settings_apart():
    net, sched = _net(), S.EDM()
    t, x = _grid_t(1.0, sched), torch.randn(4, 2)
    for precond in (ConsistencyPrecond(0.5, 0.002), ConsistencyPrecond(0.5, 0.5), ConsistencyPrecond(1.0, 0.002),
                    EDMPrecond(0.5)):
        den = Denoiser(net, sched, precond=precond)
        torch.testing.assert_close(den(x, t), den(x, torch.full((4,), 1.0)))

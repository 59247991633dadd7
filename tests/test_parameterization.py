"""Property tests for every conversion (handbook §2: the routes around each triangle agree)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffpolicy import parameterization as P
from diffpolicy import schedules as S

SCHEDS = {"vp": S.VPSDE(), "rf": S.RectifiedFlow(), "trig": S.TrigFlow(sigma_data=0.7), "edm": S.EDM(),
          "dvp": S.DiscreteVP(1000, "squaredcos_cap_v2")}


def _point(name, u, seed):
    sched = SCHEDS[name]
    t = torch.tensor(sched.t_min + u * (sched.t_max - sched.t_min), dtype=torch.float64)
    if name == "dvp":
        t = t.floor() + 0.5
    a, s = sched.alpha_sigma(t)
    da, ds = sched.derivatives(t)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return sched, dict(alpha=a, sigma=s, d_alpha=da, d_sigma=ds, sigma_data=sched.sigma_data), x0, eps


common = dict(name=st.sampled_from(list(SCHEDS)), u=st.floats(0.02, 0.98), seed=st.integers(0, 10**6))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(P.PREDICTIONS), **common)
def test_round_trip_through_every_kind(kind, name, u, seed):
    _, c, x0, eps = _point(name, u, seed)
    x = c["alpha"] * x0 + c["sigma"] * eps
    pred = P.from_x0_eps(kind, x0, eps, **c)
    x0_hat, eps_hat = P.to_x0_eps(kind, pred, x, **c)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-7, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(src=st.sampled_from(P.PREDICTIONS), mid=st.sampled_from(P.PREDICTIONS),
       dst=st.sampled_from(P.PREDICTIONS), **common)
def test_triangle_routes_agree(src, mid, dst, name, u, seed):
    _, c, x0, eps = _point(name, u, seed)
    x = c["alpha"] * x0 + c["sigma"] * eps
    pred = P.from_x0_eps(src, x0, eps, **c)
    direct = P.convert(pred, src, dst, x, **c)
    via = P.convert(P.convert(pred, src, mid, x, **c), mid, dst, x, **c)
    torch.testing.assert_close(direct, via, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direct, P.from_x0_eps(dst, x0, eps, **c), rtol=1e-6, atol=1e-6)


def test_known_closed_forms():
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    x0, eps = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    assert float(P.from_x0_eps("v", x0, eps, a, s)) == pytest.approx(0.6 * 2 - 0.8 * 1)  # Salimans & Ho
    assert float(P.from_x0_eps("score", x0, eps, a, s)) == pytest.approx(-2 / 0.8)
    # RF velocity on the RF schedule is eps - x0
    rf = S.RectifiedFlow()
    t = torch.tensor(0.3, dtype=torch.float64)
    u = P.from_x0_eps("rf_velocity", x0, eps, *rf.alpha_sigma(t), *rf.derivatives(t))
    assert float(u) == pytest.approx(2.0 - 1.0)
    # TrigFlow: x0 = cos t x_t - sin t sigma_d F (Lu & Song 2025 eq. 6)
    tf = S.TrigFlow(sigma_data=0.5)
    t = torch.tensor(0.7, dtype=torch.float64)
    c = dict(d_alpha=tf.derivatives(t)[0], d_sigma=tf.derivatives(t)[1], sigma_data=0.5)
    al, sg = tf.alpha_sigma(t)
    x = al * x0 + sg * eps
    F = P.from_x0_eps("trigflow", x0, eps, al, sg, **c)
    torch.testing.assert_close(t.cos() * x - t.sin() * 0.5 * F, x0)


@settings(max_examples=40, deadline=None)
@given(**common)
def test_velocity_score_relation(name, u, seed):
    """handbook §2.7: u = f x - g^2/2 score, and it equals the velocity from (x0, eps)."""
    _, c, x0, eps = _point(name, u, seed)
    x = c["alpha"] * x0 + c["sigma"] * eps
    score = P.from_x0_eps("score", x0, eps, **c)
    u_ref = P.from_x0_eps("rf_velocity", x0, eps, **c)
    u = P.velocity_from_score(score, x, c["alpha"], c["sigma"], c["d_alpha"], c["d_sigma"])
    torch.testing.assert_close(u, u_ref, rtol=1e-6, atol=1e-6)
    back = P.score_from_velocity(u, x, c["alpha"], c["sigma"], c["d_alpha"], c["d_sigma"])
    torch.testing.assert_close(back, score, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(u=st.floats(0.02, 0.98), seed=st.integers(0, 10**6))
def test_velocity_mapping_vp_to_rf(u, seed):
    """handbook §2.4.5: v of a VP model <-> RF velocity eps - x0 at the mapped RF state and time."""
    _, c, x0, eps = _point("vp", u, seed)
    a, s = c["alpha"], c["sigma"]
    x = a * x0 + s * eps
    v = P.from_x0_eps("v", x0, eps, a, s)
    u_rf = P.diffusion_v_to_rf_velocity(v, x, a, s)
    torch.testing.assert_close(u_rf, eps - x0)
    torch.testing.assert_close(P.rf_velocity_to_diffusion_v(u_rf, x, a, s), v)
    y, r = P.to_rf_coordinates(x, a, s)
    torch.testing.assert_close(y, (1 - r) * x0 + r * eps)  # the RF interpolant at time r


def test_sde_coefficients_vp_closed_form():
    sched = S.VPSDE(0.1, 20.0)
    t = torch.tensor(0.4, dtype=torch.float64)
    f, g2 = P.sde_coefficients(*sched.alpha_sigma(t), *sched.derivatives(t))
    beta = 0.1 + 0.4 * 19.9
    assert float(f) == pytest.approx(-0.5 * beta) and float(g2) == pytest.approx(beta)  # Song et al. eq. 11


def test_edm_scalings_table1():
    sd, sig = 0.5, torch.tensor(2.0, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = P.edm_scalings(sig, sd)
    assert float(c_skip) == pytest.approx(0.25 / 4.25)
    assert float(c_out) == pytest.approx(2 * 0.5 / 4.25**0.5)
    assert float(c_in) == pytest.approx(1 / 4.25**0.5)
    assert float(c_noise) == pytest.approx(float(sig.log()) / 4)


@settings(max_examples=30, deadline=None)
@given(sd=st.floats(0.1, 2.0), smin=st.floats(1e-4, 0.1))
def test_consistency_boundary(sd, smin):
    c_skip, c_out, _ = P.consistency_scalings(torch.tensor(smin, dtype=torch.float64), sd, smin)
    assert float(c_skip) == pytest.approx(1.0, abs=1e-12) and float(c_out) == 0.0
    c_skip, c_out = P.lcm_scalings(torch.tensor(0.0, dtype=torch.float64), sd)
    assert float(c_skip) == pytest.approx(1.0, abs=1e-12) and float(c_out) == 0.0


@pytest.mark.parametrize("sd,smin", [(0.5, 0.002), (1.0, 0.05), (0.2, 0.01)])
def test_consistency_scalings_match_diffusers(sd, smin):
    """c_skip, c_out against diffusers' CMStochasticIterativeScheduler.get_scalings_for_boundary_condition,
    and c_in against its scale_model_input, on 200 sigmas from sigma_min to 200 (float64)."""
    diffusers = pytest.importorskip("diffusers")
    cm = diffusers.CMStochasticIterativeScheduler(sigma_min=smin, sigma_data=sd)
    sigma = torch.logspace(torch.tensor(smin).log10(), torch.tensor(200.0).log10(), 200, dtype=torch.float64)
    c_skip, c_out, c_in = P.consistency_scalings(sigma, sd, smin)
    ref_skip, ref_out = cm.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(c_skip, ref_skip, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c_out, ref_out, rtol=1e-12, atol=1e-15)
    cm.sigmas = sigma  # scale_model_input divides by sqrt(sigma^2 + sd^2) at its step index
    for k in range(0, 200, 7):
        cm._step_index = k
        torch.testing.assert_close(c_in[k], cm.scale_model_input(torch.ones((), dtype=torch.float64), None),
                                   rtol=1e-12, atol=0)
    assert 0.5 < float(c_skip[0]) <= 1 and float(c_skip[-1]) < 1e-4  # the range spans both ends


@pytest.mark.parametrize("scaling", [10.0, 1.0, 0.1])
def test_lcm_scalings_match_diffusers(scaling):
    """c_skip, c_out on every discrete timestep against diffusers' LCMScheduler
    .get_scalings_for_boundary_condition_discrete (sigma_data 0.5 there), for several timestep scalings."""
    diffusers = pytest.importorskip("diffusers")
    lcm = diffusers.LCMScheduler(timestep_scaling=scaling)
    t = torch.arange(1000, dtype=torch.float64)
    c_skip, c_out = P.lcm_scalings(t, 0.5, scaling)
    ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    torch.testing.assert_close(c_skip, ref_skip, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c_out, ref_out, rtol=1e-12, atol=1e-15)
    assert float(c_skip[1]) < 1 and float(c_out[999]) > 0.9


def test_bad_kind_and_missing_derivatives():
    with pytest.raises(ValueError, match="valid: eps, x0, v, rf_velocity, score, trigflow"):
        P.check_prediction("noise")
    with pytest.raises(ValueError, match="derivatives"):
        P.to_x0_eps("rf_velocity", torch.zeros(1), torch.zeros(1), 0.5, 0.5)

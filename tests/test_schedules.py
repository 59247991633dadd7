"""Schedules against closed forms and numerical derivatives."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffpolicy import schedules as S

CONTINUOUS = [S.VPSDE(), S.VE(), S.EDM(), S.RectifiedFlow(), S.TrigFlow(), S.TrigFlow(sigma_data=1.3)]


def _interior(sched, n=64):
    lo, hi = sched.t_min, sched.t_max
    return torch.linspace(lo + 0.01 * (hi - lo), hi - 0.01 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("sched", CONTINUOUS + [S.DiscreteVP(1000, "linear")], ids=repr)
def test_derivatives_match_finite_differences(sched):
    t = _interior(sched)
    if isinstance(sched, S.DiscreteVP):  # piecewise linear abar: differentiate inside a segment
        t = t.floor() + 0.5
    h = 1e-6 * max(1.0, sched.t_max - sched.t_min)
    (ap, sp), (am, sm) = sched.alpha_sigma(t + h), sched.alpha_sigma(t - h)
    da, ds = sched.derivatives(t)
    torch.testing.assert_close(da, (ap - am) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ds, (sp - sm) / (2 * h), rtol=1e-5, atol=1e-7)


def test_closed_forms():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    a, s = S.VPSDE(0.1, 20.0).alpha_sigma(t)
    log_a = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    torch.testing.assert_close(a, log_a.exp())
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    a, s = S.RectifiedFlow().alpha_sigma(t)
    torch.testing.assert_close(a, 1 - t)
    torch.testing.assert_close(s, t)
    a, s = S.TrigFlow(sigma_data=0.5).alpha_sigma(t)
    torch.testing.assert_close(a, t.cos())
    torch.testing.assert_close(s, 0.5 * t.sin())
    a, s = S.EDM().alpha_sigma(t)
    torch.testing.assert_close(s, t)
    torch.testing.assert_close(a, torch.ones(3, dtype=torch.float64))


def test_discrete_vp_table():
    sched = S.DiscreteVP(1000, "linear", 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    torch.testing.assert_close(a, abar[[0, 10, 999]].sqrt())
    torch.testing.assert_close(s, (1 - abar[[0, 10, 999]]).sqrt())
    a, s = sched.alpha_sigma(torch.tensor(-1.0, dtype=torch.float64))
    assert float(a) == 1.0 and float(s) == 0.0
    a, _ = S.DiscreteVP(1000, final_alpha_one=False).alpha_sigma(torch.tensor(-1.0, dtype=torch.float64))
    assert float(a) == pytest.approx(float(abar[0].sqrt()))
    # interpolation halfway between integers
    a, _ = sched.alpha_sigma(torch.tensor(10.5, dtype=torch.float64))
    assert float(a**2) == pytest.approx(float((abar[10] + abar[11]) / 2))


def test_cosine_and_vp_betas_closed_forms():
    n = 100
    betas = S.make_betas("squaredcos_cap_v2", n)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert float(abar[49]) == pytest.approx(f(50 / n) / f(0), rel=1e-9)
    # Diffusion-QL VP: abar_T = exp(-b_min - (b_max - b_min)/2) for T steps
    T = 5
    abar = torch.cumprod(1 - S.make_betas("vp", T), 0)
    assert float(abar[-1]) == pytest.approx(math.exp(-0.1 - 0.5 * 9.9), rel=1e-9)


def test_zero_terminal_snr():
    sched = S.DiscreteVP(1000, "scaled_linear", 0.00085, 0.012, zero_terminal_snr=True)
    a, s = sched.alpha_sigma(torch.tensor([0.0, 999.0], dtype=torch.float64))
    assert float(a[1]) == pytest.approx(0.0, abs=1e-12) and float(s[1]) == pytest.approx(1.0)
    base = S.DiscreteVP(1000, "scaled_linear", 0.00085, 0.012)
    assert float(a[0]) == pytest.approx(float(base.alpha_sigma(torch.tensor(0.0))[0]), rel=1e-6)


@pytest.mark.parametrize("sched", CONTINUOUS + [S.DiscreteVP()], ids=repr)
def test_grids_descend_to_data_end(sched):
    ts = sched.timesteps(10)
    assert ts.shape == (11,) and ts.dtype == torch.float64
    assert bool((ts[1:] < ts[:-1]).all())
    assert float(ts[0]) == pytest.approx(sched.t_max) or isinstance(sched, S.DiscreteVP)
    _, s_end = sched.alpha_sigma(ts[-1:])
    assert float(s_end) == pytest.approx(0.0, abs=1e-12)


def test_karras_sigmas_closed_form():
    s = S.karras_sigmas(5, 0.002, 80.0, 7.0)
    i = torch.arange(5, dtype=torch.float64) / 4
    ref = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, ref)
    assert float(s[0]) == pytest.approx(80.0) and float(s[-1]) == pytest.approx(0.002)


def test_ve_geometric_grid():
    ts = S.VE(0.01, 10.0).timesteps(4)
    ratios = ts[1:-1] / ts[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))
    assert float(ts[0]) == pytest.approx(10.0) and float(ts[-2]) == pytest.approx(0.01)


def test_rf_shifted_grid():
    ts = S.RectifiedFlow(shift=3.0).timesteps(4)
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(ts, 3 * u / (1 + 2 * u))


@pytest.mark.parametrize("sched", CONTINUOUS + [S.DiscreteVP()], ids=repr)
def test_training_times_in_range(sched):
    t = sched.sample_t(4096, generator=torch.Generator().manual_seed(0))
    sched.check_t(t)
    assert t.std() > 0


def test_logit_normal_time_sampling_median():
    t = S.RectifiedFlow("logit_normal", logit_mean=1.0).sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert float(t.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


def test_edm_training_sigmas_lognormal():
    s = S.EDM().sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert float(s.log().mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(s.log().std()) == pytest.approx(1.2, abs=0.03)


def test_bad_names_and_ranges():
    with pytest.raises(ValueError, match="valid: .*edm"):
        S.make_schedule("nope")
    with pytest.raises(ValueError, match="valid: .*linear"):
        S.DiscreteVP(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="valid: leading, linspace, logsnr, power, quadratic, trailing"):
        S.DiscreteVP().timesteps(10, spacing="odd")
    with pytest.raises(ValueError, match="ts must lie"):
        S.RectifiedFlow().check_t(torch.tensor([1.5]), "ts")
    with pytest.raises(ValueError, match="positive int"):
        S.EDM().timesteps(0)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(list(S.SCHEDULES)), st.floats(0.02, 0.98))
def test_make_schedule_roundtrip_alpha_sigma_positive(name, u):
    sched = S.make_schedule(name)
    t = torch.tensor(sched.t_min + u * (sched.t_max - sched.t_min), dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    assert float(a) > 0 and float(s) > 0


@pytest.mark.parametrize("sched,kw", [(S.VPSDE(), {"grid": "logsnr"}), (S.DiscreteVP(), {"spacing": "logsnr"})])
def test_logsnr_grid_is_uniform_in_log_snr(sched, kw):
    ts = sched.timesteps(12, **kw)[:-1]
    a, s = sched.alpha_sigma(ts)
    lam = (a / s).log()
    steps = lam[1:] - lam[:-1]
    tol = 0.05 if isinstance(sched, S.DiscreteVP) else 1e-3  # integer rounding
    assert bool((steps > 0).all())
    assert float((steps - steps.mean()).abs().max()) < tol * float(lam[-1] - lam[0])


def test_quadratic_grids():
    ts = S.DiscreteVP(1000).timesteps(5, spacing="quadratic")
    assert ts.tolist() == [999.0, 562.0, 250.0, 62.0, 0.0, -1.0]  # round(999 u^2)
    ts = S.VPSDE(t_eps=0.01).timesteps(3, grid="quadratic")
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.01 + 0.99 * 0.25, 0.01, 0.0], dtype=torch.float64))
    ts = S.DiscreteVP(1000).timesteps(50, spacing="quadratic")  # round(999 (1/49)^2) = 0 merges: pushed up
    assert ts[-4:].tolist() == [2.0, 1.0, 0.0, -1.0] and bool((ts[1:] < ts[:-1]).all())
    assert S.DiscreteVP(20).timesteps(20, spacing="quadratic")[:-1].tolist() == list(range(19, -1, -1))


def test_power_grids():
    vp = S.DiscreteVP(1000)
    torch.testing.assert_close(vp.timesteps(10, spacing="power"), vp.timesteps(10, spacing="quadratic"))
    ts = vp.timesteps(4, spacing="power", power=2.5)
    expected = [round(999 * u**2.5) for u in (1.0, 2 / 3, 1 / 3, 0.0)] + [-1]  # 999, 453, 64, 0
    assert ts.tolist() == expected
    assert bool((vp.timesteps(40, spacing="power", power=4.0)[1:] < vp.timesteps(40, spacing="power", power=4.0)[:-1]).all())
    with pytest.raises(ValueError, match="only applies to spacing='power'"):
        vp.timesteps(10, spacing="trailing", power=3.0)
    with pytest.raises(ValueError, match="power must be positive"):
        vp.timesteps(10, spacing="power", power=0.0)


def test_unknown_grid_options_are_rejected():
    with pytest.raises(TypeError):
        S.VPSDE().timesteps(4, spacing="logsnr")  # VPSDE's option is grid=
    with pytest.raises(ValueError, match="valid: logsnr, quadratic, uniform"):
        S.VPSDE().timesteps(4, grid="karras")


def test_repr_names_every_setting():
    assert repr(S.DiscreteVP(beta_end=0.03)) != repr(S.DiscreteVP())
    assert repr(S.EDM(rho=3.0)) != repr(S.EDM())

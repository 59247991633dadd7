"""Reflow, InstaFlow, velocity mapping, SDS / VSD / DMD, ADD and guided distillation on the
three-Gaussian 2-D toy, against its exact denoiser (tests/test_distill.py)."""
import copy

import pytest
import torch
from test_distill import COVS, MEANS, _data

from diffpolicy import schedules as S
from diffpolicy.denoiser import CFGDenoiser, Denoiser, DenoiserBase, expand_like
from diffpolicy.distill import (add_losses, discriminator_loss, fake_score_loss, generator_adv_loss,
                                guided_distillation_loss, ode_pairs, one_step, pair_regression_loss, reflow_loss,
                                score_distillation_grad, score_distillation_loss, velocity_mapping_loss, with_guidance)
from diffpolicy.metrics import SlicedWassersteinTo
from diffpolicy.nets import MLPDenoiser
from diffpolicy.parameterization import diffusion_v_to_rf_velocity
from diffpolicy.samplers import prior, run_sampler
from diffpolicy.toys import GaussianMixtureDenoiser


@pytest.fixture(scope="module")
def swd():
    return SlicedWassersteinTo(_data(20000, torch.Generator().manual_seed(9)), generator=torch.Generator().manual_seed(3))


def _train(loss_fn, params, steps, lr=2e-3, betas=(0.9, 0.999)):
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    for i in range(steps):
        loss = loss_fn(i)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _quality(swd, model, sampler, ts, n=4000, seed=5):
    x = prior(model, (n, 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return swd(run_sampler(sampler, model, x, ts, generator=torch.Generator().manual_seed(seed)).float())


def _mlp(sched, kind, obs_dim=0):
    return Denoiser(MLPDenoiser(2, obs_dim=obs_dim, hidden=128, depth=3, time_dim=32), sched, kind)


def test_reflow_straightens_the_flow_and_instaflow_distils_it_to_one_step(swd):
    torch.manual_seed(0)
    sched = S.RectifiedFlow()
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="rf_velocity")
    z, x = ode_pairs(teacher, (8192, 2), 64, generator=torch.Generator().manual_seed(0))
    assert swd(x) < 0.1  # the coupling's endpoints are the data distribution
    student = _mlp(sched, "rf_velocity")
    gen = torch.Generator().manual_seed(1)

    def batch():
        i = torch.randint(0, len(z), (256,), generator=gen)
        return z[i], x[i]

    _train(lambda _: reflow_loss(student, *batch(), generator=gen).mean(), student.parameters(), 800)
    one = sched.timesteps(1)
    teacher1, reflow1 = _quality(swd, teacher, "rf_euler", one), _quality(swd, student, "rf_euler", one)
    assert reflow1 < 0.5 * teacher1, (reflow1, teacher1)  # straight paths: one Euler step suffices
    # InstaFlow: one-step regression on the 2-RF's own pairs, starting from the 2-RF
    z2, x2 = ode_pairs(student.eval(), (8192, 2), 32, generator=torch.Generator().manual_seed(2))
    one_stepper = copy.deepcopy(student).train()

    def batch2():
        i = torch.randint(0, len(z2), (256,), generator=gen)
        return z2[i], x2[i]

    _train(lambda _: pair_regression_loss(one_stepper, *batch2()).mean(), one_stepper.parameters(), 300, lr=1e-3)
    with torch.no_grad():
        insta = swd(one_step(one_stepper, prior(teacher, (4000, 2), generator=torch.Generator().manual_seed(5))))
    assert insta < 0.5 * teacher1 and insta < 1.2 * reflow1, (insta, reflow1, teacher1)


def test_velocity_mapping_loss_is_the_rf_loss_of_the_mapped_v_prediction():
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    model = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="v")
    x0 = _data(64, torch.Generator().manual_seed(0))
    t = torch.linspace(10, 990, 64)
    loss = velocity_mapping_loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))  # the same draw
    alpha, sigma = (expand_like(v, x0) for v in sched.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    u_hat = diffusion_v_to_rf_velocity(model(x_t, t), x_t, alpha, sigma)  # handbook 2.4.5, by the other route
    torch.testing.assert_close(loss, ((u_hat - (eps - x0)) ** 2).mean(1), rtol=1e-4, atol=1e-6)


def test_velocity_mapping_fine_tunes_a_vp_model_that_then_samples_on_the_straight_path(swd):
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    model = _mlp(sched, "v")
    ts = sched.timesteps(16)
    before = _quality(swd, model, "rf_euler", ts)
    gen = torch.Generator().manual_seed(0)
    _train(lambda _: velocity_mapping_loss(model, _data(256, gen), generator=gen).mean(), model.parameters(), 800)
    after = _quality(swd, model.eval(), "rf_euler", ts)
    assert after < 0.3 * before and after < 0.15, (before, after)  # 0.52 -> 0.11


def test_sds_gradient_is_the_weighted_noise_residual_and_its_loss_backpropagates_it():
    sched = S.DiscreteVP(1000, "linear")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="eps")
    x = torch.randn(32, 2, requires_grad=True)
    grad = score_distillation_grad(x, teacher, generator=torch.Generator().manual_seed(4))
    score_distillation_loss(x, teacher, generator=torch.Generator().manual_seed(4)).sum().backward()
    torch.testing.assert_close(x.grad, grad)
    # by hand: the same t and eps draws, w = sigma^2, eps_hat - eps
    g = torch.Generator().manual_seed(4)
    t = (sched.t_min + (0.02 + 0.96 * torch.rand(32, generator=g, dtype=torch.float64)) * (sched.t_max - sched.t_min)).round()
    assert t.min() >= 0.02 * 999 - 2 and t.max() <= 0.98 * 999 + 1  # integer DDPM steps inside the range
    eps = torch.randn(32, 2, generator=g)
    alpha, sigma = (v[:, None] for v in sched.alpha_sigma(t))
    by_hand = sigma**2 * (teacher(alpha * x.detach() + sigma * eps, t.float()) - eps)
    torch.testing.assert_close(grad, by_hand.float())


@pytest.mark.parametrize("weighting", ["dmd", "sds", "uniform"])
def test_dmd_and_vsd_gradients_with_a_given_fake_by_hand(weighting):
    """With a fake denoiser: DMD (Yin et al. eq. 7-8) ``(x0_fake - x0_real) / mean|x - x0_real|`` per
    sample; VSD (Wang et al. eq. 9) ``w (eps_real - eps_fake)``, ``w = sigma^2`` (sds) or 1. The real model
    predicts x0 and the fake eps, so both conversions are exercised; the loss backpropagates the grad."""
    sched = S.DiscreteVP(1000, "linear")
    real = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="x0")
    fake = GaussianMixtureDenoiser(sched, 0.5 * MEANS + 0.3, 2 * COVS, prediction="eps")  # a given fake score
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = score_distillation_grad(x, real, fake=fake, weighting=weighting, generator=torch.Generator().manual_seed(4))
    score_distillation_loss(x, real, fake=fake, weighting=weighting,
                            generator=torch.Generator().manual_seed(4)).sum().backward()
    torch.testing.assert_close(x.grad, grad)
    g = torch.Generator().manual_seed(4)  # the same draws: t (integer steps in the default (0.02, 0.98)), eps
    u = 0.02 + 0.96 * torch.rand(32, generator=g, dtype=torch.float64)
    t = (sched.t_min + u * (sched.t_max - sched.t_min)).round()
    eps = torch.randn(32, 2, generator=g, dtype=torch.float64)
    alpha, sigma = (v[:, None] for v in sched.alpha_sigma(t))
    xd = x.detach()
    x_t = alpha * xd + sigma * eps
    x0_real = real(x_t, t)
    eps_real = (x_t - alpha * x0_real) / sigma
    eps_fake = fake(x_t, t)
    x0_fake = (x_t - sigma * eps_fake) / alpha
    if weighting == "dmd":
        by_hand = (x0_fake - x0_real) / (xd - x0_real).abs().mean(1, keepdim=True)
    else:
        by_hand = (sigma**2 if weighting == "sds" else 1.0) * (eps_real - eps_fake)
    torch.testing.assert_close(grad, by_hand, rtol=1e-9, atol=1e-12)
    assert float(by_hand.abs().mean()) > 1e-2  # the two denoisers disagree: a real direction


def _nearest_mode_distance(x):
    return float(torch.cdist(x, MEANS).min(1).values.mean())


def test_sds_pulls_particles_onto_modes_and_vsd_keeps_their_spread(swd):
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "linear")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="eps")
    start = 1.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    sds = start.clone().requires_grad_(True)
    # DreamFusion's U(0.02, 0.98) pulls everything to the noised mixture's mean; low noise levels seek modes
    _train(lambda _: score_distillation_loss(sds, teacher, t_range=(0.02, 0.2), generator=gen).sum(), [sds], 800, lr=2e-2)
    assert _nearest_mode_distance(sds.detach()) < 0.3 * _nearest_mode_distance(start)
    # VSD: a fake score trained online on the particles replaces the added noise
    vsd = start.clone().requires_grad_(True)
    fake = _mlp(sched, "eps")
    fake_opt = torch.optim.Adam(fake.parameters(), lr=2e-3)

    def vsd_step(_):
        fl = fake_score_loss(fake, vsd, generator=gen).mean()
        fake_opt.zero_grad()
        fl.backward()
        fake_opt.step()
        return score_distillation_loss(vsd, teacher, fake=fake, t_range=(0.02, 0.2), generator=gen).sum()

    _train(vsd_step, [vsd], 500, lr=2e-2)
    spread = lambda p: float(torch.cdist(p, MEANS).min(1).values.square().mean())  # noqa: E731
    target = spread(_data(20000, torch.Generator().manual_seed(2)))  # 2 x 0.05 per mode
    assert swd(vsd.detach()) < swd(start) * 0.4, (swd(vsd.detach()), swd(start))  # 0.80 -> 0.26
    assert abs(spread(vsd.detach()) - target) < abs(spread(sds.detach()) - target), \
        (spread(vsd.detach()), spread(sds.detach()), target)


def test_dmd_trains_a_one_step_generator(swd):
    """Distribution matching alone: a one-step generator trained only by DMD's gradient against an
    online fake score (DMD2's two time-scale rule: 2 fake updates per generator step) goes from SWD ~1.1
    to ~0.3. No regression term: on this toy the regression on exact teacher ODE pairs alone reaches ~0.11
    and would pass with the DMD gradient broken. With the DMD term removed the generator stays at ~1.1;
    with the fake score ignored (x0_fake = x, mode seeking) it collapses to the mean, ~1.14."""
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="x0")
    gen_model, fake = (Denoiser(MLPDenoiser(2, hidden=64, depth=3, time_dim=32), sched, "x0") for _ in range(2))
    g = torch.Generator().manual_seed(1)
    draw = lambda n: prior(teacher, (n, 2), generator=g)  # noqa: E731
    with torch.no_grad():
        before = swd(one_step(gen_model, draw(4000)))
    fake_opt = torch.optim.Adam(fake.parameters(), lr=5e-3, betas=(0.5, 0.99))

    def step(_):
        for _ in range(2):
            with torch.no_grad():
                x = one_step(gen_model, draw(128))
            fl = fake_score_loss(fake, x, generator=g).mean()
            fake_opt.zero_grad()
            fl.backward()
            fake_opt.step()
        return score_distillation_loss(one_step(gen_model, draw(128)), teacher, fake=fake, weighting="dmd",
                                       generator=g).mean()

    _train(step, gen_model.parameters(), 400, lr=2e-3, betas=(0.5, 0.99))
    with torch.no_grad():
        after = swd(one_step(gen_model.eval(), draw(4000)))
    assert after < 0.4 * before, (before, after)  # 1.10 -> 0.35 (0.29-0.35 over 4 seeds)


class _Disc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, 1))

    def forward(self, x, t, cond=None):
        return self.net(x).squeeze(-1)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert float(discriminator_loss(real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert float(generator_adv_loss(fake)) == pytest.approx(0.75)
    sp = torch.nn.functional.softplus
    assert float(discriminator_loss(real, fake, "nonsaturating")) == pytest.approx(float(sp(-real).mean() + sp(fake).mean()))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_adv_loss(fake, "wasserstein")


def test_add_losses_by_hand():
    """ADD's distillation target is the teacher's x0 of the re-noised student sample, weighted by
    alpha_t (Sauer et al. eq. 5); the discriminator loss gives the student no gradient."""
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="x0")
    student, disc = _mlp(sched, "x0"), _Disc()
    x0 = _data(64, torch.Generator().manual_seed(0))
    times = sched.timesteps(4)[:-1]
    losses = add_losses(student, teacher, disc, x0, student_times=times, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in add_losses' order
    s = times.float()[torch.randint(0, 4, (64,), generator=g)]
    a, sg = (v[:, None] for v in sched.alpha_sigma(s))
    with torch.no_grad():
        xs = student.x0_eps(a * x0 + sg * torch.randn(64, 2, generator=g), s)[0]
        t = sched.sample_t(64, generator=g)
        at, st = (v[:, None] for v in sched.alpha_sigma(t))
        target = teacher(at * xs + st * torch.randn(64, 2, generator=g), t)
        distill = (at[:, 0] * ((xs - target) ** 2).mean(1)).mean()
        adversarial = -disc(xs, None).mean()
    torch.testing.assert_close(losses["distill"], distill)
    torch.testing.assert_close(losses["adversarial"], adversarial)
    torch.testing.assert_close(losses["generator"].detach(), adversarial + 2.5 * distill)
    losses["discriminator"].backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in disc.parameters())


class _ConditionalMixture(DenoiserBase):
    """Exact denoiser given a one-hot component ``cond [B, 3]`` (all zeros: the whole mixture)."""

    def __init__(self, sched):
        super().__init__()
        self.schedule, self.prediction = sched, "x0"
        self.parts = [GaussianMixtureDenoiser(sched, MEANS[k:k + 1], COVS[k:k + 1]) for k in range(3)]
        self.full = GaussianMixtureDenoiser(sched, MEANS, COVS)

    def forward(self, x, t, cond=None):
        out = self.full(x, t)
        if cond is None:
            return out
        for k, part in enumerate(self.parts):
            rows = cond[:, k] > 0
            if rows.any():
                out[rows] = part(x[rows], t[rows] if t.dim() else t)
        return out


def test_guided_student_matches_the_cfg_teacher_at_every_weight():
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    teacher = _ConditionalMixture(sched)
    null = torch.zeros(3)
    student = _mlp(sched, "v", obs_dim=4)  # one-hot class + w
    g = torch.Generator().manual_seed(0)

    def batch(n):
        k = torch.randint(0, 3, (n,), generator=g)
        return MEANS[k] + 0.05**0.5 * torch.randn(n, 2, generator=g), torch.nn.functional.one_hot(k, 3).float()

    def loss(_):
        x0, c = batch(256)
        return guided_distillation_loss(student, teacher, x0, c, null_cond=null, w_range=(1.0, 4.0), generator=g).mean()

    _train(loss, student.parameters(), 800)
    student.eval()
    c = torch.nn.functional.one_hot(torch.arange(600) % 3, 3).float()
    ts = sched.timesteps(16)
    for w in (1.0, 3.0):
        x = prior(teacher, (600, 2), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = run_sampler("ddim", CFGDenoiser(teacher, w, null), x.clone(), ts, cond=c)
            got = run_sampler("ddim", student, x.clone(), ts, cond=with_guidance(c, torch.full((600,), w)))
        err = float((got - want).norm(dim=1).mean())
        assert err < 0.15, (w, err)  # the same noise lands on the same guided sample
    with torch.no_grad():  # and w is used: the two weights give different samples
        x = prior(teacher, (600, 2), generator=torch.Generator().manual_seed(3))
        a = run_sampler("ddim", student, x.clone(), ts, cond=with_guidance(c, torch.full((600,), 1.0)))
        b = run_sampler("ddim", student, x.clone(), ts, cond=with_guidance(c, torch.full((600,), 3.0)))
    assert float((a - b).norm(dim=1).mean()) > 0.05


def test_ode_pairs_refuse_stochastic_couplings():
    teacher = GaussianMixtureDenoiser(S.RectifiedFlow(), MEANS, COVS, prediction="rf_velocity")
    for sampler, kw in (("ddpm", {}), ("lcm", {}), ("consistency", {}), ("ddim", {"eta": 1.0})):
        with pytest.raises(ValueError, match="deterministic ODE coupling"):
            ode_pairs(teacher, (4, 2), 2, sampler=sampler, **kw)


def test_score_distillation_times_are_log_uniform_in_sigma_on_edm():
    from diffpolicy.distill.score_distillation import _times
    sched = S.EDM()
    t = _times(sched, 20000, (0.0, 1.0), torch.Generator().manual_seed(0), "cpu", torch.float64)
    assert float(t.min()) >= sched.sigma_min and float(t.max()) <= sched.t_max
    mid = (torch.tensor(sched.sigma_min).log() + torch.tensor(sched.t_max).log()) / 2
    assert abs(float(t.log().median()) - float(mid)) < 0.1  # not the linear-in-sigma mass at sigma ~ 40

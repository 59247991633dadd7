"""The denoising-chain MDP: one step, rollouts, re-scoring."""
import pytest
import torch

from diffpolicy import schedules as S
from diffpolicy.chain import denoise_step, gaussian_log_prob, rescore, rollout, set_reward, step_distribution
from diffpolicy.denoiser import Denoiser
from diffpolicy.nets import MLPDenoiser


def _den(kind="eps", sched=None, obs_dim=0):
    torch.manual_seed(0)
    return Denoiser(MLPDenoiser(2, obs_dim=obs_dim, hidden=32, depth=2, time_dim=8), sched or S.DiscreteVP(100), kind)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_normal_density(reduction):
    mean, std, v = torch.randn(5, 3, 2), torch.rand(5, 3, 2) + 0.1, torch.randn(5, 3, 2)
    ref = torch.distributions.Normal(mean, std).log_prob(v).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(gaussian_log_prob(v, mean, std, reduction), ref)
    with pytest.raises(ValueError, match="valid: mean, sum"):
        gaussian_log_prob(v, mean, std, "max")


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("kind,ptype", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
def test_step_matches_diffusers_ddim(eta, kind, ptype):
    from diffusers import DDIMScheduler
    N = 100
    den = _den(kind, S.DiscreteVP(N))
    sched = DDIMScheduler(num_train_timesteps=N, prediction_type=ptype, clip_sample=False)
    sched.set_timesteps(10)
    x = torch.randn(4, 2)
    for t in (90, 50, 10):
        tt, ss = torch.full((4,), float(t)), torch.full((4,), float(t - 10))
        mean, std = step_distribution(den, x, tt, ss, eta=eta)
        pred = den(x, tt)
        ref_mean = sched.step(pred, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ref_std = eta * sched._get_variance(t, t - 10) ** 0.5
        torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, torch.full_like(std, float(ref_std)), rtol=1e-5, atol=1e-6)


def test_eta_one_is_the_ddpm_posterior():
    """Ho et al. 2020 eq. 7 for adjacent steps t -> t - 1."""
    sched = S.DiscreteVP(100)
    den = _den("x0", sched)
    x, t = torch.randn(3, 2), 40
    mean, std = step_distribution(den, x, torch.full((3,), 40.0), torch.full((3,), 39.0), eta=1.0)
    abar, beta = sched.alphas_cumprod.float(), sched.betas.float()
    x0 = den(x, torch.full((3,), 40.0))
    mu = (abar[t - 1].sqrt() * beta[t] / (1 - abar[t])) * x0 + ((1 - beta[t]).sqrt() * (1 - abar[t - 1]) / (1 - abar[t])) * x
    var = (1 - abar[t - 1]) / (1 - abar[t]) * beta[t]
    torch.testing.assert_close(mean, mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, torch.full_like(std, float(var.sqrt())), rtol=1e-5, atol=1e-7)


def test_step_is_batched_over_time():
    den = _den()
    x = torch.randn(3, 2)
    t, s = torch.tensor([90.0, 50.0, 20.0]), torch.tensor([80.0, 30.0, 0.0])
    mean, std = step_distribution(den, x, t, s)
    for i in range(3):
        m, sd = step_distribution(den, x[i:i + 1], t[i:i + 1], s[i:i + 1])
        torch.testing.assert_close(mean[i:i + 1], m)
        torch.testing.assert_close(std[i:i + 1], sd)


def test_rescore_reproduces_stored_log_probs_and_scores_given_actions():
    den = _den(obs_dim=3)
    sched = den.schedule
    obs = torch.randn(6, 3)
    td = rollout(den, torch.randn(6, 2), sched.timesteps(5), obs, eta=1.0, min_logprob_std=1e-3,
                 generator=torch.Generator().manual_seed(0))
    assert td.batch_size == torch.Size([6, 5]) and td["cond"].shape == (6, 5, 3)
    assert td["next", "done"][:, -1].all() and not td["next", "done"][:, :-1].any()
    with torch.no_grad():
        lp = rescore(den, td, min_logprob_std=1e-3)
    torch.testing.assert_close(lp, td["log_prob"], rtol=1e-5, atol=1e-5)
    ratio = (lp - td["log_prob"]).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-5, atol=1e-5)
    # scoring a given x_prev with denoise_step agrees
    out = denoise_step(den, td["x"][:, 2], td["t"][:, 2], td["s"][:, 2], obs, x_prev=td["next", "x"][:, 2],
                       min_logprob_std=1e-3)
    torch.testing.assert_close(out.log_prob, td["log_prob"][:, 2], rtol=1e-5, atol=1e-5)


def test_only_the_fine_tuned_steps_carry_gradients():
    den = _den()
    frozen = _den()
    with torch.no_grad():  # a different (e.g. pre-trained) model for the early steps
        for p in frozen.parameters():
            p.add_(0.2 * torch.randn_like(p))
    td = rollout(den, torch.randn(4, 2), den.schedule.timesteps(6), train_steps=2, frozen=frozen, grad=True,
                 min_logprob_std=0.1)
    params = list(den.parameters())
    early = torch.autograd.grad(td["mean"][:, :4].sum(), params, retain_graph=True, allow_unused=True)
    late = torch.autograd.grad(td["mean"][:, 4:].sum(), params, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in early)
    assert sum(float(g.abs().sum()) for g in late if g is not None) > 0
    # The early steps are the frozen model's (its weights differ from den's), the late ones den's.
    for k, model in ((1, frozen), (3, frozen), (4, den), (5, den)):
        with torch.no_grad():
            mean, _ = step_distribution(model, td["x"][:, k], td["t"][:, k], td["s"][:, k])
        torch.testing.assert_close(td["mean"][:, k].detach(), mean, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        other, _ = step_distribution(den, td["x"][:, 1], td["t"][:, 1], td["s"][:, 1])
    assert float((other - td["mean"][:, 1]).abs().max()) > 1e-3
    td["next", "x"][:, -1].sum().backward()
    assert all(p.grad is not None for p in den.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    # re-scoring the last K' steps: gradients flow into the policy from those steps only
    den.zero_grad()
    rescore(den, td[:, 4:].detach(), min_logprob_std=0.1).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in den.parameters()) > 0


def test_set_reward_and_errors():
    den = _den()
    td = rollout(den, torch.randn(4, 2), den.schedule.timesteps(3), min_logprob_std=0.1)
    set_reward(td, torch.arange(4.0))
    assert td["next", "reward"][:, -1, 0].tolist() == [0, 1, 2, 3] and td["next", "reward"][:, :-1].abs().sum() == 0
    with pytest.raises(ValueError, match="reward must have shape"):
        set_reward(td, torch.zeros(3))
    with pytest.raises(ValueError, match="no log-prob"):
        rollout(den, torch.randn(4, 2), den.schedule.timesteps(3), eta=0.0)
    with pytest.raises(ValueError, match="cond has batch size 2"):
        rollout(_den(obs_dim=3), torch.randn(4, 2), den.schedule.timesteps(3), torch.zeros(2, 3), min_logprob_std=0.1)
    with pytest.raises(ValueError, match="train_steps must be in"):
        rollout(den, torch.randn(4, 2), den.schedule.timesteps(3), train_steps=5, min_logprob_std=0.1)


def test_min_std_floors_exploration_noise():
    den = Denoiser(lambda x, t, c: torch.zeros_like(x), S.DiscreteVP(100), "eps")
    x = torch.zeros(20000, 1)
    t, s = torch.full((20000,), 5.0), torch.full((20000,), 4.0)
    out = denoise_step(den, x, t, s, min_std=0.5, reduction=None, generator=torch.Generator().manual_seed(0))
    assert float(out.std.max()) < 0.1 and abs(float((out.x_prev - out.mean).std()) - 0.5) < 0.01
    clipped = denoise_step(den, x, t, s, min_std=0.5, noise_clip=1.0, reduction=None)
    assert float((clipped.x_prev - clipped.mean).abs().max()) <= 0.5 + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clip_x0", [None, 0.5])
def test_fused_rollout_equals_the_generic_step(reduction, clip_x0):
    den = _den(obs_dim=3)
    obs, x = torch.randn(5, 3), torch.randn(5, 2) * 2
    kw = dict(eta=0.7, min_std=0.2, min_logprob_std=0.1, noise_clip=2.0, reduction=reduction, clip_x0=clip_x0)
    ts = den.schedule.timesteps(6)
    fused = rollout(den, x, ts, obs, generator=torch.Generator().manual_seed(3), **kw)
    gen, xk, steps = torch.Generator().manual_seed(3), x, []  # the same chain, one denoise_step at a time
    for k in range(6):
        out = denoise_step(den, xk, torch.full((5,), float(ts[k])), torch.full((5,), float(ts[k + 1])), obs,
                           generator=gen, **kw)
        steps.append(dict(x=xk, mean=out.mean, std=out.std, log_prob=out.log_prob, next_x=out.x_prev))
        xk = out.x_prev
    generic = {key: torch.stack([st[key] for st in steps], 1) for key in steps[0]}
    generic[("next", "x")] = generic.pop("next_x")
    if clip_x0 is not None:  # the clip is active somewhere, else this case tests nothing new
        x0, _ = den.x0_eps(x, torch.full((5,), float(ts[0])), obs)
        assert bool((x0.abs() > clip_x0).any())
    for key in ("x", "mean", "std", "log_prob", ("next", "x")):
        torch.testing.assert_close(fused[key], generic[key], rtol=1e-5, atol=1e-5)

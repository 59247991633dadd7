"""Losses against independent references."""
import math

import pytest
import torch
from tensordict import TensorDict

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser, EDMPrecond
from diffpolicy.ema import EMA
from diffpolicy.losses import (
    DenoisingLoss, consistency_distillation_loss, ct_num_scales, diffusion_loss, flow_matching_loss,
    loss_weight, pseudo_huber, trigflow_loss,
)
from diffpolicy.nets import MLPDenoiser
from diffpolicy.toys import GaussianMixtureDenoiser
from gaussian_toy import COV, MU, GaussianFlowMap


def _net(obs_dim=0):
    return MLPDenoiser(x_dim=2, obs_dim=obs_dim, hidden=32, depth=2, time_dim=8)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_diffusion_loss_by_hand(kind):
    net, sched = _net(), S.DiscreteVP()
    den = Denoiser(net, sched, kind)
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 1000, (8,)).float()
    a, s = (v[:, None].float() for v in sched.alpha_sigma(t))
    x_t = a * x0 + s * noise
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[kind]
    ref = ((net(x_t, t, None) - target) ** 2).mean(1)
    torch.testing.assert_close(diffusion_loss(den, x0, t=t, noise=noise), ref)


def test_diffusion_loss_mask_by_hand():
    net, sched = _net(), S.DiscreteVP()
    den = Denoiser(net, sched, "eps")
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 1000, (8,)).float()
    a, s = (v[:, None].float() for v in sched.alpha_sigma(t))
    sq = (net(a * x0 + s * noise, t, None) - noise) ** 2
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]] * 2, dtype=torch.bool)
    ref = (sq * mask).sum(1) / mask.sum(1).clamp_min(1)  # the mean over the masked-in elements; 0 for none
    torch.testing.assert_close(diffusion_loss(den, x0, t=t, noise=noise, mask=mask), ref)
    row_mask = torch.tensor([True, False] * 4)[:, None]  # broadcast over the event
    torch.testing.assert_close(diffusion_loss(den, x0, t=t, noise=noise, mask=row_mask),
                               sq.mean(1) * row_mask[:, 0])
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast to x0 \(8, 2\)"):
        diffusion_loss(den, x0, t=t, noise=noise, mask=torch.ones(3))


def test_min_snr_weights_closed_forms():
    """Hang et al. 2023: eps -> min(SNR, g)/SNR, x0 -> min(SNR, g), v -> min(SNR, g)/(SNR + 1)."""
    sched = S.VPSDE()
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    snr = a**2 / s**2
    m = snr.clamp(max=5.0)
    torch.testing.assert_close(loss_weight("min_snr", "eps", a, s), m / snr)
    torch.testing.assert_close(loss_weight("min_snr", "x0", a, s), m)
    torch.testing.assert_close(loss_weight("min_snr", "v", a, s), m / (snr + 1))


def test_edm_weighting_equals_unit_weight_on_network_output():
    """Karras et al. 2022 eq. 8: lambda(s) ||D - x0||^2 = c_out^2 lambda ||F - F_target||^2, c_out^2 lambda = 1."""
    net, sched = _net(), S.EDM()
    den = Denoiser(net, sched, precond=EDMPrecond(0.5))
    x0, noise, sig = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16) * 5 + 0.05
    loss = diffusion_loss(den, x0, t=sig, noise=noise, weighting="edm")
    sd = 0.5
    c_skip = sd**2 / (sig**2 + sd**2)
    c_out = sig * sd / (sig**2 + sd**2).sqrt()
    c_in = 1 / (sig**2 + sd**2).sqrt()
    x = x0 + sig[:, None] * noise
    F = net(c_in[:, None] * x, 250 * sig.log(), None)
    F_target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    torch.testing.assert_close(loss, ((F - F_target) ** 2).mean(1), rtol=1e-4, atol=1e-5)


def test_flow_matching_and_trigflow_targets():
    rf = S.RectifiedFlow()
    net = _net()
    den = Denoiser(net, rf, "rf_velocity")
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    ref = ((net(x_t, 1000 * t, None) - (noise - x0)) ** 2).mean(1)
    torch.testing.assert_close(flow_matching_loss(den, x0, t=t, noise=noise), ref)
    tf = S.TrigFlow(sigma_data=0.5)
    from diffpolicy.denoiser import TrigFlowPrecond
    den = Denoiser(net, tf, precond=TrigFlowPrecond())
    t = torch.rand(8) * 1.5
    z = 0.5 * noise
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * z
    F_target = (t.cos()[:, None] * z - t.sin()[:, None] * x0) / 0.5  # Lu & Song 2025 eq. 7
    ref = ((net(x_t / 0.5, tf.net_time(t), None) - F_target) ** 2).mean(1)
    torch.testing.assert_close(trigflow_loss(den, x0, t=t, noise=noise), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rf_velocity"):
        flow_matching_loss(Denoiser(net, rf, "eps"), x0)


def test_ct_num_scales_and_pseudo_huber():
    K = 1000
    kp = math.floor(K / (math.log2(1280 / 10) + 1))
    assert ct_num_scales(0, K) == 11
    assert ct_num_scales(kp, K) == 21
    assert ct_num_scales(K - 1, K) == 1281
    a, b = torch.zeros(2, 4), torch.tensor([[0.0] * 4, [3.0, 4.0, 0, 0]])
    c = 0.00054 * 2
    torch.testing.assert_close(pseudo_huber(a, b), torch.tensor([0.0, math.sqrt(25 + c**2) - c]))


@pytest.mark.parametrize("sched", [S.EDM(), S.DiscreteVP(), S.RectifiedFlow()], ids=repr)
def test_consistency_distillation_vanishes_for_the_exact_consistency_function(sched):
    """With the exact teacher and the exact flow map as student the CD loss is ~0; a wrong student is not."""
    teacher = GaussianMixtureDenoiser(sched, MU, COV, prediction="x0")
    exact = GaussianFlowMap(sched)
    x0 = MU + torch.randn(512, 2) @ torch.linalg.cholesky(COV[0]).T
    good = consistency_distillation_loss(exact, teacher, x0, num_scales=40, teacher_steps=8).mean()
    bad = consistency_distillation_loss(teacher, teacher, x0, num_scales=40, teacher_steps=8).mean()
    assert float(good) < 2e-4 and float(bad) > 20 * float(good), (float(good), float(bad))


def test_consistency_distillation_needs_one_schedule():
    teacher = GaussianMixtureDenoiser(S.DiscreteVP(), MU, COV)
    with pytest.raises(ValueError, match="share one schedule"):
        consistency_distillation_loss(GaussianFlowMap(S.EDM()), teacher, torch.randn(4, 2))


def test_denoising_loss_module_keys():
    den = Denoiser(_net(obs_dim=3), S.DiscreteVP(), "eps")
    loss = DenoisingLoss(den)
    td = TensorDict({"action": torch.randn(8, 2), "observation": torch.randn(8, 3)}, [8])
    out = loss(td)
    assert set(out.keys()) == {"loss_diffusion"} and out["loss_diffusion"].requires_grad
    loss.set_keys(sample="act", cond=("obs", "state"))
    td2 = TensorDict({"act": td["action"], "obs": {"state": td["observation"]}}, [8])
    assert loss(td2)["loss_diffusion"].isfinite()
    assert loss.in_keys == ["act", ("obs", "state")]
    with pytest.raises(ValueError, match="valid: uniform, min_snr, edm"):
        DenoisingLoss(den, weighting="snr+1")


def test_diffusion_loss_bad_inputs():
    den = Denoiser(_net(obs_dim=3), S.DiscreteVP(), "eps")
    with pytest.raises(ValueError, match="cond has batch size 4"):
        diffusion_loss(den, torch.randn(8, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="t must lie"):
        diffusion_loss(den, torch.randn(8, 2), torch.randn(8, 3), t=torch.full((8,), 2000.0))


def test_ema_matches_closed_form():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)  # first update copies
    expected = torch.zeros(1, 2)
    for k in range(1, 4):
        with torch.no_grad():
            model.weight.fill_(float(k))
        ema.update(model)
        expected = 0.9 * expected + 0.1 * k
    torch.testing.assert_close(ema.module.weight, expected)
    assert not ema.module.weight.requires_grad
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay(0) == pytest.approx(0.1) and warm.current_decay(10**6) == 0.999


def test_ema_warmup_continues_after_loading_a_state_dict():
    model = torch.nn.Linear(2, 1, bias=False)
    straight, first = EMA(model, 0.99, warmup=True), EMA(model, 0.99, warmup=True)
    for k in range(6):
        with torch.no_grad():
            model.weight.fill_(float(k))
        straight.update(model)
        if k < 3:
            first.update(model)
        if k == 2:
            resumed = EMA(model, 0.99, warmup=True)
            resumed.load_state_dict(first.state_dict())
        if k >= 3:
            resumed.update(model)  # must use the warmup decay of update k, not of update k - 3
    torch.testing.assert_close(resumed.module.weight, straight.module.weight, rtol=0, atol=0)


def test_consistency_distillation_anchors_the_boundary():
    """A student that ignores its input (x0 = 0) must not reach zero loss: the last pair ends at
    the data end, where the consistency function is the identity (Song et al. 2023 Alg. 2)."""
    sched = S.DiscreteVP(1000)
    teacher = GaussianMixtureDenoiser(sched, MU, COV, prediction="eps")
    trivial = Denoiser(lambda x, t, c: torch.zeros_like(x), sched, "x0")
    x0 = MU + torch.randn(512, 2) @ torch.linalg.cholesky(COV[0]).T
    loss = consistency_distillation_loss(trivial, teacher, x0, num_scales=10, generator=torch.Generator().manual_seed(0))
    hit = (loss > 0.05).float().mean()  # the boundary pair: 1 in num_scales of the batch
    assert float(loss.max()) > 0.2 and 0.04 < float(hit) < 0.2, (float(loss.max()), float(hit))


def test_consistency_distillation_with_guided_teacher():
    sched = S.DiscreteVP(1000)
    calls = []
    def net(x, t, c):
        calls.append(c)
        return torch.zeros_like(x) if c is None else 0.1 * torch.ones_like(x)
    teacher = Denoiser(net, sched, "eps")
    student = Denoiser(lambda x, t, c: torch.zeros_like(x), sched, "x0")
    cond = torch.ones(8, 1)
    loss = consistency_distillation_loss(student, teacher, torch.randn(8, 2), cond, num_scales=5, guidance_scale=3.0)
    assert loss.shape == (8,) and any(c is None for c in calls) and any(c is not None for c in calls)


def test_consistency_training_weights_and_stop_gradient():
    sched = S.EDM()
    net = _net()
    from diffpolicy.denoiser import ConsistencyPrecond
    model = Denoiser(net, sched, precond=ConsistencyPrecond())
    x0 = torch.randn(64, 2)
    from diffpolicy.losses import consistency_training_loss
    loss = consistency_training_loss(model, x0, step=0, total_steps=100, generator=torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (64,) and bool((loss >= 0).all())
    assert all(p.grad is not None for p in net.parameters())
    # an exact consistency function in the identity limit: a model returning x0 itself gives zero loss
    class Oracle(torch.nn.Module):
        schedule, prediction = sched, "x0"
        def forward(self, x, t, cond=None):
            return x0
    assert float(consistency_training_loss(Oracle(), x0, step=5, total_steps=100).abs().max()) < 1e-6


def test_min_snr_is_finite_at_zero_terminal_snr():
    sched = S.DiscreteVP(1000, "scaled_linear", 0.00085, 0.012, zero_terminal_snr=True)
    t = torch.tensor([999.0, 500.0], dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    w = loss_weight("min_snr", "eps", a, s)
    assert bool(torch.isfinite(w).all()) and float(w[0]) == 1.0
    with pytest.raises(ValueError, match="not finite"):
        loss_weight("edm", "eps", a, s)


def test_edm_training_accepts_sigmas_beyond_sigma_max():
    den = Denoiser(_net(), S.EDM(), precond=EDMPrecond(0.5))
    loss = diffusion_loss(den, torch.randn(4, 2))  # sampled sigmas are log-normal, unbounded
    assert loss.shape == (4,)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        diffusion_loss(den, torch.randn(4, 2), t=torch.ones(3))


def test_ema_with_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5)
    model(torch.randn(8, 2))
    ema.update(model)
    ema.update(model)
    assert int(ema.module[1].num_batches_tracked) == 1

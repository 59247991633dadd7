"""Reward fine-tuning of a tiny image model: the rewards, DRaFT's truncated gradient, DDPO-IS
against DDPO-SF, and each method raising the reward within a few seeded iterations."""
import pytest
import torch

from diffpolicy import schedules as S
from diffpolicy.agents.ddpo import DDPO
from diffpolicy.agents.draft import DRaFT
from diffpolicy.agents.image_drwr import ImageDRWR
from diffpolicy.agents.refl import ReFL
from diffpolicy.chain_losses import ChainPPOLoss, ChainScoreFunctionLoss
from diffpolicy.denoiser import Denoiser
from diffpolicy.images import DigitClassifier
from diffpolicy.images.rewards import Brightness, ClassLogProb, Contrast, FnReward, JpegSize, make_reward
from diffpolicy.nets import Unet2D


def _model(seed=0):
    torch.manual_seed(seed)
    return Denoiser(Unet2D(1, 8, (1, 2), 1, num_classes=10), S.DiscreteVP(1000, "squaredcos_cap_v2"), "v")


def test_rewards_by_hand():
    x = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)])
    x[1, 0, :4] = -1.0  # half dark
    torch.testing.assert_close(Brightness()(x), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(Contrast()(x), torch.tensor([0.0, 0.25 * 64 / 63]).sqrt())
    flat, noisy = torch.zeros(1, 1, 8, 8), torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    comp = JpegSize(compressible=True)
    assert float(comp(flat)) > float(comp(noisy)) and float(JpegSize(False)(noisy)) == -float(comp(noisy))
    assert not comp.differentiable and Brightness().differentiable
    clf = DigitClassifier().eval()
    r = ClassLogProb(target=3, classifier=clf)
    img = noisy.repeat(2, 1, 1, 1).requires_grad_(True)
    want = torch.log_softmax(clf(img), -1)
    torch.testing.assert_close(r(img), want[:, 3])
    torch.testing.assert_close(r(img, torch.tensor([1, 7])), torch.stack([want[0, 1], want[1, 7]]))
    r(img).sum().backward()
    assert img.grad is not None and float(img.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        make_reward("aesthetic")
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        FnReward(lambda im, c: im.mean(), differentiable=True)(x)


def test_draft_and_refl_refuse_a_non_differentiable_reward():
    for cls in (DRaFT, ReFL):
        with pytest.raises(ValueError, match="not differentiable"):
            cls(_model(), JpegSize(), 8)


def test_draft_gradient_flows_through_the_last_k_steps_only():
    tuner = DRaFT(_model(), Brightness(), 8, sampling_steps=6, grad_steps=2, batch_size=4)
    calls, inner = [], tuner.model.net.forward
    tuner.model.net.forward = lambda x, t, cond=None: (calls.append(torch.is_grad_enabled()), inner(x, t, cond))[1]
    tuner.loss(0, torch.Generator().manual_seed(0)).backward()
    assert calls == [False] * 4 + [True] * 2
    assert all(p.grad is not None for p in tuner.model.parameters() if p.requires_grad)


def test_ddpo_is_with_one_epoch_and_no_clip_has_the_score_function_gradient():
    tuner = DDPO(_model(), Brightness(), 8, sampling_steps=4, batch_size=6, importance_sampling=True)
    td = tuner.collect(torch.Generator().manual_seed(0)).reshape(-1)
    grads = []
    for loss in (ChainPPOLoss(tuner.model, clip_epsilon=1e9, reduction="mean"),
                 ChainScoreFunctionLoss(tuner.model, reduction="mean")):
        tuner.model.zero_grad()
        loss(td)["loss_objective"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in tuner.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert float(grads[0].abs().sum()) > 0


@pytest.mark.parametrize("method,settings", [
    (DDPO, dict(importance_sampling=False, lr=3e-4)),
    (DDPO, dict(importance_sampling=True, inner_epochs=2, clip_epsilon=0.2, lr=3e-4)),
    (DRaFT, dict(grad_steps=2, lr=1e-3)),
    (ReFL, dict(late_steps=3, lr=1e-3)),
    (ImageDRWR, dict(beta=2.0, lr=1e-3)),
])
def test_each_method_raises_the_brightness(method, settings):
    tuner = method(_model(), Brightness(), 8, sampling_steps=5, batch_size=16, **settings)
    before = tuner.evaluate(64, seed=1)
    tuner.fit(30, progress=False)
    after = tuner.evaluate(64, seed=1)
    # one pre-trained std in 30 iterations x 16 images (DDPO ~1.5 std, DRaFT / ReFL ~6; lr=0: no change)
    assert after["reward_mean"] > before["reward_mean"] + before["reward_std"], (before, after)


def test_kl_penalty_is_zero_at_the_start_and_keeps_the_model_near_the_pre_trained_one():
    g = torch.Generator().manual_seed(0)
    free = DRaFT(_model(), Brightness(), 8, sampling_steps=5, batch_size=16, grad_steps=2, lr=1e-3, kl_weight=1e-9)
    x, c = free.sample(8)
    assert float(free.kl_penalty(x, c, g).detach()) == 0.0
    tied = DRaFT(_model(), Brightness(), 8, sampling_steps=5, batch_size=16, grad_steps=2, lr=1e-3, kl_weight=30.0)
    for tuner in (free, tied):
        tuner.fit(30, progress=False)
    x, c = free.sample(64, seed=2)
    drift = [float(t.kl_penalty(x, c, torch.Generator().manual_seed(3)).detach()) for t in (free, tied)]
    gain = [t.evaluate(64, seed=1)["reward_mean"] for t in (free, tied)]
    assert drift[1] < 0.5 * drift[0], drift
    assert gain[1] < gain[0], gain


def test_contexts_follow_the_model():
    assert DRaFT(_model(), Brightness(), 8).config.num_classes == 10
    torch.manual_seed(0)
    uncond = Denoiser(Unet2D(1, 8, (1, 2), 1), S.DiscreteVP(1000), "v")
    tuner = DRaFT(uncond, Brightness(), 8, batch_size=4, sampling_steps=3)
    assert tuner.contexts(4) is None and tuner.loss(0, torch.Generator().manual_seed(0)).isfinite()
    with pytest.raises(ValueError, match="the model is unconditional"):
        DRaFT(uncond, Brightness(), 8, num_classes=10)


def test_ddpo_resumes_exactly_between_inner_epochs(tmp_path):
    """The per-context reward buffers and the reused batch are checkpointed with the model."""
    def tuner():
        torch.manual_seed(0)
        return DDPO(_model(), make_reward("brightness"), 8, sampling_steps=4, batch_size=8, importance_sampling=True,
                    inner_epochs=2)

    straight = tuner()
    straight.fit(5, progress=False)
    first = tuner()
    first.fit(3, run_dir=tmp_path, progress=False, checkpoint_every=3)  # stops inside an inner-epoch pair
    resumed = tuner()
    resumed.fit(5, run_dir=tmp_path, progress=False, checkpoint_every=3)
    assert resumed.standardize.buffers.keys() == straight.standardize.buffers.keys()
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

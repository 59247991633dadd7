"""Advantages and chain losses (the RL half of the chain core)."""
import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from diffpolicy import schedules as S
from diffpolicy.advantage import PerContextStandardizer, chain_advantage, env_gae, reward_weights, spread_over_chain
from diffpolicy.chain import rescore, rollout, set_reward
from diffpolicy.chain_losses import (
    ChainPPOLoss, ChainScoreFunctionLoss, DiffusionQLActorLoss, QScoreMatchingLoss, RewardWeightedLoss,
)
from diffpolicy.denoiser import Denoiser
from diffpolicy.nets import MLPDenoiser


def _den(obs_dim=2):
    torch.manual_seed(0)
    return Denoiser(MLPDenoiser(2, obs_dim=obs_dim, hidden=32, depth=2, time_dim=8), S.DiscreteVP(100), "eps")


def test_env_gae_matches_hand_computation():
    """T = 3, one env, critic V(s) = s: deltas and the GAE recursion by hand."""
    critic = TensorDictModule(lambda o: o, in_keys=["observation"], out_keys=["state_value"])
    obs = torch.tensor([[1.0], [2.0], [3.0]])
    nxt = torch.tensor([[2.0], [3.0], [4.0]])
    rew = torch.tensor([[1.0], [0.0], [2.0]])
    done = torch.tensor([[False], [False], [True]])
    td = TensorDict({"observation": obs, "next": {"observation": nxt, "reward": rew, "done": done,
                                                  "terminated": done.clone()}}, [3])
    g, lam = 0.9, 0.5
    env_gae(td, critic, gamma=g, lmbda=lam)
    d = [1 + g * 2 - 1, 0 + g * 3 - 2, 2 - 3]  # last step terminal: no bootstrap
    a2 = d[2]
    a1 = d[1] + g * lam * a2
    a0 = d[0] + g * lam * a1
    torch.testing.assert_close(td["advantage"].squeeze(-1), torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(td["value_target"], td["advantage"] + obs)


def test_spread_over_chain_discounts_earlier_denoising_steps():
    adv = torch.tensor([[2.0], [-1.0]])
    out = spread_over_chain(adv, 3, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5, 1.0, 2.0], [-0.25, -0.5, -1.0]]))


def test_per_context_standardizer_uses_batch_until_min_count():
    st = PerContextStandardizer(buffer_size=4, min_count=3)
    r = torch.tensor([1.0, 2.0, 10.0, 20.0])
    out = st([0, 0, 1, 1], r)  # 2 rewards per context < 3: batch statistics
    torch.testing.assert_close(out, (r - r.mean()) / (r.std(unbiased=False) + 1e-6))
    out = st([0, 0, 1, 1], torch.tensor([3.0, 4.0, 30.0, 40.0]))  # now 4 each: per-context
    b0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(out[:2], (torch.tensor([3.0, 4.0]) - b0.mean()) / (b0.std(unbiased=False) + 1e-6))
    st([0], torch.tensor([5.0]))  # bounded buffer drops the oldest
    assert list(st.buffers[0]) == [2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="cannot exceed"):
        PerContextStandardizer(buffer_size=2, min_count=5)


def test_reward_weights_clip():
    w = reward_weights(torch.tensor([0.0, 1.0, 10.0]), beta=1.0, max_weight=5.0)
    torch.testing.assert_close(w, torch.tensor([1.0, torch.e, 5.0]))


def _batch(den, n=64, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        td = rollout(den, torch.randn(n, 2, generator=g), den.schedule.timesteps(k), obs, min_logprob_std=0.05,
                     min_std=0.05, generator=g)
    r = -((td["next", "x"][:, -1] - 1.0) ** 2).sum(-1)
    set_reward(td, r)
    td["advantage"] = ((r - r.mean()) / r.std()).unsqueeze(1).expand(n, k)
    return td


def test_ppo_with_one_epoch_and_no_clip_has_the_score_function_gradient():
    den = _den()
    flat = _batch(den).reshape(-1)
    grads = []
    for loss in (ChainPPOLoss(den, clip_epsilon=1e9, min_logprob_std=0.05),
                 ChainScoreFunctionLoss(den, min_logprob_std=0.05)):
        den.zero_grad()
        loss(flat)["loss_objective"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in den.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_ppo_diagnostics_and_renamed_keys():
    den = _den()
    flat = _batch(den).reshape(-1)
    loss = ChainPPOLoss(den, min_logprob_std=0.05)
    out = loss(flat)
    assert float(out["ratio"]) == pytest.approx(1.0, abs=1e-4) and float(out["clip_fraction"]) == 0.0
    assert abs(float(out["approx_kl"])) < 1e-6
    renamed = flat.rename_key_("advantage", "adv").rename_key_("log_prob", ("old", "lp"))
    loss.set_keys(advantage="adv", log_prob=("old", "lp"))
    assert torch.isfinite(loss(renamed)["loss_objective"])


def _ppo_batch_at_ratios(den, ratios, adv):
    """Six chain transitions whose stored log-probs give the current policy the ratios ``ratios``."""
    flat = _batch(den, n=3, k=2).reshape(-1)
    with torch.no_grad():
        lp = rescore(den, flat, min_logprob_std=0.05)
    flat["log_prob"] = lp - ratios.log()  # r = exp(lp_new - lp_old)
    flat["advantage"] = adv
    return flat


def _ppo_grad(den, loss_value):
    den.zero_grad()
    loss_value.backward()
    return torch.cat([p.grad.flatten() for p in den.parameters()])


def test_ppo_clip_away_from_ratio_one_matches_hand_computation():
    """Ratios 0.5, 1.05, 2 with advantages of both signs, eps = 0.2 (Schulman et al. 2017 eq. 7).

    Per row min(r A, clip(r, 0.8, 1.2) A):
      r=0.5,  A=+1.5: min(0.75, 1.2)   = 0.75   unclipped (gradient flows)
      r=1.05, A=+0.7: inside the clip  = 0.735  unclipped
      r=2,    A=+2  : min(4, 2.4)      = 2.4    clipped (no gradient)
      r=0.5,  A=-1  : min(-0.5, -0.8)  = -0.8   clipped
      r=1.05, A=-0.3: inside the clip  = -0.315 unclipped
      r=2,    A=-0.8: min(-1.6, -0.96) = -1.6   unclipped
    """
    den = _den()
    r = torch.tensor([0.5, 1.05, 2.0, 0.5, 1.05, 2.0])
    adv = torch.tensor([1.5, 0.7, 2.0, -1.0, -0.3, -0.8])
    flat = _ppo_batch_at_ratios(den, r, adv)
    loss = ChainPPOLoss(den, clip_epsilon=0.2, min_logprob_std=0.05)
    out = loss(flat)
    hand = -(0.75 + 0.735 + 2.4 - 0.8 - 0.315 - 1.6) / 6
    assert float(out["loss_objective"].detach()) == pytest.approx(hand, abs=1e-5)
    assert float(out["clip_fraction"]) == pytest.approx(4 / 6)  # |r - 1| > 0.2: the r = 0.5 and r = 2 rows
    k3 = lambda x: (x - 1) - math.log(x)  # Schulman's k3 estimator of KL(old || new)
    assert float(out["approx_kl"]) == pytest.approx(2 * (k3(0.5) + k3(1.05) + k3(2.0)) / 6, rel=1e-4)
    assert float(out["ratio"]) == pytest.approx(float(r.mean()), rel=1e-5)
    # Gradient: -(1/N) sum over the unclipped rows of A r grad log p (clipped rows contribute nothing).
    g = _ppo_grad(den, out["loss_objective"])
    weights = -adv * r * torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]) / 6
    expected = _ppo_grad(den, (weights * rescore(den, flat, min_logprob_std=0.05)).sum())
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)

    # Per-transition eps (DPPO stores a "clip_epsilon" entry): clip(r, 1 - eps_i, 1 + eps_i) per row.
    #   eps 0.6 : r=0.5,  A=+1.5 -> 0.75 (inside);     r=0.5, A=-1 -> -0.5 (inside)
    #   eps 0.01: r=1.05, A=+0.7 -> 1.01 * 0.7 = 0.707 (clipped); r=1.05, A=-0.3 -> -0.315
    #   eps 1.5 : r=2,    A=+2   -> 4 (inside);        eps 0.3: r=2, A=-0.8 -> min(-1.6, -1.04) = -1.6
    flat["clip_epsilon"] = torch.tensor([0.6, 0.01, 1.5, 0.6, 0.01, 0.3])
    out_rows = loss(flat)
    hand_rows = -(0.75 + 0.707 + 4.0 - 0.5 - 0.315 - 1.6) / 6
    assert float(out_rows["loss_objective"].detach()) == pytest.approx(hand_rows, abs=1e-5)
    assert abs(float(out_rows["loss_objective"].detach()) - hand) > 0.1  # the per-row eps was not ignored
    assert float(out_rows["clip_fraction"]) == pytest.approx(3 / 6)  # rows 1.05/0.01, 1.05/0.01, 2/0.3
    g = _ppo_grad(den, out_rows["loss_objective"])
    weights = -adv * r * torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]) / 6
    expected = _ppo_grad(den, (weights * rescore(den, flat, min_logprob_std=0.05)).sum())
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["sf", "ppo"])
def test_chain_policy_gradient_raises_reward(name):
    den = _den()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    loss = (ChainScoreFunctionLoss if name == "sf" else ChainPPOLoss)(den, min_logprob_std=0.05)
    before = float(_batch(den, 512, seed=99)["next", "reward"].sum(1).mean())
    for it in range(25):
        flat = _batch(den, 128, seed=it).reshape(-1)
        opt.zero_grad(), loss(flat)["loss_objective"].backward(), opt.step()
    after = float(_batch(den, 512, seed=99)["next", "reward"].sum(1).mean())
    assert after > before + 0.3 * abs(before), (before, after)


def _sample(den, n, obs_dim=2, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        td = rollout(den, torch.randn(n, 2), den.schedule.timesteps(20), torch.zeros(n, obs_dim), eta=0.0, reduction=None)
    return td["next", "x"][:, -1]


def test_reward_weighted_loss_moves_towards_heavy_samples():
    """a ~ N(0, I) weighted by exp(-2 |a - 1|^2) is N(0.8, 0.2 I): the weighted fit moves there, the unweighted not."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 2, generator=g)
    means = {}
    for name, w in {"weighted": reward_weights(-((a - 1) ** 2).sum(-1), 2.0, max_weight=1e9),
                    "uniform": torch.ones(1024)}.items():
        den = _den()
        loss = RewardWeightedLoss(den, normalize=True)
        loss.set_keys(sample="a", cond="o", weight="w")
        td = TensorDict({"a": a, "o": torch.zeros(1024, 2), "w": w}, [1024])
        opt = torch.optim.Adam(den.parameters(), lr=3e-3)
        torch.manual_seed(5)
        for _ in range(300):
            opt.zero_grad(), loss(td)["loss_diffusion"].backward(), opt.step()
        means[name] = _sample(den, 2048).mean(0)
    assert bool((means["weighted"] > 0.35).all()) and bool((means["uniform"].abs() < 0.3).all()), means


def test_qsm_aligns_the_score_with_the_critic_gradient():
    den = _den()
    q = lambda obs, a: -((a - 1.0) ** 2).sum(-1)  # grad_a Q = -2 (a - 1): the score should point to a = 1
    loss = QScoreMatchingLoss(den, q, q_coeff=0.5)
    td = TensorDict({"action": torch.randn(256, 2), "observation": torch.zeros(256, 2)}, [256])
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = loss(td)["loss_qsm"].item()
    for _ in range(300):
        opt.zero_grad(), loss(td)["loss_qsm"].backward(), opt.step()
    torch.manual_seed(1)
    assert loss(td)["loss_qsm"].item() < 0.2 * first
    # -eps_hat = sigma * score must point along +grad Q (a sign error in the loss would flip this).
    a_t, t = torch.randn(512, 2) * 1.5, torch.full((512,), 50.0)
    with torch.no_grad():
        _, eps = den.x0_eps(a_t, t, torch.zeros(512, 2))
    cos = torch.nn.functional.cosine_similarity(-eps, -2 * (a_t - 1), dim=-1)
    assert float(cos.mean()) > 0.9, float(cos.mean())


def test_chain_advantage_on_the_nested_two_layer_layout():
    """DPPO's layout: env rollout [T] with the chain [T, K]; GAE by hand, then spread with gamma_d."""
    critic = TensorDictModule(lambda o: o, in_keys=["observation"], out_keys=["state_value"])
    T, K = 3, 2
    td = TensorDict({
        "observation": torch.tensor([[1.0], [2.0], [3.0]]),
        "chain": TensorDict({"x": torch.zeros(T, K, 1)}, [T, K]),
        "next": {"observation": torch.tensor([[2.0], [3.0], [4.0]]), "reward": torch.tensor([[1.0], [0.0], [2.0]]),
                 "done": torch.tensor([[False], [False], [True]]), "terminated": torch.tensor([[False], [False], [True]])},
    }, [T])
    chain_advantage(td, critic, gamma=0.9, lmbda=0.5, denoising_discount=0.5)
    g, lam = 0.9, 0.5
    d = [1 + g * 2 - 1, 0 + g * 3 - 2, 2 - 3]
    a2 = d[2]; a1 = d[1] + g * lam * a2; a0 = d[0] + g * lam * a1
    expected = torch.tensor([[0.5 * a0, a0], [0.5 * a1, a1], [0.5 * a2, a2]])
    torch.testing.assert_close(td["chain", "advantage"], expected)


def test_diffusion_ql_actor_loss_backpropagates_through_the_chain_and_raises_q():
    den = _den()
    q = lambda obs, a: -((a - 0.5) ** 2).sum(-1)
    loss = DiffusionQLActorLoss(den, q, eta=1.0, steps=5)
    loss.set_keys(sample="act", cond="obs")
    g = torch.Generator().manual_seed(0)
    td = TensorDict({"act": torch.rand(256, 2, generator=g) * 2 - 1, "obs": torch.zeros(256, 2)}, [256])
    out = loss(td)
    assert set(out.keys()) == {"loss_bc", "loss_q", "loss_actor"}
    den.zero_grad()
    out["loss_q"].backward()  # the Q term alone reaches the network through the sampled chain
    assert sum(float(p.grad.abs().sum()) for p in den.parameters()) > 0
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    sample_q = lambda: float(q(td["obs"], rollout(den, torch.randn(256, 2), den.schedule.timesteps(5), td["obs"],
                                                   reduction=None)["next", "x"][:, -1].clamp(-1, 1)).mean())
    torch.manual_seed(0)
    q0 = sample_q()
    for _ in range(60):
        opt.zero_grad(), loss(td)["loss_actor"].backward(), opt.step()
    torch.manual_seed(0)
    q1 = sample_q()
    # Pure BC (eta = 0) fits the uniform data, E[Q] = -2 (1/3 + 1/4) = -1.17 (measured about -2.02 -> -1.03);
    # the Q term pulls the samples onto a = 0.5 (about -0.035).
    assert q1 > -0.3 and q1 > q0 + 0.2 * abs(q0), (q0, q1)

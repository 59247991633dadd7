"""Offline baselines built on TorchRL: Gaussian BC, TD3+BC (``TD3BCLoss``) and IQL (``IQLLoss``)."""

import torch
from tensordict import TensorDict

from diffpolicy.agents import make_agent
from diffpolicy.agents.iql import make_iql_critic_loss, q_and_v
from diffpolicy.agents.trainer import TrainConfig, train_offline
from diffpolicy.checkpoint import load_checkpoint

torch.set_num_threads(1)

# the critics' TD losses fall, and TD3+BC's BC term (its actor's MSE to the data actions); IQL's actor is
# advantage-weighted and the data actions here are SAC's uniform warm-up, so its likelihood cannot rise much
LOSS_KEYS = {"gaussian_bc": ["loss_bc"], "td3_bc": ["loss_qvalue", "bc_mse"], "iql": ["loss_qvalue"]}


def _toy_batch(obs, action, reward=None, terminated=True):
    """Transitions in the TorchRL layout; one-step episodes (``terminated``) unless told otherwise."""
    n = obs.shape[0]
    reward = torch.zeros(n, 1) if reward is None else reward.reshape(n, 1)
    term = torch.full((n, 1), bool(terminated))
    return TensorDict({"observation": obs, "action": action,
                       "next": {"observation": obs, "reward": reward, "terminated": term, "done": term}},
                      batch_size=[n])


def _sampler(td, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: td[torch.randint(len(td), (batch_size,), generator=g)]


# ------------------------------------------------------------------ (1) losses fall on Pendulum data
def test_losses_fall_on_pendulum(pendulum_data):
    data = pendulum_data
    rb = data.replay_buffer(256)
    obs = data.transitions()["observation"][:64]
    for name, n in [("gaussian_bc", 300), ("td3_bc", 120), ("iql", 120)]:
        torch.manual_seed(0)
        agent = make_agent(name, data.obs_dim, data.act_dim)
        hist = [agent.update(rb.sample()) for _ in range(n)]
        for m in hist:
            assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in m.values()), m
        for key in LOSS_KEYS[name]:
            first = torch.stack([m[key] for m in hist[:20]]).mean()
            last = torch.stack([m[key] for m in hist[-20:]]).mean()
            assert last < first, f"{name}: {key} did not fall ({first:.4g} -> {last:.4g})"
        a = agent.act(obs)
        assert a.shape == (64, data.act_dim) and a.abs().max() <= 1.0 and not a.requires_grad


def test_gaussian_bc_loss_is_the_tanh_normal_nll_by_hand():
    """TorchRL's ``BCLoss`` on the tanh-normal actor: ``-log N(atanh a | loc, scale) + log(1 - a^2)``, summed
    over action dims, averaged over the batch, with data actions on the bounds clamped to ``1 - eps``."""
    from diffpolicy.agents.gaussian_bc import GaussianBC

    torch.manual_seed(0)
    agent = GaussianBC(3, 2, hidden=16)
    obs = torch.randn(64, 3)
    action = torch.rand(64, 2) * 2 - 1
    action[:4, 0] = 1.0  # on the bound
    out = agent.actor.module[0](TensorDict({"observation": obs}, [64]))
    a = action.clamp(-1 + 1e-6, 1 - 1e-6).double()
    logp = (torch.distributions.Normal(out["loc"].double(), out["scale"].double()).log_prob(torch.atanh(a))
            - torch.log1p(-a * a)).sum(-1)
    inside, edge = agent.nll(obs[4:], action[4:]).double(), agent.nll(obs[:4], action[:4]).double()
    torch.testing.assert_close(inside, -logp[4:].mean(), rtol=1e-5, atol=1e-5)
    # on the bound, float32's 1 - a^2 (about 2e-6) carries a few per cent: the log-density to about 0.05
    assert torch.isfinite(edge) and abs(float(edge + logp[:4].mean())) < 0.1
    assert not any(k.startswith("_bc_loss") for k in agent.state_dict())  # checkpoints hold the actor alone
    before = [p.clone() for p in agent.actor.parameters()]
    agent.update(TensorDict({"observation": obs, "action": action}, [64]))
    assert all(not torch.equal(p, b) for p, b in zip(agent.actor.parameters(), before))  # BCLoss trains the actor


# ------------------------------------------------------------------ (2) checkpoints round-trip
def test_state_dict_round_trip_through_trainer(pendulum_data, tmp_path):
    data = pendulum_data
    obs = data.transitions()["observation"][:32]
    batch = data.transitions()[:128]
    for name in ("gaussian_bc", "td3_bc", "iql"):
        torch.manual_seed(0)
        agent = make_agent(name, data.obs_dim, data.act_dim)
        train_offline(agent, data, TrainConfig(steps=5, batch_size=64, log_every=5), run_dir=tmp_path / name,
                      progress=False, evaluate=False)
        saved = load_checkpoint(tmp_path / name)["agent"]
        fresh = make_agent(name, data.obs_dim, data.act_dim)
        assert not torch.equal(fresh.act(obs), agent.act(obs))
        fresh.load_state_dict(saved)
        assert fresh.num_updates == agent.num_updates == 5
        assert torch.equal(fresh.act(obs), agent.act(obs))
        # targets, optimiser moments and the policy-delay counter came back too: the next
        # update (same noise) gives the same networks
        for a in (agent, fresh):
            torch.manual_seed(1)
            a.update(batch)
            a.update(batch)
        assert torch.equal(fresh.act(obs), agent.act(obs)), name
        sd_a, sd_f = agent.state_dict(), fresh.state_dict()
        for k, v in sd_a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sd_f[k]), (name, k)


# ------------------------------------------------------------------ (3) Gaussian BC averages modes
def test_gaussian_bc_averages_two_modes():
    """Actions +-0.7 with equal probability for every state: the unimodal ML fit puts its
    deterministic action (tanh of the pre-tanh mean) near 0, a value the data never takes, and
    a wide std covering both modes. (Diffusion BC reproduces both modes; see its tests.)"""
    torch.manual_seed(0)
    n = 4096
    obs = torch.randn(n, 2)
    act = 0.7 * torch.where(torch.rand(n, 1) < 0.5, 1.0, -1.0)
    sample = _sampler(_toy_batch(obs, act), 256)
    agent = make_agent("gaussian_bc", 2, 1, hidden=64, lr=1e-3)
    for _ in range(400):
        agent.update(sample())
    test_obs = torch.randn(256, 2)
    a = agent.act(test_obs)
    assert a.abs().mean() < 0.15, a.abs().mean()
    assert ((a.abs() - 0.7).abs() > 0.4).all()  # nowhere near either mode
    draws = agent.actor.get_dist(TensorDict({"observation": test_obs}, [256])).sample((16,))
    assert draws.std() > 0.4  # the spread covers both modes instead


# ------------------------------------------------------------------ (4) TD3+BC: BC-dominated -> dataset action
def test_td3_bc_small_alpha_clones_dataset_action():
    """In TD3BCLoss ``loss_actor = -lambda Q + MSE(pi(s), a)`` with ``lambda = alpha / mean|Q|``, so
    a *small* alpha is BC-dominated: the actor converges to the dataset action even though the
    reward prefers larger actions. A large alpha lets Q pull it upward. The policy delay holds:
    the actor takes half as many steps as the critic."""
    torch.manual_seed(0)
    n = 4096
    obs = torch.randn(n, 2)
    target = 0.6 * torch.tanh(obs[:, :1] - 0.5 * obs[:, 1:])
    act = (target + 0.1 * torch.randn(n, 1)).clamp(-1, 1)
    td = _toy_batch(obs, act, reward=act.squeeze(-1))  # reward = action: bigger is better
    test_obs = torch.randn(256, 2)
    test_target = 0.6 * torch.tanh(test_obs[:, :1] - 0.5 * test_obs[:, 1:])
    mean_gap = {}
    for alpha in (0.0, 20.0):
        torch.manual_seed(0)
        agent = make_agent("td3_bc", 2, 1, hidden=64, lr=1e-3, alpha=alpha)
        sample = _sampler(td, 256)
        for _ in range(200):
            m = agent.update(sample())
        gap = agent.act(test_obs) - test_target
        mean_gap[alpha] = gap.mean().item()
        if alpha == 0.0:
            assert gap.abs().mean() < 0.06, gap.abs().mean()
            assert m["bc_mse"] < 0.02  # noise variance 0.01
    assert mean_gap[20.0] > mean_gap[0.0] + 0.05, mean_gap
    steps = {k: next(iter(o.state.values()))["step"].item() for k, o in agent.optimizers().items()}
    assert steps == {"actor": 100, "critic": 200}


# ------------------------------------------------------------------ (5) IQL: Q/V order good vs bad
def test_iql_orders_good_and_bad_actions():
    """A bandit (one-step episodes): action +0.5 gets reward 1, action -0.5 reward 0, equally often.
    Q learns Q(+0.5) ~ 1 > Q(-0.5) ~ 0; V is the 0.7-expectile of Q over the data's actions, which
    lies between them (-> 0.7); the advantage-weighted actor picks the good action."""
    torch.manual_seed(0)
    n = 4096
    obs = torch.randn(n, 2)
    good = torch.rand(n, 1) < 0.5
    act = torch.where(good, 0.5, -0.5)
    sample = _sampler(_toy_batch(obs, act, reward=good.float()), 256)
    agent = make_agent("iql", 2, 1, hidden=64, lr=1e-3, tau=0.05)  # faster targets for a short run
    for _ in range(250):
        agent.update(sample())
    test_obs = torch.randn(256, 2)
    with torch.no_grad():
        q_good, v = agent.q_and_v(test_obs, torch.full((256, 1), 0.5), target=False)
        q_bad, _ = agent.q_and_v(test_obs, torch.full((256, 1), -0.5), target=False)
    assert (q_good > q_bad + 0.5).float().mean() > 0.95
    assert (q_good - 1).abs().mean() < 0.15 and q_bad.abs().mean() < 0.15
    assert ((v > q_bad) & (v < q_good)).float().mean() > 0.95
    assert (v.mean() - 0.7).abs() < 0.1  # the 0.7-expectile of {0, 1} w.p. 1/2 each is 0.7
    assert (agent.act(test_obs) > 0.2).float().mean() > 0.95


def test_iql_critic_helper_for_idql():
    """``make_iql_critic_loss`` without an actor: value/Q losses train, ``q_and_v`` reads them."""
    from torchrl.objectives import SoftUpdate

    torch.manual_seed(0)
    loss, value, qvalue = make_iql_critic_loss(2, 1, expectile=0.7, hidden=32)
    updater = SoftUpdate(loss, tau=0.005)
    assert loss.actor_network_params.is_empty()  # the placeholder policy has no parameters
    assert all(a is b for a, b in zip(value.parameters(), loss.value_network_params.parameters()))
    assert loss.qvalue_network_params.batch_size == torch.Size([2])
    opt_v = torch.optim.Adam(loss.value_network_params.parameters(), 1e-3)
    opt_q = torch.optim.Adam(loss.qvalue_network_params.parameters(), 1e-3)
    obs = torch.randn(256, 2)
    act = torch.rand(256, 1) * 2 - 1
    td = _toy_batch(obs, act, reward=act.squeeze(-1) * 2)
    q_losses = []
    for _ in range(100):
        for opt, fn in ((opt_v, loss.value_loss), (opt_q, loss.qvalue_loss)):
            value_or_q_loss, _ = fn(td)
            opt.zero_grad()
            value_or_q_loss.backward()
            opt.step()
        q_losses.append(value_or_q_loss.item())
        updater.step()
    assert sum(q_losses[-10:]) < 0.2 * sum(q_losses[:10])
    q, v = q_and_v(loss, obs, act, target=False)
    assert q.shape == v.shape == (256,)
    assert torch.corrcoef(torch.stack([q.detach(), 2 * act.squeeze(-1)]))[0, 1] > 0.9


def test_iql_actor_cosine_schedule_is_saved():
    torch.manual_seed(0)
    batch = _toy_batch(torch.randn(64, 2), torch.rand(64, 1) * 2 - 1, reward=torch.rand(64))
    agent = make_agent("iql", 2, 1, hidden=32, actor_cosine_steps=4)
    for _ in range(6):
        agent.update(batch)
    lrs = {k: o.param_groups[0]["lr"] for k, o in agent.optimizers().items()}
    assert lrs["actor"] < 1e-9 and lrs["critic"] == lrs["value"] == 3e-4  # decayed to 0 after 4 steps, then held
    fresh = make_agent("iql", 2, 1, hidden=32, actor_cosine_steps=4)
    fresh.load_state_dict(agent.state_dict())
    assert fresh.actor_schedule.last_epoch == 4 and fresh.optimizers()["actor"].param_groups[0]["lr"] < 1e-9

"""DRWR and DAWR: returns-to-go by hand, episodes that span iterations, learning on a one-step task."""
import pytest
import torch
from tensordict import TensorDict

from diffpolicy.agents.dawr import DAWR
from diffpolicy.agents.diffusion_bc import DiffusionBC
from diffpolicy.agents.drwr import DRWR, returns_to_go
from diffpolicy.agents.online import OnlineConfig, train_online
from online_toys import NO_DATA, TARGET_ID, mean_error


def test_returns_to_go_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    d = torch.tensor([[False, True, False, False], [False, False, False, True]])
    G, complete = returns_to_go(r, d, 0.5)
    torch.testing.assert_close(G[0], torch.tensor([1 + 0.5 * 2, 2, 3 + 0.5 * 4, 4], dtype=torch.float64))
    torch.testing.assert_close(G[1], torch.tensor([1.875, 1.75, 1.5, 1.0], dtype=torch.float64))
    assert complete.tolist() == [[True, True, False, False], [True, True, True, True]]


def _batch(rewards, dones):
    E, T = rewards.shape
    return TensorDict({"observation": torch.randn(E, T, 1), "action": torch.rand(E, T, 1) * 2 - 1,
                       ("next", "reward"): rewards[..., None], ("next", "done"): dones[..., None]}, batch_size=[E, T])


def test_drwr_waits_for_the_end_of_an_episode():
    torch.manual_seed(0)
    agent = DRWR.from_diffusion_bc(DiffusionBC(1, 1, hidden=16, depth=1), num_envs=2, batch_size=4, update_epochs=1)
    no_done = torch.zeros(2, 3, dtype=torch.bool)
    out = agent.update(_batch(torch.ones(2, 3), no_done))
    assert out["regressed"] == 0 and [len(p["reward"]) for p in agent.pending] == [3, 3]
    d = torch.tensor([[False, True, False], [False, False, False]])
    out = agent.update(_batch(torch.ones(2, 3), d))
    # env 0: 3 waiting + 2 steps up to its done are regressed, 1 waits; env 1: all 6 wait
    assert out["regressed"] == 5 and [len(p["reward"]) for p in agent.pending] == [1, 6]
    assert out["weight_max"] <= agent.config.max_weight


def _walk_batch(E, T, seed):
    """A collector-shaped batch ``[E, T]`` with every key DAWR keeps, plus one it drops."""
    g = torch.Generator().manual_seed(seed)
    done = torch.rand(E, T, 1, generator=g) < 0.2
    return TensorDict({"observation": torch.randn(E, T, 1, generator=g), "action": torch.rand(E, T, 1, generator=g),
                       "chain_log_prob": torch.zeros(E, T, 3),
                       "next": {"observation": torch.randn(E, T, 1, generator=g),
                                "reward": torch.randn(E, T, 1, generator=g) + 3.0,
                                "done": done, "terminated": done.clone()}}, batch_size=[E, T])


def test_dawr_replays_its_last_iterations_with_the_papers_update_counts():
    """DPPO's AWR code: a FIFO buffer of whole iterations (buffer_size transitions, rounded up);
    replay_ratio x frames / batch actor steps and a quarter as many critic steps per iteration."""
    torch.manual_seed(0)
    agent = DAWR.from_diffusion_bc(DiffusionBC(1, 1, hidden=8, depth=1), num_envs=2, steps_per_iter=5,
                                   buffer_size=25, replay_ratio=8, critic_update_ratio=4, batch_size=4)
    steps = {"actor": 0, "critic": 0}
    for name in steps:
        opt = getattr(agent, f"{name}_opt")
        opt.step = (lambda f, k: lambda *a, **kw: (steps.__setitem__(k, steps[k] + 1), f(*a, **kw))[1])(opt.step, name)
    batches = [_walk_batch(2, 5, seed) for seed in range(4)]
    for k, b in enumerate(batches, 1):
        out = agent.update(b)
        assert out["replayed"] == 10 * min(k, 3)  # the oldest iteration drops out after three
    assert steps == {"actor": 4 * 20, "critic": 4 * 5}  # 8 x 10 / 4 = 20 actor steps, 20 / 4 critic steps
    kept = torch.stack(list(agent.buffer))
    assert set(kept.keys(True, True)) == {"observation", "action", ("next", "observation"), ("next", "reward"),
                                          ("next", "done"), ("next", "terminated")}
    torch.testing.assert_close(kept["observation"], torch.stack([b["observation"] for b in batches[1:]]))
    torch.testing.assert_close(kept["next", "reward"], torch.stack([b["next", "reward"] for b in batches[1:]]))


def test_dawr_scales_the_whole_buffer_with_the_latest_return_statistics():
    from diffpolicy.advantage import RunningReturnScaler

    torch.manual_seed(0)
    agent = DAWR.from_diffusion_bc(DiffusionBC(1, 1, hidden=8, depth=1), num_envs=2, steps_per_iter=5,
                                   buffer_size=20, replay_ratio=1, batch_size=8)
    reference = RunningReturnScaler(2, agent.config.gamma)
    for seed in range(3):
        b = _walk_batch(2, 5, seed)
        agent.update(b)
        reference(b["next", "reward"], b["next", "done"])
    std = (reference.var + reference.eps) ** 0.5
    raw = torch.stack([_walk_batch(2, 5, seed)["next", "reward"] for seed in (1, 2)])
    torch.testing.assert_close(agent._replay()["next", "reward"], raw / std)
    before = reference.state_dict()
    reference.scale(raw)  # scaling alone leaves the statistics as they were
    assert reference.state_dict()["var"] == before["var"] and reference.state_dict()["count"] == before["count"]


def test_dawr_weights_come_from_gae_within_each_iteration_with_the_trained_critic():
    """The actor's weights: GAE along each stored iteration's time axis, on rewards scaled with the
    latest statistics, with the critic after this iteration's critic steps; standardised over the buffer."""
    from diffpolicy.advantage import env_gae, reward_weights

    torch.manual_seed(0)
    agent = DAWR.from_diffusion_bc(DiffusionBC(1, 1, hidden=8, depth=1), num_envs=2, steps_per_iter=5,
                                   buffer_size=30, replay_ratio=2, batch_size=8, beta=0.5, gamma=0.9, gae_lambda=0.8)
    for seed in range(2):
        agent.update(_walk_batch(2, 5, seed))
    seen = {}
    fit = agent.fit_weighted
    agent.fit_weighted = lambda obs, act, w, batches: (seen.update(obs=obs, w=w), fit(obs, act, w, batches))[1]
    agent.update(_walk_batch(2, 5, 2))
    std = (agent.scaler.var + agent.scaler.eps) ** 0.5
    advantages = []
    for seed in range(3):  # by hand: each iteration alone, [E, T], with the critic as it is now
        it = _walk_batch(2, 5, seed).select("observation", "action", "next")
        it["next", "reward"] = it["next", "reward"] / std
        advantages.append(env_gae(it, agent.critic, gamma=0.9, lmbda=0.8)["advantage"])
    adv = torch.stack(advantages).reshape(-1)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    torch.testing.assert_close(seen["obs"], torch.stack([_walk_batch(2, 5, s)["observation"] for s in range(3)])
                               .reshape(-1, 1))
    torch.testing.assert_close(seen["w"], reward_weights(adv, 0.5, agent.config.max_weight))


def test_dawr_resumes_with_its_buffer(tmp_path):
    from diffpolicy.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    make = lambda: DAWR.from_diffusion_bc(DiffusionBC(1, 1, hidden=8, depth=1), num_envs=2, steps_per_iter=5,
                                          buffer_size=30, replay_ratio=2, batch_size=8)  # noqa: E731
    agent = make()
    for seed in range(2):
        agent.update(_walk_batch(2, 5, seed))
    again = make()
    again.load_training_state(load_checkpoint(save_checkpoint(agent.training_state(), tmp_path / "ckpt")))
    assert len(again.buffer) == 2 and again.scaler.count == agent.scaler.count
    torch.testing.assert_close(torch.stack(list(again.buffer)).to_dict(), torch.stack(list(agent.buffer)).to_dict())
    agent.scaler.ret.zero_()  # a resumed run starts new episodes, so its running returns restart at 0
    nxt = _walk_batch(2, 5, 7)
    torch.manual_seed(3)
    a = agent.update(nxt.clone())
    torch.manual_seed(3)
    b = again.update(nxt.clone())
    assert a == b  # the same minibatches, losses and weights: the run continues the same algorithm


def test_a_run_of_the_older_dawr_still_loads_for_acting():
    """Runs written before DAWR's replay record ``critic_epochs`` / ``update_epochs``: dropped on loading."""
    from diffpolicy.agents import _json_settings

    settings = _json_settings(DAWR, {"beta": 5.0, "critic_epochs": 4, "update_epochs": 4, "batch_size": 256})
    assert settings["beta"] == 5.0 and settings["batch_size"] == 256 and "critic_epochs" not in settings
    from diffpolicy.config import ConfigError

    with pytest.raises(ConfigError, match="unknown"):
        _json_settings(DAWR, {"critic_epoch": 4})  # a typo is still an error


def _tiny_bc(seed=0):
    torch.manual_seed(seed)
    return DiffusionBC(1, 1, hidden=64, depth=2)


@pytest.mark.parametrize("cls, settings", [
    (DRWR, dict(beta=2.0, update_epochs=4, batch_size=64)),
    (DAWR, dict(beta=2.0, batch_size=64, replay_ratio=4, buffer_size=1024)),
])
def test_reward_weighted_regression_learns_a_one_step_task(cls, settings):
    agent = cls.from_diffusion_bc(_tiny_bc(), num_envs=8, steps_per_iter=32, actor_lr=3e-3, **settings)
    before = mean_error(agent)
    train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 20, eval_every=20, eval_episodes=4),
                 progress=False)
    after = mean_error(agent)
    assert before > 0.5 and after < 0.15, (before, after)  # ~0.86 -> ~0.01 (DRWR), ~0.004 (DAWR); ~0.96 unlearned


def test_gaussian_ppo_starts_from_gaussian_bc_and_learns():
    from diffpolicy.agents.gaussian_bc import GaussianBC
    from diffpolicy.agents.gaussian_ppo import GaussianPPO

    torch.manual_seed(0)
    bc = GaussianBC(1, 1, hidden=64)
    agent = GaussianPPO.from_gaussian_bc(bc, num_envs=8, steps_per_iter=32, actor_lr=3e-3, update_epochs=4,
                                         minibatches=2)
    obs = torch.randn(5, 1)
    torch.testing.assert_close(agent.act(obs), bc.act(obs))  # the same policy before fine-tuning
    before = mean_error(agent)
    out = train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 20, eval_every=20, eval_episodes=4),
                       progress=False)
    after = mean_error(agent)
    assert out["iterations"] == 20 and before > 0.3 and after < 0.25 * before, (before, after)  # ~0.37 -> ~0.045


def test_qsm_learns_a_one_step_task():
    from diffpolicy.agents.qsm import QSM

    agent = QSM.from_diffusion_bc(_tiny_bc(), num_envs=8, steps_per_iter=32, actor_lr=3e-3, critic_lr=3e-3,
                                  reward_scale=1.0, q_coeff=1.0, replay_ratio=4, batch_size=128, critic_warmup_iters=2,
                                  critic_hidden=64, critic_depth=2)
    before = mean_error(agent)
    out = train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 20, eval_every=20, eval_episodes=4),
                       progress=False)
    after = mean_error(agent)
    assert len(agent.buffer) == 256 * 20 and out["iterations"] == 20
    assert before > 0.5 and after < 0.15, (before, after)  # ~0.89 -> ~0.01; with actor_lr=0 it stays ~1


def test_every_online_agent_starts_from_scratch_or_from_its_own_kind_of_policy():
    from diffpolicy.agents import ONLINE_AGENTS, make_online_agent
    from diffpolicy.agents.gaussian_bc import GaussianBC

    for name in ONLINE_AGENTS:
        torch.manual_seed(0)
        agent = make_online_agent(name, obs_dim=3, act_dim=2, policy={"hidden": 16, "depth": 1}, num_envs=2)
        assert (agent.obs_dim, agent.act_dim) == (3, 2)
        assert agent.act(torch.zeros(4, 3)).shape == (4, 2)
    scratch = make_online_agent("dppo", obs_dim=3, act_dim=2, policy={"diffusion_steps": 7, "hidden": 16})
    assert scratch.K == 7 and scratch.actor.schedule.num_train_timesteps == 7
    with pytest.raises(ValueError, match="from scratch needs obs_dim and act_dim"):
        make_online_agent("dppo")
    with pytest.raises(ValueError, match="a trained one brings its own"):
        make_online_agent("dppo", DiffusionBC(3, 2, hidden=8, depth=1), policy={"hidden": 4})
    with pytest.raises(ValueError, match="dppo fine-tunes a trained diffusion_bc, got 'gaussian_bc'"):
        make_online_agent("dppo", GaussianBC(3, 2))


def test_a_from_scratch_run_records_its_policy_and_reopens(tmp_path):
    from diffpolicy.agents import load_agent, make_online_agent

    torch.manual_seed(0)
    agent = make_online_agent("dawr", obs_dim=1, act_dim=1, policy={"hidden": 16, "depth": 1}, num_envs=2,
                              steps_per_iter=8, batch_size=8)
    train_online(agent, TARGET_ID, None, OnlineConfig(env_steps=32, eval_every=2, eval_episodes=2),
                 run_dir=tmp_path, progress=False)
    again = load_agent(tmp_path)  # no source run to read: the record in config.json rebuilds it
    obs = torch.linspace(-0.8, 0.8, 5)[:, None]
    torch.manual_seed(1)
    a = agent.act(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(again.act(obs), a)


@pytest.mark.parametrize("name", ["dppo", "gaussian_ppo"])
def test_a_run_started_in_python_records_its_policy_and_reopens(tmp_path, name):
    """``train_online`` without ``pretrained=``: the agent's own record of the BC it came from
    (from_diffusion_bc / from_gaussian_bc) lets load_agent (and ``diffpolicy eval``) rebuild the run."""
    from diffpolicy.agents import load_agent, make_online_agent

    torch.manual_seed(0)
    from diffpolicy.agents.gaussian_bc import GaussianBC

    bc = DiffusionBC(1, 1, hidden=16, depth=1, diffusion_steps=4) if name == "dppo" else GaussianBC(1, 1, hidden=16)
    agent = make_online_agent(name, bc, num_envs=2, steps_per_iter=8, minibatches=2)
    train_online(agent, TARGET_ID, None, OnlineConfig(env_steps=16, eval_every=1, eval_episodes=2),
                 run_dir=tmp_path, progress=False)
    import json

    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["pretrained"]["agent"] == bc.name and "scratch_policy" not in meta  # not a from-scratch run
    again = load_agent(tmp_path)
    obs = torch.linspace(-0.8, 0.8, 5)[:, None]
    torch.manual_seed(1)
    a = agent.act(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(again.act(obs), a)
    # a run written before the record existed: the error says how to recover it
    del meta["pretrained"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record the policy.*call train_online on it once more"):
        load_agent(tmp_path)
    train_online(agent, TARGET_ID, None, OnlineConfig(env_steps=16, eval_every=1, eval_episodes=2),
                 run_dir=tmp_path, progress=False)  # resumed (nothing left to do), and recorded
    assert load_agent(tmp_path).name == name

"""DPPO: the clip schedule, reward scaling, collection log-probs, learning on a tiny task, resume, bad input."""
import math
import types

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from diffpolicy.advantage import RunningReturnScaler
from diffpolicy.agents.diffusion_bc import DiffusionBC
from diffpolicy.agents.dppo import DPPO, dppo_clip_schedule
from diffpolicy.agents.online import explained_variance
from diffpolicy.agents.online import OnlineConfig, train_online
from diffpolicy.chain import rescore
from online_toys import EDGE_ID, NO_DATA, TARGET_ID, WALK_ID, mean_error
from diffpolicy.checkpoint import load_checkpoint


def _agent(seed=0, **overrides):
    torch.manual_seed(seed)
    bc = DiffusionBC(1, 1, hidden=64, depth=2)
    settings = dict(num_envs=8, steps_per_iter=32, update_epochs=4, minibatches=2, actor_lr=3e-3,
                    clip_epsilon=0.2, clip_epsilon_base=0.1, min_sampling_std=0.1, min_logprob_std=0.1)
    return DPPO.from_diffusion_bc(bc, **{**settings, **overrides})


def test_clip_schedule_closed_form():
    eps = dppo_clip_schedule(10, 0.01, 1e-3, 3.0)
    u = np.arange(10) / 9
    np.testing.assert_allclose(eps.numpy(), 1e-3 + (0.01 - 1e-3) * (np.exp(3 * u) - 1) / (math.e**3 - 1))
    assert float(eps[0]) == pytest.approx(1e-3) and float(eps[-1]) == pytest.approx(0.01)
    np.testing.assert_allclose(dppo_clip_schedule(3, 0.2, 0.1, 0.0).numpy(), [0.1, 0.15, 0.2])
    assert dppo_clip_schedule(1, 0.01, 1e-3, 3.0).tolist() == [0.01]


def test_running_return_scaler_by_hand():
    gen = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(2, 3, generator=gen), torch.randn(2, 4, generator=gen)
    d1 = torch.tensor([[False, True, False], [False, False, False]])
    d2 = torch.zeros(2, 4, dtype=torch.bool)
    sc = RunningReturnScaler(2, gamma=0.9)
    sc(r1, d1)
    out = sc(r2, d2)
    # discounted returns by hand, carried across the two calls and cut after each done
    rets, G = [], np.zeros(2)
    for r, d in ((r1.numpy(), d1.numpy()), (r2.numpy(), d2.numpy())):
        for k in range(r.shape[1]):
            G = 0.9 * G + r[:, k]
            rets += list(G)
            G = np.where(d[:, k], 0.0, G)
    np.testing.assert_allclose(out.numpy(), r2.numpy() / np.sqrt(np.var(rets) + 1e-8), rtol=1e-5)
    with pytest.raises(ValueError, match="num_envs=2"):
        sc(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool))


def test_collected_log_probs_are_the_fine_tuned_steps_scores():
    agent = _agent(ft_steps=3)
    obs = torch.randn(16, 1)
    action, chain_x, lp = agent.explore(obs)
    assert chain_x.shape == (16, 4, 1) and lp.shape == (16, 3) and action.shape == (16, 1)
    torch.testing.assert_close(action, chain_x[:, -1].clamp(-1, 1))
    K = agent.K
    # the transitions of the last 3 steps, rescored in one call, give the stored (old) log-probs
    td = TensorDict({"x": chain_x[:, :-1], ("next", "x"): chain_x[:, 1:],
                     "t": agent.ts[K - 3:K].float().expand(16, 3), "s": agent.ts[K - 2:].float().expand(16, 3),
                     "cond": obs[:, None].expand(16, 3, 1)}, batch_size=[16, 3])
    c = agent.config
    torch.testing.assert_close(rescore(agent.actor, td, eta=c.eta, min_logprob_std=c.min_logprob_std,
                                       clip_x0=c.clip_x0), lp, rtol=1e-4, atol=1e-4)
    # deterministic evaluation (DPPO's): a random start, then every step lands on its mean
    chain = agent._chain(obs, deterministic=True)
    torch.testing.assert_close(chain["next", "x"], chain["mean"])
    torch.manual_seed(5)
    a1 = agent.act(obs)
    torch.manual_seed(5)
    torch.testing.assert_close(a1, agent._chain(obs, deterministic=True)["next", "x"][:, -1].clamp(-1, 1))
    explored = agent._chain(obs, deterministic=False)
    assert not torch.allclose(explored["next", "x"], explored["mean"])
    # PPO's first pass: the loss re-scores the stored transitions to the stored log-probs (ratio 1, nothing clipped)
    flat = TensorDict({"observation": obs, "chain_x": chain_x, "chain_log_prob": lp}, batch_size=[16])
    out = agent.loss(agent.chain_transitions(flat, torch.randn(16)))
    assert abs(float(out["ratio"]) - 1) < 1e-4 and float(out["clip_fraction"]) == 0 and abs(float(out["approx_kl"])) < 1e-6
    with pytest.raises(ValueError, match=r"ft_steps must be in \[1, 5\]"):
        _agent(ft_steps=6)


def test_ddim_fine_tuning_runs_a_sub_grid_of_the_training_steps(tmp_path):
    agent = _agent(chain_steps=2, eta=0.5)  # DDIM(0.5) over 2 of the pre-trained model's 5 steps
    full = agent.actor.schedule.timesteps(5).tolist()
    assert agent.K == 2 and agent.ft == 2 and len(agent.ts) == 3
    assert set(agent.ts.tolist()) <= set(full) and agent.ts[0] == full[0] and agent.ts[-1] == full[-1]
    obs = torch.randn(16, 1)
    action, chain_x, lp = agent.explore(obs)
    assert chain_x.shape == (16, 3, 1) and lp.shape == (16, 2)
    td = TensorDict({"x": chain_x[:, :-1], ("next", "x"): chain_x[:, 1:], "t": agent.ts[:2].float().expand(16, 2),
                     "s": agent.ts[1:].float().expand(16, 2), "cond": obs[:, None].expand(16, 2, 1)}, batch_size=[16, 2])
    c = agent.config  # the stored log-probs are the DDIM(0.5) steps' between the sub-grid's times
    torch.testing.assert_close(rescore(agent.actor, td, eta=0.5, min_logprob_std=c.min_logprob_std, clip_x0=c.clip_x0),
                               lp, rtol=1e-4, atol=1e-4)
    before = mean_error(agent)
    train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 25, eval_every=25, eval_episodes=8),
                 run_dir=tmp_path, progress=False)
    after = mean_error(agent)
    assert before > 0.5 and after < 0.15, (before, after)
    # DPPO's own spacing: k * N // K from 0 (here 0 and 2 of 0..4), then the clean end
    assert _agent(chain_steps=2, chain_spacing="leading").ts.tolist() == [2.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="chain_spacing must be"):
        _agent(chain_steps=2, chain_spacing="uniform")
    with pytest.raises(ValueError, match=r"chain_steps must be in \[1, 5\]"):
        _agent(chain_steps=6)
    with pytest.raises(ValueError, match=r"ft_steps must be in \[1, 2\]"):
        _agent(chain_steps=2, ft_steps=3)


def test_explained_variance():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == 1.0 and explained_variance(torch.zeros(4), y) == pytest.approx(1 - 1.0)
    assert math.isnan(explained_variance(y, torch.ones(4)))


def test_dppo_learns_a_one_step_task(tmp_path):
    agent = _agent()
    before = mean_error(agent)
    out = train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 25, eval_every=25, eval_episodes=8),
                       run_dir=tmp_path, progress=False)
    after = mean_error(agent)
    assert out["iterations"] == 25 and out["env_steps"] == 256 * 25
    assert before > 0.5 and after < 0.15, (before, after)  # ~0.86 -> ~0.02; with actor_lr=0 it stays ~1
    header = (tmp_path / "train.csv").read_text().splitlines()[0]
    for key in ("clip_fraction", "approx_kl", "explained_variance", "seconds_per_iter"):
        assert key in header
    assert (tmp_path / "tb").is_dir() and (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("gamma, bar", [(0.99, "above"), (0.0, "greedy")])
def test_dppo_learns_a_multi_step_task_through_gae(gamma, bar):
    """EdgeEnv: reward ``1 + a`` for three steps, an action above 0.5 ends the episode. With GAE over the
    steps DPPO learns to stay in (about 1.8 -> 3.9); myopic (gamma 0), the same run learns the greedy a = 1
    (return 2): the test sees the credit that GAE carries back, not only the immediate reward."""
    from diffpolicy.envs.factory import evaluate

    def edge_return(agent):
        return evaluate(agent.act, EDGE_ID, episodes=16, seed=5, obs_loc=NO_DATA.obs_mean,
                        obs_scale=NO_DATA.obs_std).return_mean

    agent = _agent(gamma=gamma)
    before = edge_return(agent)
    train_online(agent, EDGE_ID, NO_DATA, OnlineConfig(env_steps=256 * 25, eval_every=25, eval_episodes=2),
                 progress=False)
    after = edge_return(agent)
    assert before < 2.5, before
    if bar == "above":
        assert after > 3.5, (before, after)
    else:
        assert after < 2.5, (before, after)


def test_resume_continues_from_the_checkpoint(tmp_path):
    cfg = dict(eval_every=2, eval_episodes=2, checkpoint_every=1)
    train_online(_agent(), TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 2, **cfg), run_dir=tmp_path, progress=False)
    resumed = _agent(seed=1)  # a new process: fresh weights, replaced by the checkpoint's
    out = train_online(resumed, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 3, **cfg), run_dir=tmp_path,
                       progress=False)
    assert out["iterations"] == 3 and resumed.iterations == 3 and out["env_steps"] == 256 * 3
    steps = [int(line.split(",")[0]) for line in (tmp_path / "train.csv").read_text().splitlines()[1:]]
    assert steps == [256, 512, 768]
    assert [h["iteration"] for h in out["history"]] == [0, 2, 3]
    with pytest.raises(ValueError, match="different configuration"):
        train_online(_agent(update_epochs=1), TARGET_ID, NO_DATA, OnlineConfig(env_steps=256 * 4, **cfg),
                     run_dir=tmp_path, progress=False)


def test_mismatched_env_fails_before_training(tmp_path):
    # A Pendulum-v1 policy (3-d observations, 1-d actions, with its data's 3-d statistics) sent to
    # MountainCarContinuous-v0 (2-d observations): the policy's shapes are named, not the statistics'.
    bc = DiffusionBC(3, 1, hidden=16, depth=1)
    agent = DPPO.from_diffusion_bc(bc, num_envs=2, steps_per_iter=4)
    data = types.SimpleNamespace(obs_mean=np.zeros(3, np.float32), obs_std=np.ones(3, np.float32),
                                 ref_min_score=None, dataset_id="pendulum")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"observations of shape \(3,\) and actions of shape \(1,\), but "
                                         r"MountainCarContinuous-v0 has observations \(2,\) and actions \(1,\)"):
        train_online(agent, "MountainCarContinuous-v0", data, OnlineConfig(env_steps=8), run_dir=run, progress=False)
    assert agent.iterations == 0 and not run.exists()  # nothing written
    with pytest.raises(ValueError, match=r"actions of shape \(1,\), but Hopper-v5 has observations \(11,\) and "
                                         r"actions \(3,\)"):
        train_online(agent, "Hopper-v5", data, OnlineConfig(env_steps=8), run_dir=run, progress=False)


def test_a_run_written_before_a_setting_existed_still_resumes(tmp_path):
    import json

    cfg = dict(eval_every=1, eval_episodes=1, checkpoint_every=1)
    train_online(_agent(), TARGET_ID, NO_DATA, OnlineConfig(env_steps=256, **cfg), run_dir=tmp_path, progress=False)
    conf = json.loads((tmp_path / "config.json").read_text())
    for k in ("chain_steps", "chain_spacing"):  # settings this run's code did not have yet
        del conf["agent_config"][k]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    out = train_online(_agent(), TARGET_ID, NO_DATA, OnlineConfig(env_steps=512, **cfg), run_dir=tmp_path,
                       progress=False)
    assert out["iterations"] == 2  # resumed at their defaults
    with pytest.raises(ValueError, match="agent_config differ"):  # the new setting at another value: another run
        train_online(_agent(chain_steps=3), TARGET_ID, NO_DATA, OnlineConfig(env_steps=768, **cfg),
                     run_dir=tmp_path, progress=False)


def test_chunked_runs_log_the_env_steps_they_took(tmp_path):
    # WalkEnv ends after 3 steps: a chunk of 2 runs 2 steps, then 1 (or fewer when an action ends it early)
    torch.manual_seed(0)
    agent = DPPO.from_diffusion_bc(DiffusionBC(1, 1, hidden=16, depth=1, horizon=2), num_envs=2, steps_per_iter=6)
    seen = []
    update = agent.update
    agent.update = lambda td: (seen.append(td["next", "chunk_steps"].clone()), update(td))[1]
    out = train_online(agent, WALK_ID, NO_DATA, OnlineConfig(env_steps=2 * 6 * 2 * 3, eval_every=3, eval_episodes=1),
                       run_dir=tmp_path, progress=False)
    rows = (tmp_path / "train.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    taken = float(last[header.index("env_steps_taken")])
    assert out["env_steps"] == 72 and taken == float(sum(float(c.sum()) for c in seen))
    assert 36 <= taken < 72  # every episode wastes at least one step of the budget's whole-chunk count
    assert all(set(c.unique().tolist()) <= {1.0, 2.0} for c in seen)


def test_training_episode_returns_are_logged(tmp_path):
    # WalkEnv: three steps (or fewer), so every 8 x 6-decision batch ends episodes; the logged mean is
    # the mean return of the episodes that ended, summed over their steps (checked against the batch).
    agent = _agent(num_envs=2, steps_per_iter=6)
    seen = []
    update = agent.update
    agent.update = lambda td: (seen.append(td.clone()), update(td))[1]
    train_online(agent, WALK_ID, NO_DATA, OnlineConfig(env_steps=12 * 3, eval_every=3, eval_episodes=1),
                 run_dir=tmp_path, progress=False)
    rows = [dict(zip(lines[0].split(","), r.split(","))) for lines in [(tmp_path / "train.csv").read_text().splitlines()]
            for r in lines[1:]]
    assert len(rows) == 3
    returns, running = [], torch.zeros(2)
    for td, row in zip(seen, rows):  # the per-env returns by hand, across batch boundaries
        ended = []
        for k in range(td.shape[1]):
            running += td["next", "reward"][:, k, 0]
            done = td["next", "done"][:, k, 0]
            ended += running[done].tolist()
            running[done] = 0
        assert int(row["episodes"]) == len(ended) > 0
        assert float(row["episode_return"]) == pytest.approx(sum(ended) / len(ended), rel=1e-5)
        returns += ended
    assert all(r > 0 for r in returns)  # WalkEnv's reward grows with t: a real sum, not one step's reward


def test_an_update_changes_only_the_fine_tuned_steps_model():
    agent = _agent(ft_steps=2)
    base0 = {k: v.clone() for k, v in agent.base.state_dict().items()}
    actor0 = {k: v.clone() for k, v in agent.actor.state_dict().items()}
    train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=256, eval_every=1, eval_episodes=1), progress=False)
    assert all(torch.equal(v, base0[k]) for k, v in agent.base.state_dict().items())  # the K - K' frozen steps
    assert any(not torch.equal(v, actor0[k]) for k, v in agent.actor.state_dict().items())


def test_each_denoising_step_gets_the_env_advantage_times_the_denoising_discount():
    agent = _agent(ft_steps=3, denoising_discount=0.9)
    N = 4
    action, chain_x, lp = agent.explore(torch.randn(N, 1))
    flat = TensorDict({"observation": torch.randn(N, 1), "chain_x": chain_x, "chain_log_prob": lp}, batch_size=[N])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    steps = agent.chain_transitions(flat, adv).reshape(N, 3)
    expected = adv[:, None] * torch.tensor([0.9**2, 0.9, 1.0])  # the last step (which emits the action) keeps A
    torch.testing.assert_close(steps["advantage"], expected)
    torch.testing.assert_close(steps["log_prob"], lp)
    torch.testing.assert_close(steps["clip_epsilon"][0], agent.clip.float())


def test_a_chunking_policy_acts_in_chunks_the_env_executes_whole(tmp_path):
    torch.manual_seed(0)
    bc = DiffusionBC(1, 1, hidden=32, depth=1, horizon=2)
    agent = DPPO.from_diffusion_bc(bc, num_envs=4, steps_per_iter=8, update_epochs=1, minibatches=1)
    assert agent.action_chunk == 2 and agent.act_dim == 2
    assert agent.act(torch.zeros(3, 1)).shape == (3, 2)
    out = train_online(agent, TARGET_ID, NO_DATA, OnlineConfig(env_steps=64, eval_every=1, eval_episodes=2),
                       run_dir=tmp_path, progress=False)
    assert out["iterations"] == 1 and out["env_steps"] == 64  # 4 envs x 8 decisions x 2 actions


def test_gae_on_collected_steps_matches_a_hand_computation():
    """TorchRL's GAE on real collector output: time axis, termination (no bootstrap) and truncation (bootstrap)."""
    from torchrl.collectors import Collector

    from diffpolicy.advantage import env_gae
    from diffpolicy.envs.factory import make_env

    torch.manual_seed(0)
    agent = DPPO.from_diffusion_bc(DiffusionBC(1, 1, hidden=16, depth=1), num_envs=3, steps_per_iter=8,
                                   min_sampling_std=0.5)
    env = make_env(WALK_ID, num_envs=3)
    env.set_seed(0)
    col = Collector(env, agent.policy_module(), frames_per_batch=24, total_frames=-1,
                    auto_register_policy_transforms=False)
    td = next(iter(col))
    col.shutdown()
    assert td.shape == (3, 8)
    term, done = td["next", "terminated"].squeeze(-1), td["next", "done"].squeeze(-1)
    assert bool((done & ~term).any()) and bool(term.any())  # both kinds of episode end were collected
    gamma, lmbda = 0.9, 0.8
    env_gae(td, agent.critic, gamma=gamma, lmbda=lmbda)
    with torch.no_grad():
        v = agent.critic(td.select("observation").clone())["state_value"].squeeze(-1)
        v_next = agent.critic(td["next"].select("observation").clone())["state_value"].squeeze(-1)
    r = td["next", "reward"].squeeze(-1)
    adv = torch.zeros(3, 8)
    for e in range(3):
        a = 0.0
        for t in range(7, -1, -1):
            delta = r[e, t] + gamma * v_next[e, t] * (~term[e, t]) - v[e, t]
            a = delta + (gamma * lmbda * a if not done[e, t] else 0.0)
            adv[e, t] = a
    torch.testing.assert_close(td["advantage"].squeeze(-1), adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(td["value_target"].squeeze(-1), adv + v, rtol=1e-4, atol=1e-5)


def test_one_env_and_resumed_qsm_and_drwr(tmp_path):
    from diffpolicy.agents.drwr import DRWR
    from diffpolicy.agents.qsm import QSM

    # a single environment (unbatched in TorchRL) trains like any other count
    out = train_online(_agent(num_envs=1, steps_per_iter=16, update_epochs=1), WALK_ID, NO_DATA,
                       OnlineConfig(env_steps=32, eval_every=2, eval_episodes=1), progress=False)
    assert out["iterations"] == 2
    bc = DiffusionBC(1, 1, hidden=16, depth=1)
    kw = dict(num_envs=2, steps_per_iter=8, replay_ratio=1, batch_size=8, critic_warmup_iters=1)
    cfg = dict(eval_every=1, eval_episodes=1, checkpoint_every=1)
    train_online(QSM.from_diffusion_bc(bc, **kw), WALK_ID, NO_DATA, OnlineConfig(env_steps=32, **cfg),
                 run_dir=tmp_path / "qsm", progress=False)
    first = QSM.from_diffusion_bc(bc, **{**kw, "buffer_size": 24})  # 2 iterations x 16 transitions: wraps
    train_online(first, WALK_ID, NO_DATA, OnlineConfig(env_steps=32, **cfg), run_dir=tmp_path / "qsm2", progress=False)
    q = QSM.from_diffusion_bc(bc, **{**kw, "buffer_size": 24})
    q.load_training_state(load_checkpoint(tmp_path / "qsm2")["agent"])
    assert q.iterations == 2 and q.warmup_end == 1 and len(q.buffer) == 24
    newest = lambda a: a.buffer.storage[torch.arange(a.written - 24, a.written) % 24]  # oldest to newest
    for key in ("observation", "action", ("next", "reward"), ("next", "observation")):
        torch.testing.assert_close(newest(q)[key], newest(first)[key], rtol=0, atol=0)
    q.buffer.extend(newest(q)[:4])  # the next write evicts the oldest transitions, as it would have
    q.written += 4
    torch.testing.assert_close(newest(q)[:20]["action"], newest(first)[4:]["action"], rtol=0, atol=0)
    q = QSM.from_diffusion_bc(bc, **kw)
    train_online(q, WALK_ID, NO_DATA, OnlineConfig(env_steps=48, **cfg), run_dir=tmp_path / "qsm", progress=False)
    assert q.iterations == 3 and q.warmup_end == 1 and len(q.buffer) == 48  # its buffer came back: no new warm-up
    old = load_checkpoint(tmp_path / "qsm")["agent"]
    del old["buffer"]  # a checkpoint from before buffers were saved: the critic warms up again on fresh data
    q.load_training_state(old)
    assert len(q.buffer) == 0 and q.warmup_end == 3 + 1
    q.load_training_state(q.training_state())  # the longer warm-up survives the next checkpoint
    assert q.warmup_end == 3 + 1
    d = DRWR.from_diffusion_bc(bc, num_envs=2, steps_per_iter=8)
    train_online(d, WALK_ID, NO_DATA, OnlineConfig(env_steps=16, **cfg), run_dir=tmp_path / "drwr", progress=False)
    d2 = DRWR.from_diffusion_bc(bc, num_envs=2, steps_per_iter=8)
    d2.load_training_state(load_checkpoint(tmp_path / "drwr")["agent"])
    assert d2.pending == [{}, {}] and d2.iterations == 1  # old episodes' steps are not spliced onto new ones


def test_parallel_env_workers_collect_what_serial_envs_collect(pendulum_data):
    """``parallel_envs``: TorchRL's ParallelEnv (a process per env) gives the same training as SerialEnv."""
    def run(parallel):
        torch.manual_seed(0)
        bc = DiffusionBC(3, 1, hidden=32, diffusion_steps=3)
        agent = DPPO.from_diffusion_bc(bc, num_envs=2, steps_per_iter=50, ft_steps=2, update_epochs=1)
        out = train_online(agent, "Pendulum-v1", pendulum_data, OnlineConfig(env_steps=200, eval_every=2,
                           eval_episodes=1, parallel_envs=parallel), progress=False)
        return out, agent

    (serial, a), (parallel, b) = run(False), run(True)
    assert [h["return_mean"] for h in serial["history"]] == [h["return_mean"] for h in parallel["history"]]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

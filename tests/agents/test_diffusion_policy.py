"""Diffusion Policy agent (agents/diffusion_policy.py): training, receding horizon, quality, evaluation.

Small U-Nets throughout (one or two levels of 16-32 channels) so the file runs in about a
minute on one core.
"""

import math

import pytest
import torch
from tensordict import TensorDict

from diffpolicy.agents import make_agent
from diffpolicy.agents.diffusion_policy import DiffusionPolicy, PowerEMA
from diffpolicy.agents.trainer import TrainConfig, evaluate_agent, train_offline
from diffpolicy.envs.datasets import OfflineData
from diffpolicy.losses import diffusion_loss

torch.set_num_threads(1)

TINY = dict(down_dims=(16, 32), time_dim=16, sampler="ddim", inference_steps=5, lr=1e-3, lr_warmup_steps=10)


def tiny_agent(obs_dim=3, act_dim=1, **kw) -> DiffusionPolicy:
    return make_agent("diffusion_policy", obs_dim, act_dim, **{**TINY, **kw})


# ------------------------------------------------------------------------------ config / loss
def test_sequence_spec_config_and_validation():
    agent = tiny_agent(obs_horizon=3, pred_horizon=12, action_steps=5)
    assert isinstance(agent, DiffusionPolicy) and agent.name == "diffusion_policy"
    assert agent.sequence_spec == {"obs_horizon": 3, "action_horizon": 12}
    assert isinstance(agent.optimizers()["actor"], torch.optim.AdamW)
    d = make_agent("diffusion_policy", 3, 1, down_dims=(16,), time_dim=8).config  # paper defaults elsewhere
    assert (d.obs_horizon, d.pred_horizon, d.action_steps) == (2, 8, 4)
    assert (d.diffusion_steps, d.beta_schedule, d.sampler, d.inference_steps) == (100, "squaredcos_cap_v2", "ddpm", 100)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_agent(pred_horizon=7)
    with pytest.raises(ValueError, match="action_steps"):
        tiny_agent(pred_horizon=4, action_steps=5)


def test_power_ema_decay_matches_diffusion_policy():
    ema = PowerEMA(torch.nn.Linear(2, 2), power=0.75, max_decay=0.9999)
    # DP's EMAModel: decay 0 for the first two steps, then 1 - step^-0.75 (step = optimisation step - 1)
    assert ema.current_decay(0) == 0.0
    assert ema.current_decay(1) == pytest.approx(1 - 2 ** -0.75)
    assert ema.current_decay(10**9) == 0.9999


def test_masked_loss_equals_diffusion_loss_when_all_valid_and_ignores_padding():
    agent = tiny_agent()
    obs, act = torch.randn(6, 2, 3), torch.rand(6, 8, 1) * 2 - 1
    t, noise = torch.randint(0, 100, (6,)).float(), torch.randn(6, 8, 1)
    ours = agent.bc_loss(obs, act, torch.ones(6, 8, dtype=torch.bool), t=t, noise=noise)
    ref = diffusion_loss(agent.actor, act, obs.reshape(6, -1), t=t, noise=noise).mean()
    torch.testing.assert_close(ours, ref)
    # padded steps (valid=False) do not count: change x0 and eps there so that x_t (the net's input)
    # is unchanged but the eps target is not -> the masked loss is unchanged, the unmasked one is not
    valid = torch.ones(6, 8, dtype=torch.bool)
    valid[:, 5:] = False
    alpha, sigma = (v.reshape(6, 1, 1) for v in agent.actor.schedule.alpha_sigma(t))
    d = torch.zeros_like(act)
    d[:, 5:] = 0.5
    act2, noise2 = act + d, noise - alpha * d / sigma
    torch.testing.assert_close(agent.bc_loss(obs, act2, valid, t=t, noise=noise2),
                               agent.bc_loss(obs, act, valid, t=t, noise=noise))
    assert not torch.allclose(agent.bc_loss(obs, act2, None, t=t, noise=noise2), agent.bc_loss(obs, act, None, t=t, noise=noise))


# ------------------------------------------------------------------------------ (1) training
def test_loss_falls_on_pendulum(pendulum_data):
    agent = tiny_agent(pendulum_data.obs_dim, pendulum_data.act_dim, lr=2e-3, lr_warmup_steps=20)
    rb = pendulum_data.replay_buffer(64, sequences=agent.sequence_spec)
    batch = rb.sample()
    assert batch["observation"].shape == (64, 2, pendulum_data.obs_dim)
    assert batch["action"].shape == (64, 8, pendulum_data.act_dim) and batch["valid"].shape == (64, 8)
    losses = []
    for _ in range(250):
        losses.append(float(agent.update(rb.sample())["loss_bc"]))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"pendulum loss: first 20 {first:.3f}, last 20 {last:.3f}")
    assert math.isfinite(last) and last < 0.6 * first, (first, last)
    # and the shared loop drives it (sequence replay buffer from sequence_spec)
    out = train_offline(agent, pendulum_data, TrainConfig(steps=3, batch_size=32, log_every=1), evaluate=False,
                        progress=False)
    assert out["steps"] == 3 and agent.num_updates == 253


# ------------------------------------------------------------------------------ (2) receding horizon
class CountingSampler:
    """Stub for ``sample_chunk``: records the histories and returns chunks whose value encodes
    (call, step) so the executed actions can be traced back to chunk indices."""

    def __init__(self, agent):
        self.agent, self.histories = agent, []

    def __call__(self, hist):
        self.histories.append(hist.clone())
        c = len(self.histories)
        N, Tp, A = hist.shape[0], self.agent.config.pred_horizon, self.agent.act_dim
        k = torch.arange(Tp, dtype=torch.float32)
        return ((c * 20 + k) / 100.0)[None, :, None].expand(N, Tp, A).clone()


@pytest.mark.parametrize("To,Ta", [(2, 4), (3, 3)])
def test_receding_horizon_replans_and_histories(To, Ta):
    agent = tiny_agent(obs_dim=2, obs_horizon=To, action_steps=Ta)
    stub = agent.sample_chunk = CountingSampler(agent)
    N, T = 3, 10
    obs = [torch.full((N, 2), float(t)) + torch.arange(N)[:, None] * 0.1 for t in range(T)]  # o_t, per env
    agent.reset()
    outs = [agent.act(o) for o in obs]
    assert len(stub.histories) == math.ceil(T / Ta)
    for t, a in enumerate(outs):  # step t executes chunk[t % Ta] of plan t // Ta
        assert a.shape == (N, 1)
        torch.testing.assert_close(a, torch.full((N, 1), ((t // Ta + 1) * 20 + t % Ta) / 100.0))
    for p, hist in enumerate(stub.histories):  # plan p made at step s = p * Ta sees o_{s-To+1..s}, padded with o_0
        s = p * Ta
        want = torch.stack([obs[max(s - j, 0)] for j in range(To - 1, -1, -1)], 1)
        torch.testing.assert_close(hist, want)
    # reset forces a replan even with actions still queued, and the history restarts from the new first obs
    agent.reset()
    agent.act(obs[0])
    agent.reset()
    agent.act(obs[5])
    assert len(stub.histories) == math.ceil(T / Ta) + 2
    torch.testing.assert_close(stub.histories[-1], obs[5][:, None].expand(N, To, 2))
    # a different number of envs also resets
    n_plans = len(stub.histories)
    agent.act(obs[6][:2])
    assert len(stub.histories) == n_plans + 1
    torch.testing.assert_close(stub.histories[-1], obs[6][:2, None].expand(2, To, 2))


# ------------------------------------------------------------------------------ (3) act output
def test_act_shape_and_range():
    agent = tiny_agent(obs_dim=3, act_dim=2)
    agent.reset()
    for _ in range(6):
        a = agent.act(torch.randn(5, 3) * 3)
        assert a.shape == (5, 2) and a.dtype == torch.float32
        assert bool(a.isfinite().all()) and float(a.abs().max()) <= 1.0
    chunk = agent.sample_chunk(torch.randn(4, 2, 3))
    assert chunk.shape == (4, 8, 2) and float(chunk.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="obs must have shape"):
        agent.act(torch.randn(5, 4))


def test_state_dict_round_trip_keeps_ema_warmup():
    agent = tiny_agent()
    b = TensorDict({"observation": torch.randn(8, 2, 3), "action": torch.rand(8, 8, 1) * 2 - 1,
                    "valid": torch.ones(8, 8, dtype=torch.bool)}, [8])
    for _ in range(3):
        agent.update(b)
    other = tiny_agent()
    other.load_state_dict(agent.state_dict())
    assert other.ema.updates == agent.ema.updates == 3 and other.num_updates == 3
    x = torch.randn(2, 2, 3)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(agent.sample_chunk(x, generator=g1), other.sample_chunk(x, generator=g2))


# ------------------------------------------------------------------------------ (4) quality
def rotation_data(episodes=60, length=30, omega=0.4) -> OfflineData:
    """A point rotating at +-omega rad/step (random per episode), observed as (cos th_t, sin th_t);
    the action is a_t = 0.8 sin(th_{t+1}). The chunk a_t..a_{t+Tp-1} = 0.8 sin(th_t + (k+1) omega) is a
    deterministic function of the history (o_{t-1}, o_t), and cannot be told from o_t alone."""
    g = torch.Generator().manual_seed(1)
    obs, act, eid = [], [], []
    for k in range(episodes):
        w = omega if k % 2 == 0 else -omega
        th = torch.rand((), generator=g) * 2 * math.pi + w * torch.arange(length + 1)
        obs.append(torch.stack([th.cos(), th.sin()], -1))
        act.append(0.8 * th[1:].sin()[:, None])
        eid.append(torch.full((length,), k))
    o, nxt, a = torch.cat([x[:-1] for x in obs]), torch.cat([x[1:] for x in obs]), torch.cat(act)
    n = len(a)
    no = torch.zeros(n, dtype=torch.bool)
    return OfflineData(o, a, torch.zeros(n), nxt, no, no, torch.cat(eid), -torch.ones(1), torch.ones(1))


def test_learns_history_dependent_chunks():
    data = rotation_data()
    agent = make_agent("diffusion_policy", 2, 1, down_dims=(32,), time_dim=32, lr=3e-3, lr_warmup_steps=50)
    rb = data.replay_buffer(128, sequences=agent.sequence_spec)
    for _ in range(500):
        agent.update(rb.sample())
    seq = data.sequences(**agent.sequence_spec)
    pos = torch.arange(len(data)) % 30  # step within the episode
    idx = torch.nonzero((pos >= 1) & seq["valid"].all(1)).flatten()[::7]  # real (unpadded) histories
    target = seq["action"][idx]
    # the same chunk for the opposite rotation: what a policy ignoring o_{t-1} confuses it with
    th = torch.atan2(data.observations[idx, 1], data.observations[idx, 0])
    w = torch.where(data.episode_ids[idx] % 2 == 0, 0.4, -0.4)
    k = torch.arange(1, 9, dtype=torch.float32)
    torch.testing.assert_close(target[..., 0], 0.8 * torch.sin(th[:, None] + k * w[:, None]), atol=1e-4, rtol=0)
    reversed_target = (0.8 * torch.sin(th[:, None] - k * w[:, None]))[..., None]
    with torch.no_grad():
        pred = agent.sample_chunk(seq["observation"][idx])  # EMA model, 100 DDPM steps (paper defaults)
    # tolerances: mean absolute error 0.1 over the chunk, 0.12 over its executed part (amplitude 0.8)
    err = (pred - target).abs()
    # per window: most chunks are right, not just the average (a wrong-direction chunk is ~0.67 off)
    window_mae = err.mean((1, 2))
    q90 = float(window_mae.quantile(0.9))
    # the rotation direction is read from the history: where the two directions' chunks differ
    # clearly (they coincide when cos th_t ~ 0), the prediction is nearer the true one
    distinct = (target - reversed_target).abs().mean((1, 2)) > 0.3
    closer = window_mae < (pred - reversed_target).abs().mean((1, 2))
    right = float(closer[distinct].float().mean())
    print(f"rotation chunks: MAE {float(err.mean()):.3f} (executed {float(err[:, :4].mean()):.3f}, window q90 "
          f"{q90:.3f}); wrong-direction MAE {float((reversed_target - target).abs().mean()):.3f}; right direction "
          f"{right:.3f} of {int(distinct.sum())}")
    assert float(err.mean()) < 0.1
    assert float(err[:, :4].mean()) < 0.12  # the executed part
    assert q90 < 0.2
    assert int(distinct.sum()) >= 50 and right >= 0.9


# ------------------------------------------------------------------------------ (5) evaluation
def test_evaluate_on_pendulum_end_to_end(pendulum_data):
    agent = tiny_agent(pendulum_data.obs_dim, pendulum_data.act_dim)
    calls = []
    real = agent.sample_chunk

    def counting(hist):
        calls.append(hist.shape)
        return real(hist)

    agent.sample_chunk = counting
    agent.act(torch.zeros(7, pendulum_data.obs_dim))  # stale queue from another batch size: evaluate resets it
    calls.clear()
    res = evaluate_agent(agent, pendulum_data, episodes=2, seed=0)
    assert res.returns.shape == (2,) and list(res.lengths) == [200, 200]
    assert all(math.isfinite(r) for r in res.returns)
    assert len(calls) == 200 // 4 and all(c == (2, 2, pendulum_data.obs_dim) for c in calls)


def test_lr_schedule_is_diffusers_cosine_with_warmup():
    """``lr_at`` against diffusers' ``get_cosine_schedule_with_warmup`` (Diffusion Policy's scheduler):
    equal after the warm-up up to the last step (then ours stays at 0 where diffusers' cosine rises again);
    during the warm-up ours is one step ahead, so the first update is not taken at lr 0."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    agent = tiny_agent(lr=3e-4, lr_warmup_steps=20, lr_decay_steps=200)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=20, num_training_steps=200).lr_lambdas[0]
    for k in range(0, 201, 5):
        expected = 3e-4 * (ref(k + 1) if k < 20 else ref(k))
        assert agent.lr_at(k) == pytest.approx(expected, rel=1e-12, abs=1e-15), k
    assert agent.lr_at(110) == pytest.approx(1.5e-4) and agent.lr_at(200) == agent.lr_at(10**6) == 0.0  # stays at 0
    assert tiny_agent(lr=3e-4, lr_warmup_steps=20).lr_at(10**6) == 3e-4  # no decay: constant after warm-up

"""Consistency policies (Ding & Jin 2024): consistency BC (CT and CD) and consistency actor-critic.

Small networks (64 wide) keep the file fast on one core. The fixture's Pendulum actions come
from SAC's random warm-up: nearly uniform and independent of the state, so a behaviour-cloning
loss has nothing to learn there (the CT loss starts at its noise floor). The loss-decrease
tests therefore relabel the actions with a deterministic function of the state, a learnable
behaviour policy; rewards, next observations and terminations stay the fixture's.
"""

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from diffpolicy.agents import make_agent
from diffpolicy.agents.consistency_policy import ConsistencyAC, ConsistencyBC, ConsistencyDistilledBC
from diffpolicy.agents.diffusion_bc import DiffusionBC
from diffpolicy.agents.trainer import TrainConfig, train_offline
from known_q import KnownQ, two_mode_batch

SMALL = dict(hidden=64)
OBS, ACT = 3, 1  # Pendulum-v1


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def behaviour(obs):
    """A deterministic, state-dependent behaviour policy for the relabelled Pendulum batches."""
    return torch.tanh(obs[:, :1] + obs[:, 2:3])


def relabelled_batches(data, batch_size=256):
    rb = data.replay_buffer(batch_size)

    def sample():
        batch = rb.sample()
        batch["action"] = behaviour(batch["observation"])
        return batch

    return sample


def train(agent, sample, steps):
    """``steps`` updates as ``train_offline`` makes them; the logged values per step."""
    logs = []
    for _ in range(steps):
        out = agent.update(sample())
        assert all(v.dim() == 0 and not v.requires_grad for v in out.values())
        logs.append({k: float(v) for k, v in out.items()})
    return {k: np.array([r[k] for r in logs]) for k in logs[0]}


def assert_falls(values, factor, name):
    first, last = values[:20].mean(), values[-20:].mean()
    assert np.isfinite(values).all(), f"{name} is not finite"
    assert last < factor * first, f"{name}: first 20 {first:.4g}, last 20 {last:.4g} (want < {factor} x)"


def trained_teacher(sample, steps=300):
    teacher = DiffusionBC(OBS, ACT, **SMALL)
    train(teacher, sample, steps)
    return teacher


# ------------------------------------------------------------------------- (1) losses fall

def test_consistency_bc_loss_falls(pendulum_data):
    agent = make_agent("consistency_bc", OBS, ACT, **SMALL)
    logs = train(agent, relabelled_batches(pendulum_data), 300)
    assert_falls(logs["loss_ct"], 0.75, "loss_ct")


def test_consistency_distillation_loss_falls(pendulum_data):
    sample = relabelled_batches(pendulum_data)
    teacher = trained_teacher(sample)
    agent = make_agent("consistency_bc_cd", OBS, ACT, teacher=teacher, **SMALL)
    assert agent.grid_size() == 5  # the student runs on the teacher's 5-step grid
    assert repr(agent.actor.schedule) == repr(agent.teacher.schedule)
    logs = train(agent, sample, 300)
    assert_falls(logs["loss_cd"], 0.2, "loss_cd")
    # the student acts like its teacher, and so like the behaviour policy, in 1 and in 2 steps
    obs = sample()["observation"]
    target = behaviour(obs)
    teacher_err = float((teacher.act(obs) - target).abs().mean())
    blind_err = float((target - target.median()).abs().mean())  # the best action that ignores the state
    for n in (1, 2):
        agent.config.sample_steps = n
        err = float((agent.act(obs) - target).abs().mean())
        print(f"{n} step(s): student {err:.3f}, teacher {teacher_err:.3f}, state-blind {blind_err:.3f}")
        assert err < teacher_err + 0.1 and err < 0.6 * blind_err, (n, err, teacher_err, blind_err)


def test_consistency_ac_losses_fall(pendulum_data):
    agent = make_agent("consistency_ac", OBS, ACT, critic_hidden=64, **SMALL)
    logs = train(agent, relabelled_batches(pendulum_data), 300)
    assert set(logs) == {"loss_ct", "loss_q", "loss_critic"}
    assert_falls(logs["loss_critic"], 0.2, "loss_critic")
    assert_falls(logs["loss_ct"], 0.75, "loss_ct")
    assert np.isfinite(logs["loss_q"]).all()


# ------------------------------------------------------------------------- (2) multimodal BC

def test_consistency_bc_two_step_sampling_keeps_both_modes():
    """Actions at +-0.7 (equal weights) whatever the 1-d state: both modes, little mass between."""
    steps, B = 1000, 256
    agent = ConsistencyBC(1, 1, hidden=64, lr=1e-3, ct_total_steps=steps, ct_s1=80, ema_start=10**9)

    def sample():
        sign = torch.where(torch.rand(B, 1) < 0.5, 1.0, -1.0)
        return TensorDict({"observation": torch.rand(B, 1) * 2 - 1,
                           "action": (0.7 * sign + 0.05 * torch.randn(B, 1)).clamp(-1, 1)}, [B])

    train(agent, sample, steps)
    assert agent.config.sample_steps == 2
    a = agent.act(torch.rand(2000, 1) * 2 - 1).squeeze(-1)
    upper, lower, middle = (a > 0.35).float().mean(), (a < -0.35).float().mean(), (a.abs() < 0.2).float().mean()
    assert 0.3 < upper < 0.7 and 0.3 < lower < 0.7, (float(upper), float(lower))
    assert middle < 0.12, float(middle)


# ------------------------------------------------------------------------- (3) Q term

def test_consistency_ac_q_term_moves_actions_to_higher_q():
    """Data at -0.5 and +0.5; Q peaks at 0.8. With eta > 0 the actor's samples move up the critic."""
    steps, B = 150, 128
    sample = (lambda: two_mode_batch(B))

    results = {}
    for eta in (0.0, 1.0):
        torch.manual_seed(0)
        agent = ConsistencyAC(1, 1, hidden=64, critic_hidden=8, critic_depth=1, eta=eta, lr=1e-3, ema_start=10**9)
        agent.critic, agent.critic_target = KnownQ(), KnownQ()
        agent.add_optimizer("critic", agent.critic.parameters())
        logs = train(agent, sample, steps)
        with torch.no_grad():
            obs = torch.rand(1000, 1) * 2 - 1
            a = agent.sample_actions(obs)
            results[eta] = (float(KnownQ().q_min(obs, a).mean()), float(a.mean()), logs["loss_q"])
    (q_bc, mean_bc, _), (q_ac, mean_ac, loss_q) = results[0.0], results[1.0]
    print(f"eta=0: mean Q {q_bc:.3f}, mean action {mean_bc:.3f}; eta=1: mean Q {q_ac:.3f}, mean action {mean_ac:.3f}")
    assert q_ac > q_bc + 0.1, (q_bc, q_ac)
    assert mean_ac > mean_bc + 0.1, (mean_bc, mean_ac)
    assert np.isfinite(loss_q).all()  # -Q / E|Q| is exactly 1 here (Q < 0), only its gradient acts


def test_consistency_ac_act_prefers_high_q_candidates():
    agent = ConsistencyAC(1, 1, hidden=32, num_candidates=50, select_temperature=0.0)
    agent.critic_target = KnownQ()
    obs = torch.zeros(200, 1)
    picked = agent.act(obs)
    random = agent.sample_actions(obs)
    q = KnownQ().q_min
    assert float(q(obs, picked).mean()) > float(q(obs, random).mean())


# ------------------------------------------------------------------------- (4) CD teacher

def test_distillation_without_teacher_raises_clear_error():
    with pytest.raises(ValueError, match="teacher=.*teacher_path="):
        ConsistencyDistilledBC(OBS, ACT)
    with pytest.raises(ValueError, match="teacher"):
        make_agent("consistency_bc_cd", OBS, ACT, hidden=32)


def test_distillation_teacher_from_checkpoint(tmp_path, pendulum_data):
    """``teacher_path``: a diffusion_bc run of ``train_offline`` (a recorded ``checkpoint.pt`` path still resolves); its config.json gives the
    teacher's architecture (32 wide here, the student 48)."""
    teacher = DiffusionBC(OBS, ACT, hidden=32)
    train_offline(teacher, pendulum_data, TrainConfig(steps=3, batch_size=32), run_dir=tmp_path, progress=False,
                  evaluate=False)
    student = make_agent("consistency_bc_cd", OBS, ACT, hidden=48, teacher_path=str(tmp_path / "checkpoint.pt"))
    assert student.teacher.net.out.in_features == 32 and student.actor.net.out.in_features == 48
    for p, q in zip(student.teacher.parameters(), teacher.ema.module.parameters()):
        torch.testing.assert_close(p, q)
    assert not any(p.requires_grad for p in student.teacher.parameters())
    with pytest.raises(FileNotFoundError):
        make_agent("consistency_bc_cd", OBS, ACT, hidden=32, teacher_path=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------- (5) act

@pytest.mark.parametrize("name", ["consistency_bc", "consistency_bc_cd", "consistency_ac"])
@pytest.mark.parametrize("steps", [1, 2])
def test_act_shape_and_range(name, steps):
    kw = dict(hidden=32, sample_steps=steps)
    if name == "consistency_bc_cd":
        kw["teacher"] = DiffusionBC(OBS, 2, hidden=32)
    if name == "consistency_ac":
        kw.update(critic_hidden=32, num_candidates=8)
    agent = make_agent(name, OBS, 2, **kw)
    obs = torch.randn(7, OBS) * 3
    a = agent.act(obs)
    assert a.shape == (7, 2) and not a.requires_grad
    assert bool(((a >= -1) & (a <= 1)).all())


# ------------------------------------------------------------------------- (6) target network

def test_ct_target_decay_is_the_adaptive_ema_of_the_curriculum_and_cd_is_constant():
    """CT: ``mu(k) = exp(s0 log mu0 / N(k))`` (Song et al. 2023 App. C) with iCT's ``N(k) = min(s0 2^floor(k/K'),
    s1) + 1``, ``K' = floor(K / (log2(s1/s0) + 1))``; ``update_target`` moves the target by ``1 - mu``."""
    import math

    agent = ConsistencyBC(OBS, ACT, hidden=16, ct_total_steps=800, ct_s0=10, ct_s1=80, target_mu0=0.9)
    k_prime = math.floor(800 / (math.log2(80 / 10) + 1))  # 200: N = 11, 21, 41, 81
    for k, n in ((0, 11), (199, 11), (200, 21), (450, 41), (799, 81), (5000, 81)):
        agent.num_updates = k
        assert k_prime == 200 and agent.num_scales() == n
        assert agent.target_decay() == pytest.approx(math.exp(10 * math.log(0.9) / n), rel=1e-12)
    with torch.no_grad():
        for p in agent.target.parameters():
            p.fill_(1.0)
        for p in agent.actor.parameters():
            p.fill_(3.0)
    mu = agent.target_decay()
    agent.update_target()
    for p in agent.target.parameters():
        torch.testing.assert_close(p, torch.full_like(p, mu * 1.0 + (1 - mu) * 3.0))
    cd = ConsistencyDistilledBC(OBS, ACT, hidden=16, teacher=DiffusionBC(OBS, ACT, hidden=16), target_mu0=0.97)
    cd.num_updates = 12345
    assert cd.target_decay() == 0.97

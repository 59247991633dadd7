"""Twin Q critics: the clipped double-Q TD loss and Polyak target updates against hand computations.

The batch mixes an ongoing transition, a time-limit truncation (done but not terminated: it still
bootstraps) and a termination (no bootstrap), so ``gamma (1 - terminated) min_j Q'_j(s', a')`` is
exercised row by row; the agent tests elsewhere use always-terminated batches.
"""

import pytest
import torch
from tensordict import TensorDict

from diffpolicy.agents import make_agent
from diffpolicy.agents.critics import TwinQ, clipped_double_q_loss, soft_update

GAMMA = 0.9


def _perturbed_target(critic, seed=4):
    """A target that differs from the critic (a loss reading the wrong network would show); seed 4
    makes the min bind on head 2 in row 0 and head 1 in rows 1 and 3 of the test below."""
    target = critic.make_target()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return target


def _batch(obs_dim=3, act_dim=2, seed=0):
    """Rows: 0 ongoing, 1 truncated only (done, not terminated), 2 terminated, 3 ongoing."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(4, obs_dim, generator=g),
        "action": torch.rand(4, act_dim, generator=g) * 2 - 1,
        "next": {"observation": torch.randn(4, obs_dim, generator=g),
                 "reward": torch.tensor([[1.0], [-0.5], [2.0], [0.25]]),
                 "done": torch.tensor([[False], [True], [True], [False]]),
                 "terminated": torch.tensor([[False], [False], [True], [False]])},
    }, [4])


def _head(net, obs, act):
    """One Q head on one (s, a) row, as a float."""
    return float(net(torch.cat([obs, act])).squeeze())


def _hand_loss(critic, target, batch, next_action, gamma):
    """Row by row: y = r + gamma (1 - terminated) min(Q'_1(s', a'), Q'_2(s', a')); sum_i mean (Q_i - y)^2."""
    with torch.no_grad():
        ys, heads = [], []
        for i in range(4):
            s2, a2 = batch["next", "observation"][i], next_action[i]
            q1n, q2n = _head(target.q1, s2, a2), _head(target.q2, s2, a2)
            bootstrap = 0.0 if bool(batch["next", "terminated"][i]) else 1.0
            ys.append(float(batch["next", "reward"][i]) + gamma * bootstrap * min(q1n, q2n))
            heads.append(1 if q1n < q2n else 2)
        loss = 0.0
        for net in (critic.q1, critic.q2):
            loss += sum((_head(net, batch["observation"][i], batch["action"][i]) - ys[i]) ** 2 for i in range(4)) / 4
    return loss, ys, heads


def test_clipped_double_q_loss_matches_hand_computation():
    torch.manual_seed(0)
    critic = TwinQ(3, 2, hidden=16, depth=2)
    target = _perturbed_target(critic)
    batch = _batch()
    next_action = torch.rand(4, 2) * 2 - 1  # not the batch's actions: Q' must be read at (s', a')
    hand, ys, heads = _hand_loss(critic, target, batch, next_action, GAMMA)
    # The min binds on different heads among the bootstrapped rows (0, 1, 3), so max or one head would show.
    assert {heads[0], heads[1], heads[3]} == {1, 2}, heads
    assert ys[2] == 2.0  # terminated: the reward alone
    loss = clipped_double_q_loss(critic, target, batch, next_action, GAMMA)
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-5)
    # The target y is a constant: the gradient reaches the critic only, and equals the hand form's.
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    y = torch.tensor(ys)
    q1, q2 = critic(batch["observation"], batch["action"])
    grads = torch.autograd.grad(((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean(), list(critic.parameters()))
    for p, g in zip(critic.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_soft_update_is_polyak_averaging():
    torch.manual_seed(0)
    source, target = TwinQ(3, 2, hidden=8, depth=1), TwinQ(3, 2, hidden=8, depth=1)
    src_before = [p.clone() for p in source.parameters()]
    expected = [0.7 * t.detach() + 0.3 * s.detach() for t, s in zip(target.parameters(), source.parameters())]
    soft_update(target, source, 0.3)
    for p, e in zip(target.parameters(), expected):
        torch.testing.assert_close(p, e)
    for p, b in zip(source.parameters(), src_before):
        torch.testing.assert_close(p, b, rtol=0, atol=0)  # the source is left alone


def test_diffusion_ql_critic_step_uses_the_ema_actor_at_the_next_state():
    """DiffusionQL.update: the reported critic loss is the hand TD loss with a' = EMA actor(s'), and
    the target then moves by Polyak averaging with the configured tau towards the stepped critic."""
    torch.manual_seed(0)
    agent = make_agent("diffusion_ql", 3, 2, hidden=16, depth=1, time_dim=4, critic_hidden=16, critic_depth=2,
                       tau=0.25, gamma=GAMMA)
    agent.critic_target = _perturbed_target(agent.critic)
    batch = _batch()
    next_action = torch.rand(4, 2) * 2 - 1
    calls = []

    def sample_actions(obs, *, ema=True, generator=None):
        calls.append((obs.clone(), ema))
        return next_action

    agent.sample_actions = sample_actions
    hand, _, _ = _hand_loss(agent.critic, agent.critic_target, batch, next_action, GAMMA)
    target_before = [p.clone() for p in agent.critic_target.parameters()]
    out = agent.update(batch)
    assert len(calls) == 1 and calls[0][1] is True
    torch.testing.assert_close(calls[0][0], batch["next", "observation"], rtol=0, atol=0)
    assert float(out["loss_critic"]) == pytest.approx(hand, rel=1e-5)
    for p, b, c in zip(agent.critic_target.parameters(), target_before, agent.critic.parameters()):
        torch.testing.assert_close(p, 0.75 * b + 0.25 * c.detach())

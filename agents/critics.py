"""Twin Q critics with target networks and the clipped double-Q TD loss.

Shared by the agents whose actor is a diffusion or consistency model trained against a
critic (Diffusion-QL, consistency actor-critic). The IQL-style critics of IDQL and the
baselines use TorchRL's ``IQLLoss`` / ``TD3BCLoss`` instead.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diffpolicy.nets.activations import Mish

from .base import mlp

__all__ = ["TwinQ", "TwinCriticMixin", "clipped_double_q_loss", "soft_update", "select_by_q", "frozen"]


class TwinQ(nn.Module):
    """Two independent ``Q(s, a)`` MLPs (``depth`` x ``hidden``, Mish as in Diffusion-QL)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, activation=Mish):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden, depth, activation)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden, depth, activation)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, action], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, obs: Tensor, action: Tensor) -> Tensor:
        return torch.minimum(*self(obs, action))

    def make_target(self) -> "TwinQ":
        target = copy.deepcopy(self)
        target.requires_grad_(False)
        return target


def clipped_double_q_loss(critic: TwinQ, target: TwinQ, batch, next_action: Tensor, gamma: float) -> Tensor:
    """``sum_i (Q_i(s, a) - y)^2`` with ``y = r + gamma (1 - terminated) min_j Q'_j(s', a')``.

    Clipped double Q-learning (Fujimoto et al. 2018, eq. 10); ``terminated`` excludes time-limit
    truncations, so timeouts still bootstrap.
    """
    obs, action = batch["observation"], batch["action"]
    reward = batch["next", "reward"].reshape(-1)
    not_done = 1.0 - batch["next", "terminated"].reshape(-1).to(reward.dtype)
    with torch.no_grad():
        y = reward + gamma * not_done * target.q_min(batch["next", "observation"], next_action)
    q1, q2 = critic(obs, action)
    return ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``theta' <- (1 - tau) theta' + tau theta`` (Lillicrap et al. 2016)."""
    tp = [p for p in target.parameters()]
    sp = [p for p in source.parameters()]
    torch._foreach_lerp_(tp, sp, tau)


@torch.no_grad()
def select_by_q(obs: Tensor, candidates: Tensor, q_fn, temperature: float = 1.0) -> Tensor:
    """Pick one of ``candidates [B, N, act_dim]`` per state ``obs [B, obs_dim]`` with probability
    ``softmax(Q / temperature)`` over the ``N`` candidates (``temperature = 0``: the argmax).

    Diffusion-QL's action selection (Wang et al. 2023, their code's ``sample_action``), also used
    for Consistency-AC (Ding & Jin 2024). ``q_fn(obs, action) -> [B * N]``, e.g. ``TwinQ.q_min``.
    """
    B, N, A = candidates.shape
    q = q_fn(obs.repeat_interleave(N, 0), candidates.reshape(B * N, A)).reshape(B, N)
    if temperature > 0:
        idx = torch.multinomial(torch.softmax(q / temperature, -1), 1).squeeze(-1)
    else:
        idx = q.argmax(-1)
    return candidates[torch.arange(B, device=obs.device), idx]


@contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters take no gradient inside the block (its outputs still pass gradients
    to their inputs): a critic whose Q or action-gradient trains only the actor."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


class TwinCriticMixin:
    """The critic half of an actor-critic :class:`~diffpolicy.agents.base.OfflineAgent`.

    A :class:`TwinQ` with a Polyak target trained by clipped double Q-learning, a context in
    which the actor's Q term reaches the actor only, and acting by ``softmax(Q)`` over sampled
    candidates. Diffusion-QL and Consistency-AC differ only in their actor and its loss.
    """

    def init_twin_critic(self, hidden: int, depth: int, lr: float | None = None) -> None:
        self.critic = TwinQ(self.obs_dim, self.act_dim, hidden, depth)
        self.critic_target = self.critic.make_target()
        self.add_optimizer("critic", self.critic.parameters(), lr=lr)

    def critic_update(self, batch, next_action: Tensor) -> Tensor:
        """One clipped double-Q step towards ``r + gamma (1 - done) min_i Q'_i(s', next_action)``."""
        loss = clipped_double_q_loss(self.critic, self.critic_target, batch, next_action, self.config.gamma)
        self.step("critic", loss)
        return loss

    def critic_frozen(self):
        """Gradients of a Q term flow to the actions (and the actor) but not into the critic."""
        return frozen(self.critic)

    def update_critic_target(self) -> None:
        soft_update(self.critic_target, self.critic, self.config.tau)

    @torch.no_grad()
    def act_by_q(self, obs: Tensor, sample, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` actions ``sample(obs repeated)`` per state, one drawn by :func:`select_by_q` on the target critic."""
        cand = sample(obs.repeat_interleave(n, 0)).reshape(obs.shape[0], n, self.act_dim)
        return select_by_q(obs, cand, self.critic_target.q_min, temperature)

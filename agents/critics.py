"""Twin Q critics with target networks and the clipped double-Q TD loss.

Shared by the agents whose actor is a diffusion or consistency model trained against a
critic (Diffusion-QL, consistency actor-critic). The IQL-style critics of IDQL and the
baselines use TorchRL's ``IQLLoss`` / ``TD3BCLoss`` instead.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import mlp

__all__ = ["TwinQ", "clipped_double_q_loss", "soft_update", "select_by_q"]


class TwinQ(nn.Module):
    """Two independent ``Q(s, a)`` MLPs (``depth`` x ``hidden``, Mish as in Diffusion-QL)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, activation=nn.Mish):
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

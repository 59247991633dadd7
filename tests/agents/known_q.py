"""A fixed critic with a known optimum and the two-mode data it is read against, shared by the
tests of the actors' Q terms (Diffusion-QL, Consistency-AC)."""
import torch
from tensordict import TensorDict
from torch import nn


class KnownQ(nn.Module):
    """A fixed twin critic ``Q(s, a) = -(a - 0.8)^2`` with TwinQ's interface (one dummy weight, so
    the agent's critic step still runs)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, obs, action):
        q = -((action - 0.8) ** 2).sum(-1) + 0.0 * self.dummy
        return q, q

    def q_min(self, obs, action):
        return torch.minimum(*self(obs, action))


def two_mode_batch(B: int) -> TensorDict:
    """Actions at -0.5 and +0.5 (equal weights, whatever the 1-d state), one-step episodes."""
    sign = torch.where(torch.rand(B, 1) < 0.5, 1.0, -1.0)
    obs = torch.rand(B, 1) * 2 - 1
    return TensorDict({"observation": obs, "action": 0.5 * sign + 0.05 * torch.randn(B, 1),
                       "next": {"observation": obs, "reward": torch.zeros(B, 1),
                                "terminated": torch.ones(B, 1, dtype=torch.bool)}}, [B])

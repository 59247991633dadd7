"""DRWR: reward-weighted regression of a diffusion policy on its own rollouts (DPPO's baseline).

Reward-weighted regression (Peters & Schaal 2007) with the diffusion loss as the policy's
log-likelihood surrogate (Ren et al. 2024, App. B "DRWR"): every iteration collects
``num_envs x steps_per_iter`` environment steps with the exploring chain, computes each step's
discounted return-to-go ``G_t = r_t + gamma G_{t+1}`` within its episode, standardises the
``G`` of the batch, and fits the actor by ``exp(beta G)``-weighted denoising regression
(weights clipped at ``max_weight``) on the executed actions for ``update_epochs`` passes.
Steps after the last episode end of an environment have no complete return and are left out.
Defaults are DPPO's Hopper values (beta 10, max weight 100, 16 epochs, batch 1000).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffpolicy.advantage import reward_weights

from .online import OnlineChainAgent, OnlineChainConfig, epoch_batches

__all__ = ["DRWR", "DRWRConfig", "returns_to_go"]


@dataclasses.dataclass
class DRWRConfig(OnlineChainConfig):
    beta: float = 10.0
    max_weight: float = 100.0
    update_epochs: int = 16
    batch_size: int = 1000


def returns_to_go(reward: Tensor, done: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(G, complete)`` for ``reward, done [E, T]``: ``G_t = r_t + gamma (1 - done_t) G_{t+1}``
    and whether step ``t``'s episode ends within the batch (so ``G_t`` is a full return)."""
    E, T = reward.shape
    G = torch.zeros_like(reward, dtype=torch.float64)
    complete = torch.zeros(E, T, dtype=torch.bool)
    g = torch.zeros(E, dtype=torch.float64)
    ended = torch.zeros(E, dtype=torch.bool)
    for t in range(T - 1, -1, -1):
        d = done[:, t]
        ended = ended | d
        g = reward[:, t].double() + gamma * torch.where(d, 0.0, g)
        G[:, t], complete[:, t] = g, ended
    return G, complete


class DRWR(OnlineChainAgent):
    """Diffusion reward-weighted regression on the policy's own rollouts.

    An episode still running at the end of an iteration has no return yet: its steps wait
    (``pending``) and join the update of the iteration in which the episode ends.
    """

    name = "drwr"
    config_class = DRWRConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list[dict[str, Tensor]] = [{} for _ in range(self.config.num_envs)]

    def update(self, td) -> dict[str, float]:
        c = self.config
        reward_now = td["next", "reward"].reshape(td.shape)
        obs, act, G = [], [], []
        for e in range(td.shape[0]):
            new = {"observation": td["observation"][e], "action": td["action"][e], "reward": reward_now[e],
                   "done": td["next", "done"][e].reshape(-1)}
            seq = {k: torch.cat([self.pending[e][k], v]) if self.pending[e] else v for k, v in new.items()}
            g, complete = returns_to_go(seq["reward"][None], seq["done"][None], c.gamma)
            g, complete = g[0], complete[0]
            n = int(complete.sum())  # complete steps form a prefix of the sequence
            obs.append(seq["observation"][:n]), act.append(seq["action"][:n]), G.append(g[:n])
            self.pending[e] = {k: v[n:] for k, v in seq.items()}
        obs, act, g = torch.cat(obs), torch.cat(act), torch.cat(G)
        self.iterations += 1
        out = {"loss_actor": 0.0, "weight_mean": 0.0, "weight_max": 0.0, "regressed": float(g.numel()),
               "reward_mean": float(reward_now.mean())}
        if g.numel() < 2:
            return out  # no episode ended yet: nothing to regress on
        g = (g - g.mean()) / (g.std() + 1e-3)
        w = reward_weights(g.float(), c.beta, c.max_weight)
        out.update(loss_actor=self.fit_weighted(obs, act, w, epoch_batches(len(g), c.batch_size, c.update_epochs)),
                   weight_mean=float(w.mean()), weight_max=float(w.max()))
        return out

    def _load_extra_state(self, state: dict) -> None:
        # a resumed run starts new episodes: steps of the old unfinished ones would never get a return
        self.pending = [{} for _ in range(self.config.num_envs)]

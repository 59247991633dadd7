"""DAWR: advantage-weighted regression of a diffusion policy on its own rollouts (DPPO's baseline).

Advantage-weighted regression (Peng et al. 2019, Alg. 1) with the diffusion loss in place of
the log-likelihood (Ren et al. 2024, App. B "DAWR"): every iteration collects with the
exploring chain, fits the state-value critic to TD(lambda) targets (TorchRL's GAE value
targets, rewards divided by the running return std), and fits the actor by
``exp(beta A)``-weighted denoising regression on the executed actions, ``A`` the GAE advantage
standardised over the batch, weights clipped at ``max_weight``. Unlike the paper's replay of
past iterations, each update uses the iteration's own data (the same collector batches as
DPPO's). Defaults: DPPO's beta 10, max weight 100, batch 256; 4 critic and 4 actor epochs.
"""

from __future__ import annotations

import dataclasses

import torch

from diffpolicy.advantage import RunningReturnScaler, env_gae, reward_weights

from .online import OnlineChainAgent, OnlineChainConfig, explained_variance, with_scaled_rewards

__all__ = ["DAWR", "DAWRConfig"]


@dataclasses.dataclass
class DAWRConfig(OnlineChainConfig):
    beta: float = 10.0
    max_weight: float = 100.0
    critic_epochs: int = 4
    update_epochs: int = 4
    batch_size: int = 256
    scale_rewards: bool = True


class DAWR(OnlineChainAgent):
    """Diffusion advantage-weighted regression with a state-value critic."""

    name = "dawr"
    config_class = DAWRConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = RunningReturnScaler(self.config.num_envs, self.config.gamma)

    def update(self, td) -> dict[str, float]:
        c = self.config
        td, reward = with_scaled_rewards(td, self.scaler, c.scale_rewards)
        n = td.numel()
        critic_losses = []
        for _ in range(c.critic_epochs):  # TD(lambda) targets recomputed with the current critic each epoch
            env_gae(td, self.critic, gamma=c.gamma, lmbda=c.gae_lambda)
            flat = td.reshape(-1)
            perm = torch.randperm(n)
            for b in range(max(1, n // c.batch_size)):
                idx = perm[b * c.batch_size:(b + 1) * c.batch_size]
                critic_losses.append(float(self.critic_step(flat["observation"][idx], flat["value_target"][idx])))
        env_gae(td, self.critic, gamma=c.gamma, lmbda=c.gae_lambda)
        flat = td.reshape(-1)
        adv = flat["advantage"].reshape(-1)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        w = reward_weights(adv, c.beta, c.max_weight)
        loss = self.fit_weighted(flat["observation"], flat["action"], w, c.update_epochs, c.batch_size)
        self.iterations += 1
        return {"loss_actor": loss, "loss_critic": sum(critic_losses) / len(critic_losses),
                "weight_mean": float(w.mean()), "weight_max": float(w.max()),
                "explained_variance": explained_variance(flat["state_value"], flat["value_target"]),  # trained critic
                "reward_mean": float(reward.mean())}

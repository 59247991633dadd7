"""Gaussian PPO: the unimodal baseline to DPPO, through TorchRL's ``ClipPPOLoss``.

A tanh-normal policy (:func:`~diffpolicy.agents.gaussian_bc.tanh_normal_actor`), started from a
:class:`~diffpolicy.agents.gaussian_bc.GaussianBC` trained on the same data, fine-tuned by
PPO-clip (Schulman et al. 2017 eq. 7) with TorchRL's ``ClipPPOLoss`` and ``GAE``: a state-value
critic, rewards divided by the running return std, advantages standardised per minibatch
(``ClipPPOLoss(normalize_advantage=True)``). Same collectors, iterations and evaluation as the
diffusion agents (:func:`~diffpolicy.agents.online.train_online`); evaluation takes
``tanh(loc)``, the deterministic action of Gaussian BC.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from diffpolicy.advantage import RunningReturnScaler
from diffpolicy.nets.activations import Mish

from .base import mlp
from .gaussian_bc import deterministic_action, tanh_normal_actor
from .online import OnlineCheckpoint, explained_variance, with_scaled_rewards

__all__ = ["GaussianPPO", "GaussianPPOConfig"]


@dataclasses.dataclass
class GaussianPPOConfig:
    num_envs: int = 10
    steps_per_iter: int = 250
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    update_epochs: int = 10
    minibatches: int = 4
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    max_grad_norm: float | None = 1.0
    entropy_coef: float = 0.0
    target_kl: float | None = 1.0       # on TorchRL's kl_approx (mean log-ratio), not DPPO's k3 estimator
    scale_rewards: bool = True
    hidden: int = 256
    depth: int = 2
    critic_hidden: int = 256
    critic_depth: int = 3


class GaussianPPO(OnlineCheckpoint, nn.Module):
    name = "gaussian_ppo"
    config_class = GaussianPPOConfig

    def __init__(self, obs_dim: int, act_dim: int, config: GaussianPPOConfig | None = None, *, actor_state=None,
                 **overrides):
        super().__init__()
        from torchrl.modules import ValueOperator
        from torchrl.objectives import ClipPPOLoss
        from torchrl.objectives.value import GAE

        c = dataclasses.replace(config or GaussianPPOConfig(), **overrides)
        self.config, self.obs_dim, self.act_dim = c, obs_dim, act_dim
        self.actor = tanh_normal_actor(obs_dim, act_dim, c.hidden, c.depth, return_log_prob=True)
        if actor_state is not None:
            self.actor.load_state_dict(actor_state)
        self.critic = ValueOperator(mlp(obs_dim, 1, c.critic_hidden, c.critic_depth, Mish), in_keys=["observation"])
        self.loss = ClipPPOLoss(self.actor, self.critic, clip_epsilon=c.clip_epsilon,
                                entropy_bonus=c.entropy_coef > 0, entropy_coeff=c.entropy_coef,
                                normalize_advantage=True, loss_critic_type="l2")  # MSE value loss, as DPPO's
        self.gae = GAE(gamma=c.gamma, lmbda=c.gae_lambda, value_network=self.critic, average_gae=False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.scaler = RunningReturnScaler(c.num_envs, c.gamma)
        self.iterations = 0

    @classmethod
    def from_gaussian_bc(cls, bc, config: GaussianPPOConfig | None = None, **overrides) -> "GaussianPPO":
        """Start from a trained :class:`~diffpolicy.agents.gaussian_bc.GaussianBC` (same network: its
        ``hidden`` / ``depth``; asking for another width is an error, not silently ignored)."""
        for k in ("hidden", "depth"):
            asked = overrides.get(k, getattr(config, k, None))
            if asked not in (None, getattr(GaussianPPOConfig, k), getattr(bc.config, k)):
                raise ValueError(f"gaussian_ppo fine-tunes the Gaussian BC's own network ({k}={getattr(bc.config, k)}), "
                                 f"but {k}={asked} was asked: set it on the BC (from scratch: policy.{k}={asked})")
        from . import describe_agent

        overrides = {**overrides, "hidden": bc.config.hidden, "depth": bc.config.depth}
        agent = cls(bc.obs_dim, bc.act_dim, config, actor_state=bc.actor.state_dict(), **overrides)
        agent.base_policy = describe_agent(bc)  # train_online records it, so load_agent can rebuild the run
        return agent

    def policy_module(self):
        return self.actor  # the collector samples (ExplorationType.RANDOM) and stores the log-prob

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return deterministic_action(self.actor, obs)

    def reset(self) -> None:
        pass

    def update(self, td) -> dict[str, float]:
        c = self.config
        td, reward = with_scaled_rewards(td, self.scaler, c.scale_rewards)
        with torch.no_grad():
            self.gae(td)
        flat = td.reshape(-1)
        stats: dict[str, list[float]] = {k: [] for k in ("loss_actor", "loss_critic", "clip_fraction", "approx_kl")}
        minibatches = (mb for _ in range(c.update_epochs) for mb in torch.randperm(flat.shape[0]).chunk(c.minibatches))
        for mb in minibatches:
            out = self.loss(flat[mb])
            loss = out["loss_objective"] + out["loss_critic"] + out.get("loss_entropy", 0.0)
            self.actor_opt.zero_grad(set_to_none=True)
            self.critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.actor.parameters(), c.max_grad_norm)
                nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
            self.actor_opt.step()
            self.critic_opt.step()
            for k, key in (("loss_actor", "loss_objective"), ("loss_critic", "loss_critic"),
                           ("clip_fraction", "clip_fraction"), ("approx_kl", "kl_approx")):
                if key in out.keys():
                    stats[k].append(float(out[key].detach()))
            if c.target_kl is not None and stats["approx_kl"] and stats["approx_kl"][-1] > c.target_kl:
                break  # no more minibatches this iteration
        self.iterations += 1
        metrics = {k: (sum(v_) / len(v_) if v_ else 0.0) for k, v_ in stats.items()}
        metrics.update(explained_variance=explained_variance(flat["state_value"], flat["value_target"]),
                       reward_mean=float(reward.mean()))
        return metrics

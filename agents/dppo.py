"""DPPO: Diffusion Policy Policy Optimization (Ren et al., ICLR 2025).

The two-layer MDP (§4.1): every environment step runs a ``K``-step denoising chain whose last
sample is the action; each denoising step ``x_t -> x_s`` is a Gaussian "action" of the inner
MDP with log-prob ``log N(x_s | mu_theta(x_t, t, s), sigma_{t,s}^2)`` (DDPM, ``eta = 1``; DDIM
with ``eta < 1``). PPO-clip (Schulman et al. 2017 eq. 7) runs on the denoising steps, with the
environment-level GAE advantage (Schulman et al. 2016 eq. 16, TorchRL's estimator, a critic on
the state only) spread over the chain with the denoising discount ``gamma_d^(K-1-k)``
(App. C). Only the last ``ft_steps`` (``K'``) steps are fine-tuned; the earlier ones run the
frozen pre-trained model. Std floors (App. C): sampling ``min_sampling_std`` (exploration) and
log-prob ``min_logprob_std`` (bounded ratios); noise clipped to ``noise_clip`` std; the x0
prediction clipped to ``[-1, 1]``. The clip coefficient grows along the chain from
``clip_epsilon_base`` at the first fine-tuned step to ``clip_epsilon`` at the last,
``base + (eps - base) (e^{c u} - 1) / (e^c - 1)`` with ``u = k / (K' - 1)`` (their code's
``clip_ploss_coef_rate``). Rewards are divided by the running std of the discounted return.
Evaluation is deterministic: the chain of means, no noise at any step. (Their code's
``deterministic=True`` is not noise-free for DDPM: it keeps each step's own posterior std,
floored at 1e-3, and drops the noise at the last step only. On one Hopper-v5 checkpoint, 5e5
env steps into fine-tuning, 10 episodes: 56.7 for the chain of means, 55.2 with the model's own
noise, 54.6 with the exploration floor.)

The chain machinery is the core's: :func:`~diffpolicy.chain.rollout` (with ``train_steps`` and
``frozen``), :class:`~diffpolicy.chain_losses.ChainPPOLoss`, :func:`~diffpolicy.advantage.env_gae`
and :func:`~diffpolicy.advantage.spread_over_chain`; collection is TorchRL's ``Collector``
(:func:`~diffpolicy.agents.online.train_online`); acting and checkpoints are
:class:`~diffpolicy.agents.online.OnlineChainAgent`'s.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from tensordict import TensorDict
from torch import Tensor

from diffpolicy.advantage import RunningReturnScaler, env_gae, spread_over_chain
from diffpolicy.chain_losses import ChainPPOLoss

from .online import OnlineChainAgent, OnlineChainConfig, explained_variance, with_scaled_rewards

__all__ = ["DPPO", "DPPOConfig", "dppo_clip_schedule"]


@dataclasses.dataclass
class DPPOConfig(OnlineChainConfig):
    """DPPO's Gym fine-tuning settings (Ren et al. 2024 App. D, ``../shared/ANCHORS.md``), but the clip.

    Their Gym fine-tuning clips at a flat 0.01 with 40 envs x 500 decisions per iteration; their
    small-batch Gym configs (10 envs, minibatches of 1000: ``ppo_diffusion_mlp.yaml``) clip at 0.1.
    This library collects 10 x 250 decisions per iteration by default, where 0.01 barely moves the
    policy (Hopper-v5 medium, 1e6 env steps, 3 seeds: 32.9 -> 65.2 at 0.01, 88.3 at 0.02, 251 at 0.1,
    whose seeds read 349 and 371, and 35 for one that stood still at ~120 most of the run and fell
    at the end; ``benchmarks/results/finetune*.md``), so the default is 0.1. For the paper's runs,
    pass ``clip_epsilon=clip_epsilon_base=0.01`` with ``num_envs=40, steps_per_iter=500``.
    """

    denoising_discount: float = 0.99    # gamma_d along the chain
    scale_rewards: bool = True          # divide by the running std of the discounted return
    normalize_advantage: bool = True    # standardise env-level advantages per iteration
    clip_epsilon: float = 0.1           # PPO clip at the last denoising step (see above)
    clip_epsilon_base: float = 0.1      # ... at the first fine-tuned step (their Gym configs: flat;
                                        # Robomimic / Furniture: 1e-3, growing to clip_epsilon)
    clip_epsilon_rate: float = 3.0      # growth rate between them
    update_epochs: int = 10
    minibatches: int = 4                # per epoch, over the N x K' chain transitions
    target_kl: float | None = 1.0       # stop the epochs early once approx-KL exceeds it


def dppo_clip_schedule(n: int, eps: float, base: float, rate: float) -> Tensor:
    """PPO clip per fine-tuned step ``k = 0..n-1``: ``base + (eps - base)(e^{rate u} - 1)/(e^rate - 1)``, ``u = k/(n-1)``."""
    if n == 1:
        return torch.tensor([eps], dtype=torch.float64)
    u = torch.arange(n, dtype=torch.float64) / (n - 1)
    if rate == 0:
        return base + (eps - base) * u
    return base + (eps - base) * torch.expm1(rate * u) / math.expm1(rate)


class DPPO(OnlineChainAgent):
    """Fine-tune a pre-trained diffusion policy with PPO over its last ``ft_steps`` denoising steps."""

    name = "dppo"
    config_class = DPPOConfig

    def __init__(self, actor, obs_dim: int, act_dim: int, diffusion_steps: int, config: DPPOConfig | None = None,
                 **overrides):
        super().__init__(actor, obs_dim, act_dim, diffusion_steps, config, **overrides)
        c = self.config
        self.register_buffer("clip", dppo_clip_schedule(self.ft, c.clip_epsilon, c.clip_epsilon_base,
                                                        c.clip_epsilon_rate))
        self.loss = ChainPPOLoss(self.actor, clip_epsilon=c.clip_epsilon, eta=c.eta,
                                 min_logprob_std=c.min_logprob_std, clip_x0=c.clip_x0)
        self.scaler = RunningReturnScaler(c.num_envs, c.gamma)

    def chain_transitions(self, flat, advantage: Tensor) -> TensorDict:
        """The ``N x K'`` fine-tuned denoising transitions of a flat batch of env steps, flattened."""
        N, ft, K = flat.shape[0], self.ft, self.K
        chain_x = flat["chain_x"]
        dtype = chain_x.dtype
        return TensorDict({
            "x": chain_x[:, :-1], ("next", "x"): chain_x[:, 1:],
            "t": self.ts[K - ft:K].to(dtype).expand(N, ft), "s": self.ts[K - ft + 1:].to(dtype).expand(N, ft),
            "cond": flat["observation"].unsqueeze(1).expand(N, ft, self.obs_dim),
            "log_prob": flat["chain_log_prob"],
            "advantage": spread_over_chain(advantage, ft, self.config.denoising_discount),
            "clip_epsilon": self.clip.to(dtype).expand(N, ft),
        }, batch_size=[N, ft]).reshape(-1)

    def update(self, td) -> dict[str, float]:
        """One DPPO iteration on a collector batch ``td [num_envs, T]``."""
        c = self.config
        td, reward = with_scaled_rewards(td, self.scaler, c.scale_rewards)
        env_gae(td, self.critic, gamma=c.gamma, lmbda=c.gae_lambda)
        flat = td.reshape(-1)
        adv = flat["advantage"].reshape(-1)
        if c.normalize_advantage:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        steps = self.chain_transitions(flat, adv)
        obs, target = flat["observation"], flat["value_target"]
        stats: dict[str, list[float]] = {k: [] for k in ("loss_actor", "loss_critic", "clip_fraction", "approx_kl",
                                                         "ratio")}
        minibatches = ((mb, mb_s) for _ in range(c.update_epochs)
                       for mb, mb_s in zip(torch.randperm(steps.shape[0]).chunk(c.minibatches),
                                           torch.randperm(obs.shape[0]).chunk(c.minibatches)))
        for mb, mb_s in minibatches:
            out = self.loss(steps[mb])
            self._step(self.actor_opt, out["loss_objective"], self.actor.parameters())
            v_loss = self.critic_step(obs[mb_s], target[mb_s])
            for k, v in (("loss_actor", out["loss_objective"]), ("loss_critic", v_loss),
                         ("clip_fraction", out["clip_fraction"]), ("approx_kl", out["approx_kl"]), ("ratio", out["ratio"])):
                stats[k].append(float(v.detach()))
            if c.target_kl is not None and stats["approx_kl"][-1] > c.target_kl:
                break  # approx-KL passed target_kl: no more minibatches this iteration
        self.iterations += 1
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update(explained_variance=explained_variance(flat["state_value"], target),
                       reward_mean=float(reward.mean()), epochs_run=len(stats["ratio"]) / c.minibatches)
        return metrics

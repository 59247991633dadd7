"""DAWR: advantage-weighted regression of a diffusion policy on its recent rollouts (DPPO's baseline).

Advantage-weighted regression (Peng et al. 2019, Alg. 1) with the diffusion loss in place of
the log-likelihood (Ren et al. 2024, App. B "DAWR"), with the replay of DPPO's code
(``train_awr_diffusion_agent.py``): the exploring chain's last ``buffer_size`` transitions are kept
(first in, first out, whole iterations: ``ceil(buffer_size / frames)`` of them, ``frames`` the
transitions one iteration collects). Every iteration, on that buffer:

1. TD(lambda) value targets with the current critic (TorchRL's GAE), and
   ``replay_ratio x frames / batch_size / critic_update_ratio`` critic steps on minibatches drawn
   with replacement;
2. GAE advantages with the updated critic, standardised, and ``replay_ratio x frames / batch_size``
   actor steps of ``exp(beta A)``-weighted denoising regression (weights clipped at ``max_weight``)
   on the executed actions, minibatches drawn with replacement.

Defaults are DPPO's Hopper values: beta 10, max weight 100, batch 1000, replay ratio 64, critic
update ratio 4, and a buffer of 200k transitions (their 5000 steps of 40 envs: as many transitions
and as many actor steps since the oldest one was collected as theirs, whatever the iteration size).
Differences from that code, all small: rewards are divided by the running std of the discounted
return (their fixed x0.01; stored rewards are rescaled with the latest statistics at each update);
the advantages are standardised over the buffer (theirs: per minibatch); GAE runs within each
stored iteration, bootstrapping at its end and cutting at time limits (theirs: TD(lambda) with its
TD errors scaled by 0.95 across the whole buffer, time limits treated as terminal); the critic
samples the whole buffer (theirs draws indices below 5000, the buffer's length in vector steps,
so only its oldest 5000 transitions). Checkpoints hold the buffer (about 30 MB for Hopper at the
defaults), so a resumed run continues the same algorithm.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from tensordict import TensorDict

from diffpolicy.advantage import RunningReturnScaler, env_gae, reward_weights

from .online import OnlineChainAgent, OnlineChainConfig, explained_variance, replay_batches

__all__ = ["DAWR", "DAWRConfig"]

_KEYS = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done"),
         ("next", "terminated"))


@dataclasses.dataclass
class DAWRConfig(OnlineChainConfig):
    beta: float = 10.0
    max_weight: float = 100.0
    buffer_size: int = 200_000          # transitions replayed (DPPO: 5000 steps x 40 envs), whole iterations
    replay_ratio: float = 64.0          # actor steps per iteration = replay_ratio * frames / batch_size
    critic_update_ratio: int = 4        # critic steps = actor steps / critic_update_ratio
    batch_size: int = 1000
    scale_rewards: bool = True


class DAWR(OnlineChainAgent):
    """Diffusion advantage-weighted regression with a state-value critic and a replay of recent iterations."""

    name = "dawr"
    config_class = DAWRConfig
    retired_settings = ("critic_epochs", "update_epochs")  # the per-iteration DAWR before replay (2026-12)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        if c.buffer_size < 1 or c.critic_update_ratio < 1 or c.replay_ratio <= 0:
            raise ValueError(f"buffer_size and critic_update_ratio must be >= 1 and replay_ratio > 0, got "
                             f"{c.buffer_size}, {c.critic_update_ratio}, {c.replay_ratio}")
        self.scaler = RunningReturnScaler(c.num_envs, c.gamma)
        iterations = -(-c.buffer_size // (c.num_envs * c.steps_per_iter))
        self.buffer: collections.deque = collections.deque(maxlen=iterations)  # [E, T] each, raw rewards

    def _replay(self) -> TensorDict:
        """The buffer as ``[k, E, T]`` (GAE runs along ``T``, within each iteration), rewards scaled."""
        data = torch.stack(list(self.buffer))
        if self.config.scale_rewards:
            data["next", "reward"] = self.scaler.scale(data["next", "reward"])
        return data

    def update(self, td) -> dict[str, float]:
        c = self.config
        if c.scale_rewards:
            self.scaler(td["next", "reward"], td["next", "done"])  # the running statistics only
        self.buffer.append(td.select(*_KEYS).clone())
        data = self._replay()
        n, frames = data.numel(), td.numel()
        actor_steps = max(1, int(c.replay_ratio * frames / c.batch_size))
        env_gae(data, self.critic, gamma=c.gamma, lmbda=c.gae_lambda)  # targets from the critic before its steps
        flat = data.reshape(-1)
        critic_losses = [float(self.critic_step(flat["observation"][i], flat["value_target"][i]))
                         for i in replay_batches(n, c.batch_size, max(1, actor_steps // c.critic_update_ratio))]
        env_gae(data, self.critic, gamma=c.gamma, lmbda=c.gae_lambda)  # advantages with the updated critic
        flat = data.reshape(-1)
        adv = flat["advantage"].reshape(-1)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        w = reward_weights(adv, c.beta, c.max_weight)
        loss = self.fit_weighted(flat["observation"], flat["action"], w, replay_batches(n, c.batch_size, actor_steps))
        self.iterations += 1
        return {"loss_actor": loss, "loss_critic": sum(critic_losses) / len(critic_losses),
                "weight_mean": float(w.mean()), "weight_max": float(w.max()), "replayed": float(n),
                "explained_variance": explained_variance(flat["state_value"], flat["value_target"]),  # trained critic
                "reward_mean": float(td["next", "reward"].mean())}

    def _extra_state(self) -> dict:
        return {**super()._extra_state(),
                "buffer": torch.stack(list(self.buffer)).to_dict() if self.buffer else None}

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self.buffer.clear()
        saved = state.get("buffer", None)
        if saved is not None:
            stacked = TensorDict(saved, batch_size=saved["observation"].shape[:3])
            self.buffer.extend(entry.clone() for entry in stacked.unbind(0))

"""QSM: Q-score matching (Psenka et al., ICML 2024), fine-tuning a diffusion policy online.

Off-policy: the exploring chain collects into a TorchRL replay buffer; a twin critic learns
``Q(s, a)`` by clipped double Q-learning (Fujimoto et al. 2018 eq. 10) with next actions from
the current exploring policy and Polyak targets; the actor's score is aligned with the
critic's action gradient, ``|| -eps_theta(a_t, t | s) - q_coeff grad_a Q(s, a_t) ||^2`` on
buffer actions noised to ``a_t`` (eq. 8 in the sigma-scaled form DPPO's code uses;
:class:`~diffpolicy.chain_losses.QScoreMatchingLoss`). Per iteration
``replay_ratio x frames / batch_size`` gradient steps; the first ``critic_warmup_iters``
iterations train the critic only. Defaults are DPPO's Hopper values (reward x 0.01,
``q_coeff`` 50, tau 0.005, batch 256, replay ratio 32, 5 warm-up iterations). Checkpoints hold the
replay buffer (oldest to newest; 200k Hopper transitions are about 22 MB), so a resumed run
continues the same algorithm rather than restarting from an empty buffer.
"""

from __future__ import annotations

import dataclasses

import torch
from tensordict import TensorDict
from torch import nn

from diffpolicy.chain_losses import QScoreMatchingLoss

from .critics import TwinQ, clipped_double_q_loss, frozen, soft_update
from .online import OnlineChainAgent, OnlineChainConfig

__all__ = ["QSM", "QSMConfig"]


@dataclasses.dataclass
class QSMConfig(OnlineChainConfig):
    reward_scale: float = 0.01
    q_coeff: float = 50.0
    tau: float = 0.005
    buffer_size: int = 200_000          # transitions
    batch_size: int = 256
    replay_ratio: float = 32.0          # gradient steps per iteration = replay_ratio * frames / batch_size
    critic_warmup_iters: int = 5


class QSM(OnlineChainAgent):
    name = "qsm"
    config_class = QSMConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchrl.data import LazyTensorStorage, ReplayBuffer

        c = self.config
        self.critic_target = self.critic.make_target()
        self.loss = QScoreMatchingLoss(self.actor, self.critic.q_min, q_coeff=c.q_coeff)
        self.buffer = ReplayBuffer(storage=LazyTensorStorage(c.buffer_size), batch_size=c.batch_size)
        self.written = 0  # transitions written to the buffer (its ring position is written % buffer_size)
        self.warmup_end = c.critic_warmup_iters  # iterations before the actor trains

    def build_critic(self) -> nn.Module:
        c = self.config
        return TwinQ(self.obs_dim, self.act_dim, c.critic_hidden, c.critic_depth)

    def update(self, td) -> dict[str, float]:
        c = self.config
        flat = td.reshape(-1)
        self.buffer.extend(TensorDict({
            "observation": flat["observation"], "action": flat["action"],
            ("next", "observation"): flat["next", "observation"],
            ("next", "reward"): flat["next", "reward"].reshape(-1) * c.reward_scale,
            ("next", "terminated"): flat["next", "terminated"].reshape(-1)}, batch_size=flat.shape[:1]))
        self.written += flat.shape[0]
        n_steps = max(1, int(c.replay_ratio * flat.shape[0] / c.batch_size))
        train_actor = self.iterations >= self.warmup_end
        critic_losses, actor_losses = [], []
        for _ in range(n_steps):
            batch = self.buffer.sample()
            next_action = self.explore(batch["next", "observation"])[0]
            q_loss = clipped_double_q_loss(self.critic, self.critic_target, batch, next_action, c.gamma)
            self._step(self.critic_opt, q_loss, self.critic.parameters())
            critic_losses.append(float(q_loss.detach()))
            if train_actor:
                with frozen(self.critic):  # the QSM target is a fixed gradient field
                    a_loss = self.loss(batch)["loss_qsm"]
                self._step(self.actor_opt, a_loss, self.actor.parameters())
                actor_losses.append(float(a_loss.detach()))
            soft_update(self.critic_target, self.critic, c.tau)
        self.iterations += 1
        return {"loss_critic": sum(critic_losses) / len(critic_losses),
                "loss_actor": sum(actor_losses) / len(actor_losses) if actor_losses else 0.0,
                "gradient_steps": float(n_steps), "buffer": float(len(self.buffer)),
                "reward_mean": float(td["next", "reward"].mean())}

    def _extra_state(self) -> dict:
        n = len(self.buffer)
        oldest_first = (torch.arange(self.written - n, self.written) % self.config.buffer_size) if n else None
        return {"buffer": self.buffer.storage[oldest_first].to_dict() if n else None, "warmup_end": self.warmup_end}

    def _load_extra_state(self, state: dict) -> None:
        self.buffer.empty()
        self.written = 0
        saved = state.get("buffer", None)
        if saved is None and self.iterations:
            # a checkpoint written before buffers were saved: the critic warms up again on fresh data
            self.warmup_end = self.iterations + self.config.critic_warmup_iters
            return
        self.warmup_end = state.get("warmup_end", self.config.critic_warmup_iters)
        if saved is not None:
            td = TensorDict(saved, batch_size=[len(saved["observation"])])
            self.buffer.extend(td)
            self.written = td.shape[0]

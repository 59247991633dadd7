"""Diffusion-QL (Wang, Hunt & Zhou, ICLR 2023): diffusion BC plus Q maximisation through the chain.

Actor loss (eq. 3): ``L_bc - eta * Q(s, a_theta) / E|Q|`` where ``a_theta`` is drawn by the
5-step reverse chain *with gradients* (:class:`diffpolicy.chain_losses.DiffusionQLActorLoss`);
as in the paper's code, one head of the twin critic (``Q_1`` or ``Q_2``, at random each step)
is maximised and the other head's batch mean ``|Q|`` (detached) normalises it. The chain clips
its x0 prediction to ``[-1, 1]`` like the acting sampler (Diffusion-QL's ``clip_denoised``). Critic: twin Q networks (3x256 Mish) with
clipped double-Q targets whose next action comes from the EMA actor, soft target updates
(tau 0.005). Evaluation draws ``candidates`` actions per state from the actor and picks
one with probability ``softmax(min(Q'_1, Q'_2))`` over the candidates (the paper's code).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffpolicy.chain_losses import DiffusionQLActorLoss

from .critics import TwinQ, clipped_double_q_loss, select_by_q, soft_update
from .diffusion_bc import DiffusionBC, DiffusionBCConfig

__all__ = ["DiffusionQL", "DiffusionQLConfig"]


@dataclasses.dataclass
class DiffusionQLConfig(DiffusionBCConfig):
    eta: float = 1.0
    tau: float = 0.005
    critic_hidden: int = 256
    critic_depth: int = 3
    candidates: int = 50
    grad_clip: float | None = 5.0


class DiffusionQL(DiffusionBC):
    name = "diffusion_ql"
    config_class = DiffusionQLConfig

    def __init__(self, obs_dim: int, act_dim: int, config: DiffusionQLConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        self.critic = TwinQ(obs_dim, act_dim, c.critic_hidden, c.critic_depth)
        self.critic_target = self.critic.make_target()
        self.add_optimizer("critic", self.critic.parameters())
        self.actor_loss = DiffusionQLActorLoss(self.actor, self._twin_q, eta=c.eta, steps=c.diffusion_steps,
                                               clip_x0=1.0)

    def _twin_q(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q_i, Q_j)`` with the maximised head ``i`` drawn at random (the paper's code)."""
        q1, q2 = self.critic(obs, action)
        return (q1, q2) if bool(torch.randint(2, ()).item()) else (q2, q1)

    def update(self, batch) -> dict[str, Tensor]:
        c = self.config
        # Critic: clipped double-Q with the EMA actor's next action.
        with torch.no_grad():
            next_action = self.sample_actions(batch["next", "observation"], ema=True)
        critic_loss = clipped_double_q_loss(self.critic, self.critic_target, batch, next_action, c.gamma)
        self.step("critic", critic_loss)
        # Actor: BC + normalised Q through the chain (critic frozen for this step).
        self.critic.requires_grad_(False)
        try:
            out = self.actor_loss(batch)
        finally:
            self.critic.requires_grad_(True)
        self.step("actor", out["loss_actor"])
        self.update_ema()
        soft_update(self.critic_target, self.critic, c.tau)
        return {"loss_critic": critic_loss.detach(), "loss_bc": out["loss_bc"].detach(),
                "loss_q": out["loss_q"].detach()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        n = self.config.candidates
        cand = self.sample_actions(obs.repeat_interleave(n, 0), ema=False).reshape(obs.shape[0], n, self.act_dim)
        return select_by_q(obs, cand, self.critic_target.q_min)

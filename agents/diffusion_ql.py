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

from .critics import TwinCriticMixin
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


class DiffusionQL(TwinCriticMixin, DiffusionBC):
    name = "diffusion_ql"
    config_class = DiffusionQLConfig
    acting_fields = ("candidates",)

    def __init__(self, obs_dim: int, act_dim: int, config: DiffusionQLConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        if c.horizon != 1:
            raise ValueError(f"{self.name} acts one action per state; horizon={c.horizon} is for diffusion_bc only")
        self.init_twin_critic(c.critic_hidden, c.critic_depth)
        self.actor_loss = DiffusionQLActorLoss(self.actor, self._twin_q, eta=c.eta, steps=c.diffusion_steps,
                                               clip_x0=1.0)

    def _twin_q(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q_i, Q_j)`` with the maximised head ``i`` drawn at random (the paper's code)."""
        q1, q2 = self.critic(obs, action)
        return (q1, q2) if bool(torch.randint(2, ()).item()) else (q2, q1)

    def update(self, batch) -> dict[str, Tensor]:
        # Critic: clipped double-Q with the EMA actor's next action.
        with torch.no_grad():
            next_action = self.sample_actions(batch["next", "observation"], ema=True)
        critic_loss = self.critic_update(batch, next_action)
        # Actor: BC + normalised Q through the chain (critic frozen for this step).
        with self.critic_frozen():
            out = self.actor_loss(batch)
        self.step("actor", out["loss_actor"])
        self.update_ema()
        self.update_critic_target()
        return {"loss_critic": critic_loss.detach(), "loss_bc": out["loss_bc"].detach(),
                "loss_q": out["loss_q"].detach()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.act_by_q(obs, lambda o: self.sample_actions(o, ema=False), self.config.candidates)

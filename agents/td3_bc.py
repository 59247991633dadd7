"""TD3+BC (Fujimoto & Gu 2021) through TorchRL's :class:`~torchrl.objectives.TD3BCLoss`.

* Actor: a deterministic 2x256 ReLU MLP with a final ``tanh`` (TorchRL :class:`~torchrl.modules.Actor`),
  so actions lie in ``[-1, 1]``.
* Critic: twin ``Q(s, a)`` 2x256 ReLU MLPs (:class:`~torchrl.modules.ValueOperator`), passed to the
  loss as a list of two independently initialised modules, whose parameters TorchRL stacks.
* Loss (``TD3BCLoss``): critic ``sum_i MSE(Q_i(s, a), y)`` with
  ``y = r + gamma (1 - terminated) min_i Q'_i(s', clip(pi'(s') + clip(N(0, 0.2^2), -0.5, 0.5), -1, 1))``
  (``loss_function="l2"``, the paper's MSE; TorchRL's default is smooth-L1); actor
  ``-lambda Q_1(s, pi(s)) + MSE(pi(s), a)`` with ``lambda = alpha / mean |Q_1(s, pi(s))|``, ``alpha = 2.5``.
  Note the direction: **small** ``alpha`` means BC-dominated (``alpha = 0`` is pure BC), large
  ``alpha`` means Q-dominated.
* Policy delay 2: the critic steps on every ``update``; the actor and both target networks
  (TorchRL :class:`~torchrl.objectives.SoftUpdate`, ``tau = 0.005``) every second call, on calls
  0, 2, 4, ... (the reference code uses 2, 4, ...; starting at 0 gives ``loss_actor`` a value
  from the first call on). ``update`` always reports ``loss_actor`` from the latest actor step,
  (and ``bc_mse``, ``lmbd``), so the trainer's running means are not diluted by the skipped steps.
* ``gamma = 0.99``, Adam with ``lr = 3e-4`` for both.

TD3+BC normalises states by the dataset mean and std; :class:`~diffpolicy.envs.datasets.OfflineData`
already serves normalised observations, so nothing is done here. Rewards are used raw, as in the paper.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torchrl.data import Bounded
from torchrl.modules import MLP, Actor, ValueOperator
from torchrl.objectives import SoftUpdate, TD3BCLoss, ValueEstimators

from .base import AgentConfig, OfflineAgent
from .gaussian_bc import deterministic_action

__all__ = ["TD3BC", "TD3BCConfig", "twin_qvalue_modules"]


def twin_qvalue_modules(obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 2, n: int = 2) -> list[ValueOperator]:
    """``n`` independently initialised ``Q(s, a)`` ``ValueOperator`` s (``("observation", "action") -> "state_action_value"``)."""
    return [ValueOperator(MLP(in_features=obs_dim + act_dim, out_features=1, num_cells=[hidden] * depth,
                              activation_class=nn.ReLU), in_keys=["observation", "action"]) for _ in range(n)]


@dataclasses.dataclass
class TD3BCConfig(AgentConfig):
    hidden: int = 256
    depth: int = 2
    alpha: float = 2.5
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2
    tau: float = 0.005
    loss_function: str = "l2"


class TD3BC(OfflineAgent):
    """TD3+BC: ``TD3BCLoss`` + ``SoftUpdate``; ``act`` is the deterministic actor."""

    name = "td3_bc"
    config_class = TD3BCConfig

    def __init__(self, obs_dim: int, act_dim: int, config: TD3BCConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        actor = Actor(nn.Sequential(MLP(in_features=obs_dim, out_features=act_dim, num_cells=[c.hidden] * c.depth,
                                        activation_class=nn.ReLU), nn.Tanh()), in_keys=["observation"])
        # The loss module is a registered submodule: its (stacked) critic parameters and the target
        # copies live in its TensorDictParams, so they are in this agent's state_dict.
        self.loss = TD3BCLoss(actor, twin_qvalue_modules(obs_dim, act_dim, c.hidden, c.depth),
                              action_spec=Bounded(-1.0, 1.0, (act_dim,)), alpha=c.alpha, policy_noise=c.policy_noise,
                              noise_clip=c.noise_clip, loss_function=c.loss_function)
        self.loss.make_value_estimator(ValueEstimators.TD0, gamma=c.gamma)
        self.target_updater = SoftUpdate(self.loss, tau=c.tau)
        self.add_optimizer("actor", self.loss.actor_network_params.parameters())
        self.add_optimizer("critic", self.loss.qvalue_network_params.parameters())
        # Calls to ``update`` so far (drives the policy delay; saved with the agent) and the latest actor-step metrics.
        self.register_buffer("critic_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_loss_actor", torch.zeros(()))
        self.register_buffer("last_bc_mse", torch.zeros(()))
        self.register_buffer("last_lmbd", torch.zeros(()))

    @property
    def actor(self) -> Actor:
        """The deterministic actor (the loss's ``actor_network``; its parameters are ``loss.actor_network_params``)."""
        return self.loss.actor_network

    def update(self, batch) -> dict[str, Tensor]:
        td = batch.select("observation", "action", "next")
        loss_q, meta_q = self.loss.qvalue_loss(td)
        self.step("critic", loss_q)
        out = {"loss_qvalue": loss_q.detach(), "q_mean": meta_q["pred_value"].mean(),
               "target_mean": meta_q["target_value"].mean()}
        if int(self.critic_updates) % self.config.policy_delay == 0:
            loss_pi, meta_pi = self.loss.actor_loss(td)
            self.step("actor", loss_pi)
            self.target_updater.step()
            self.last_loss_actor.copy_(loss_pi.detach())
            self.last_bc_mse.copy_(meta_pi["bc_loss"])
            self.last_lmbd.copy_(meta_pi["lmbd"].detach())
        self.critic_updates += 1
        out.update(loss_actor=self.last_loss_actor.clone(), bc_mse=self.last_bc_mse.clone(),
                   lmbd=self.last_lmbd.clone())
        return out

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return deterministic_action(self.actor, obs)

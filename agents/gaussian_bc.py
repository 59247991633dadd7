"""Gaussian (tanh-normal) behaviour cloning: the unimodal baseline to diffusion BC.

``pi(a | s)`` is a TorchRL :class:`~torchrl.modules.ProbabilisticActor` with a
:class:`~torchrl.modules.TanhNormal` distribution: a 2x256 ReLU MLP (TorchRL's
:class:`~torchrl.modules.MLP`) outputs ``2 * act_dim`` numbers that
:class:`~tensordict.nn.NormalParamExtractor` splits into a state-dependent location and a
positive scale (biased softplus); the action is ``tanh`` of a normal sample, so it lies in
``(-1, 1)``. Training maximises the likelihood of the dataset actions with TorchRL's
:class:`~torchrl.objectives.BCLoss` (its negative log-likelihood for a distributional actor).

Dataset actions at the bounds: the tanh-normal density at ``|a| = 1`` needs ``atanh(+-1) = +-inf``
and its log-Jacobian ``log(1 - a^2)`` diverges, so actions are clamped to
``+-(1 - action_eps)`` (``action_eps = 1e-6``) before ``log_prob``. Data sitting exactly on the
bounds then contributes a finite but large likelihood term (pre-tanh value ``atanh(1 - 1e-6) ~ 7.25``).

``act`` is deterministic: TorchRL's ``ExplorationType.DETERMINISTIC`` sample of the tanh-normal,
``tanh(loc)`` (the tanh of the Gaussian's mode, which TorchRL uses because the tanh-normal has no
closed-form mode). On multimodal data this policy averages the modes (in pre-tanh space), which
is what diffusion BC avoids.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import Tensor, nn
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import BCLoss

from .base import AgentConfig, OfflineAgent

__all__ = ["GaussianBC", "GaussianBCConfig", "tanh_normal_actor", "deterministic_action", "clamp_action"]


def tanh_normal_actor(obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 2,
                      return_log_prob: bool = False) -> ProbabilisticActor:
    """A ``ProbabilisticActor`` ``"observation" -> ("loc", "scale") -> "action"`` with a ``TanhNormal`` on ``[-1, 1]``.

    The MLP (``depth`` x ``hidden``, ReLU) outputs ``2 * act_dim``; ``NormalParamExtractor`` maps them
    to a state-dependent location and scale. Shared by Gaussian BC, IQL and Gaussian PPO (which
    collects with ``return_log_prob=True``).
    """
    net = nn.Sequential(
        MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=[hidden] * depth, activation_class=nn.ReLU),
        NormalParamExtractor(),
    )
    module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module, in_keys=["loc", "scale"], out_keys=["action"], spec=Bounded(-1.0, 1.0, (act_dim,)),
        distribution_class=TanhNormal, distribution_kwargs={"low": -1.0, "high": 1.0},
        default_interaction_type=ExplorationType.DETERMINISTIC, return_log_prob=return_log_prob,
    )


def deterministic_action(actor: TensorDictModule, obs: Tensor) -> Tensor:
    """``actor``'s action for ``obs [N, obs_dim]`` under ``ExplorationType.DETERMINISTIC``, clamped to ``[-1, 1]``."""
    td = TensorDict({"observation": obs}, batch_size=obs.shape[:-1])
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        return actor(td)["action"].clamp(-1.0, 1.0)


def clamp_action(action: Tensor, eps: float) -> Tensor:
    """Dataset actions clamped to ``[-(1 - eps), 1 - eps]``, so the tanh-normal log-density stays finite."""
    return action.clamp(-1.0 + eps, 1.0 - eps)


@dataclasses.dataclass
class GaussianBCConfig(AgentConfig):
    hidden: int = 256
    depth: int = 2
    action_eps: float = 1e-6


class GaussianBC(OfflineAgent):
    """Tanh-normal BC by maximum likelihood; ``act`` returns ``tanh(loc(s))``."""

    name = "gaussian_bc"
    config_class = GaussianBCConfig

    def __init__(self, obs_dim: int, act_dim: int, config: GaussianBCConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        self.actor = tanh_normal_actor(obs_dim, act_dim, c.hidden, c.depth)
        self.add_optimizer("actor", self.actor.parameters())

        with warnings.catch_warnings():  # TorchRL's own note about its target-parameter annotations
            warnings.filterwarnings("ignore", message="The name target_actor_network_params")
            # A tuple, not a submodule: the loss shares the actor's parameters, and checkpoints hold the actor alone.
            self._bc_loss = (BCLoss(self.actor),)

    def nll(self, obs: Tensor, action: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``action`` (clamped to ``+-(1 - action_eps)``) under ``pi(. | obs)``."""
        td = TensorDict({"observation": obs, "action": clamp_action(action, self.config.action_eps)},
                        batch_size=obs.shape[:-1])
        return self._bc_loss[0](td)["loss_bc"]

    def update(self, batch) -> dict[str, Tensor]:
        loss = self.nll(batch["observation"], batch["action"])
        self.step("actor", loss)
        return {"loss_bc": loss.detach()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return deterministic_action(self.actor, obs)

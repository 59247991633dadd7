"""IDQL (Hansen-Estruch et al. 2023): an IQL critic and a diffusion behaviour policy, combined at acting time.

* Critic: IQL (Kostrikov et al. 2022) through TorchRL's ``IQLLoss`` (value and twin-Q terms only,
  :func:`diffpolicy.agents.iql.make_iql_critic_loss`), expectile ``tau = 0.7``, soft target
  updates; trained independently of the actor.
* Actor: diffusion BC of the behaviour policy ``mu(a | s)`` (:class:`~diffpolicy.agents.diffusion_bc.DiffusionBC`);
  the denoiser of their code (``MLPResNet``): 3 pre-LayerNorm residual blocks of width 256 with a
  1024-wide inner layer, dropout 0.1 (training only) and swish; 5 VP steps. Time goes through 128
  sinusoidal features and a Mish MLP back to 128 (theirs: 128 learnable Fourier features, a swish
  MLP to 256). Not theirs: constant learning rate
  (theirs: AdamW with cosine decay over the run) and the benchmark's shared batch of 256 (theirs 512).
* Acting: draw ``candidates`` actions from ``mu`` and pick one. ``selection="argmax"`` (the
  default) takes the candidate of highest ``min(Q_1, Q_2)``, as the authors' code evaluates
  (``eval_actions`` of their DDPM-IQL learner, N = 64). The paper's implicit-policy resampling
  (IDQL sec. 4.1, ``w = f'(Q - V) / (Q - V)`` for the value loss ``f``) is kept as an option:
  for the expectile loss ``w(s, a) = |tau - 1(Q(s, a) < V(s))|`` (``"expectile"``), which with
  ``tau = 0.7`` only tilts ``mu`` by 0.7 : 0.3 and scores far below argmax on our Hopper data
  (same weights, medium-replay seed 0: 21.1 against 36.5); the quantile loss gives
  ``|tau - 1(Q < V)| / |Q - V|`` (``"quantile"``). Both only change acting (``acting_fields``):
  ``diffpolicy eval RUN selection=expectile`` re-scores a trained run.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torchrl.objectives import SoftUpdate

from .diffusion_bc import DiffusionBC, DiffusionBCConfig
from .iql import critic_batch, make_iql_critic_loss, q_and_v

__all__ = ["IDQL", "IDQLConfig", "expectile_weights", "quantile_weights"]

SELECTIONS = ("expectile", "quantile", "argmax")


def expectile_weights(q: Tensor, v: Tensor, expectile: float) -> Tensor:
    """IDQL sec. 4.1 for the expectile loss ``f(u) = |tau - 1(u < 0)| u^2``: ``w = |tau - 1(Q < V)|``."""
    return (expectile - (q - v < 0).to(q.dtype)).abs()


def quantile_weights(q: Tensor, v: Tensor, tau: float, eps: float = 1e-6) -> Tensor:
    """IDQL sec. 4.1 for the quantile loss ``f(u) = |tau - 1(u < 0)| |u|``: ``w = |tau - 1(Q < V)| / |Q - V|``."""
    return expectile_weights(q, v, tau) / (q - v).abs().clamp_min(eps)


@dataclasses.dataclass
class IDQLConfig(DiffusionBCConfig):
    residual: bool = True
    expansion: int = 4
    dropout: float = 0.1
    activation: str = "silu"
    time_dim: int = 128
    expectile: float = 0.7
    tau: float = 0.005
    critic_hidden: int = 256
    critic_depth: int = 2
    candidates: int = 64
    selection: str = "argmax"

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")


class IDQL(DiffusionBC):
    name = "idql"
    config_class = IDQLConfig
    reward_normalization = "return_range"  # IQL's MuJoCo setting: rewards x 1000 / (max - min episode return)
    # runs recorded before the blocks had these settings were built without them (3x256 blocks, no dropout)
    legacy_settings = {"expansion": 1, "dropout": 0.0}
    acting_fields = ("candidates", "selection", "sampler", "temperature")  # the actor is plain BC

    def __init__(self, obs_dim: int, act_dim: int, config: IDQLConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        if c.horizon != 1:
            raise ValueError(f"{self.name} acts one action per state; horizon={c.horizon} is for diffusion_bc only")
        self.critic_loss, _, _ = make_iql_critic_loss(obs_dim, act_dim, c.expectile, gamma=c.gamma,
                                                      hidden=c.critic_hidden, depth=c.critic_depth)
        self.target_updater = SoftUpdate(self.critic_loss, tau=c.tau)
        self.add_optimizer("value", self.critic_loss.value_network_params.parameters())
        self.add_optimizer("critic", self.critic_loss.qvalue_network_params.parameters())

    def update(self, batch) -> dict[str, Tensor]:
        return {**self.update_critic(batch), **super().update(batch)}

    def update_critic(self, batch) -> dict[str, Tensor]:
        """One IQL step (value, twin Q, soft target update); the actor plays no part in it."""
        td = critic_batch(batch, batch["action"])
        loss_v, _ = self.critic_loss.value_loss(td)
        self.step("value", loss_v)
        loss_q, _ = self.critic_loss.qvalue_loss(td)
        self.step("critic", loss_q)
        self.target_updater.step()
        return {"loss_value": loss_v.detach(), "loss_qvalue": loss_q.detach()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        n, k = obs.shape[0], self.config.candidates
        obs_rep = obs.repeat_interleave(k, 0)
        acts = self.sample_actions(obs_rep)
        q, v = q_and_v(self.critic_loss, obs_rep, acts)
        q, v = q.reshape(n, k), v.reshape(n, k)
        if self.config.selection == "argmax":
            idx = q.argmax(1)
        else:
            weights = expectile_weights if self.config.selection == "expectile" else quantile_weights
            idx = torch.multinomial(weights(q, v, self.config.expectile), 1).squeeze(1)
        return acts.reshape(n, k, -1)[torch.arange(n), idx]

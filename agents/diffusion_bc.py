"""Diffusion behaviour cloning on states (the actor of Diffusion-QL without the Q term).

``pi(a | s)`` is a conditional diffusion model over actions in ``[-1, 1]``: Diffusion-QL's
3x256 Mish MLP denoiser (Wang et al. 2023, App. D) with a 16-d sinusoidal time embedding,
eps-prediction on Diffusion-QL's 5-step discretised VP schedule (beta_min 0.1, beta_max 10),
trained with the denoising loss (Ho et al. 2020 eq. 14). Actions are drawn by 5 DDPM
ancestral steps with the x0 prediction clipped to ``[-1, 1]`` (Diffusion-QL's
``clip_denoised``), from the EMA copy of the network (decay 0.995, updated every 5 steps
after 1000 steps, as in the paper's code; before that the copy follows the network, where the
paper's code keeps its initial weights).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser
from diffpolicy.ema import EMA
from diffpolicy.losses import diffusion_loss, masked_diffusion_loss
from diffpolicy.nets import MLPDenoiser
from diffpolicy.samplers import sample

from .base import AgentConfig, OfflineAgent, eval_mode

__all__ = ["DiffusionBC", "DiffusionBCConfig", "make_action_denoiser"]


@dataclasses.dataclass
class DiffusionBCConfig(AgentConfig):
    hidden: int = 256
    depth: int = 3
    time_dim: int = 16
    activation: str = "mish"
    residual: bool = False
    layer_norm: bool = False
    expansion: int = 1              # residual blocks' inner width / hidden (IDQL: 4)
    dropout: float = 0.0            # at each residual block's input, training only (IDQL: 0.1)
    diffusion_steps: int = 5
    prediction: str = "eps"
    sampler: str = "ddpm"
    ema_decay: float = 0.995
    ema_every: int = 5
    ema_start: int = 1000
    beta_schedule: str = "vp"       # Diffusion-QL's VP; DPPO pre-trains with "squaredcos_cap_v2"
    horizon: int = 1                # action chunk: predict and execute this many actions per state
    temperature: float = 1.0        # sampling temperature (samplers.tempered): 0 acts by the noise-free path

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def make_action_denoiser(obs_dim: int, act_dim: int, cfg: DiffusionBCConfig) -> Denoiser:
    """The state-conditioned denoiser of ``cfg`` over ``horizon * act_dim`` (a flattened action chunk)
    on the discrete ``beta_schedule`` with ``diffusion_steps`` steps."""
    net = MLPDenoiser(act_dim * cfg.horizon, obs_dim=obs_dim, hidden=cfg.hidden, depth=cfg.depth,
                      time_dim=cfg.time_dim, activation=cfg.activation, residual=cfg.residual,
                      layer_norm=cfg.layer_norm, expansion=cfg.expansion, dropout=cfg.dropout)
    return Denoiser(net, S.DiscreteVP(cfg.diffusion_steps, beta_schedule=cfg.beta_schedule), cfg.prediction)


class DiffusionBC(OfflineAgent):
    """Diffusion behaviour cloning: ``update`` fits the denoiser, ``act`` samples from the EMA model.

    With ``horizon = H > 1`` (DPPO's pre-training, ``horizon_steps = act_steps``) the model draws
    a chunk ``a_t .. a_{t+H-1}`` given ``s_t``, learnt from dataset windows (steps past the
    episode's end masked out of the loss), and ``act`` executes the chunk's actions one per call
    before drawing the next chunk (``reset`` clears it).
    """

    name = "diffusion_bc"
    config_class = DiffusionBCConfig
    acting_fields = ("sampler", "temperature")

    def __init__(self, obs_dim: int, act_dim: int, config: DiffusionBCConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        if self.config.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.config.horizon}")
        self.actor = make_action_denoiser(obs_dim, act_dim, self.config)
        self.ema = EMA(self.actor, decay=self.config.ema_decay)
        self.add_optimizer("actor", self.actor.parameters())
        self._queue: list[Tensor] = []

    @property
    def sequence_spec(self) -> dict | None:
        h = self.config.horizon
        return None if h == 1 else {"obs_horizon": 1, "action_horizon": h}

    # ------------------------------------------------------------------ training
    def bc_loss(self, obs: Tensor, action: Tensor, valid: Tensor | None = None) -> Tensor:
        """Denoising loss of ``action [B, A]`` (or chunks ``[B, H, A]`` with ``valid [B, H]``) given ``obs``."""
        if action.dim() == 2:
            return diffusion_loss(self.actor, action, obs).mean()
        B = action.shape[0]
        obs = obs.reshape(B, -1)
        if valid is None:
            return diffusion_loss(self.actor, action.reshape(B, -1), obs).mean()
        mask = valid[..., None].expand_as(action).reshape(B, -1)
        return masked_diffusion_loss(self.actor, action.reshape(B, -1), obs, mask)

    def update_ema(self) -> None:
        """EMA every ``ema_every`` steps from ``ema_start`` on (Diffusion-QL); before, a plain copy."""
        c = self.config
        if self.num_updates < c.ema_start:
            with torch.no_grad():  # a plain copy (no state-dict key matching in the hot loop)
                torch._foreach_copy_(list(self.ema.module.parameters()), list(self.actor.parameters()))
        elif self.num_updates % c.ema_every == 0:
            self.ema.update(self.actor)

    def update(self, batch) -> dict[str, Tensor]:
        loss = self.bc_loss(batch["observation"], batch["action"], batch.get("valid", None))
        self.step("actor", loss)
        self.update_ema()
        return {"loss_bc": loss.detach()}

    # ------------------------------------------------------------------ acting
    def sample_actions(self, obs: Tensor, *, ema: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """One action (a flattened ``horizon``-chunk) per row of ``obs`` drawn by the reverse chain, in ``[-1, 1]``;
        the model runs in eval mode (IDQL's dropout acts in training only)."""
        model = self.ema.module if ema else self.actor
        with eval_mode(model):
            a = sample(model, (obs.shape[0], self.act_dim * self.config.horizon), self.config.diffusion_steps,
                       self.config.sampler, cond=obs, clip_x0=1.0, generator=generator, device=obs.device,
                       temperature=self.config.temperature)
        return a.clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        if self.config.horizon == 1:
            return self.sample_actions(obs)
        if not self._queue or self._queue[0].shape[0] != obs.shape[0]:
            chunk = self.sample_actions(obs).reshape(obs.shape[0], self.config.horizon, self.act_dim)
            self._queue = list(chunk.unbind(1))
        return self._queue.pop(0)

    def reset(self) -> None:
        self._queue = []

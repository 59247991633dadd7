"""Diffusion Policy on states (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning
via Action Diffusion"): observation history, action chunks, temporal U-Net, receding horizon.

Model. ``pi(a_{t:t+Tp} | o_{t-To+1:t})`` is a conditional diffusion model over an action
*chunk* ``[Tp, act_dim]`` in ``[-1, 1]``. The denoiser is the paper's ``ConditionalUnet1D``
(:class:`~diffpolicy.nets.TemporalUnet1D`): 1-D convolutions over the chunk's time axis, every
residual block FiLM-modulated by ``concat(time_embedding, flatten(obs history))`` (the paper's
``obs_as_global_cond=True``, the setting of all its state-based U-Net runs).

Defaults follow the paper's state-based ("lowdim") U-Net config, ``diffusion_policy/config/
train_diffusion_unet_lowdim_workspace.yaml`` of real-stanford/diffusion_policy, except the horizons:

* ``To = 2`` observations (as the paper), ``Ta = 4`` executed actions per plan (the paper
  executes 8 on its 10 Hz manipulation tasks; its action-horizon ablation finds a moderate
  horizon best, and MuJoCo locomotion control (Hopper, Walker2d: 125 Hz) is more reactive, so we halve it).
* ``Tp = 8`` predicted actions (the paper predicts 16 steps *including the To-1 past ones*,
  i.e. 15 future ones, for 8 executed). For small MuJoCo tasks we predict twice the executed
  steps: ``Tp = 2 Ta`` keeps the paper's "predict further than you execute" temporal
  consistency while keeping the chunk short (Tp must be a multiple of
  ``2 ** (len(down_dims) - 1) = 4``).
* U-Net ``down_dims = (256, 512, 1024)``, kernel 5, 8 GroupNorm groups, 256-d diffusion-step
  embedding.
* DDPM schedule: 100 training steps, ``squaredcos_cap_v2`` betas, eps-prediction, and 100
  DDPM ancestral inference steps with the "fixed_small" (posterior) variance and the x0
  prediction clipped to ``[-1, 1]`` (``clip_sample=True``). The paper's DDIM alternative
  (100 train / 10 inference steps, which it uses on the real robots for latency) is
  ``sampler="ddim", inference_steps=10``; it is about 10x cheaper per plan.
* AdamW, lr 1e-4, betas (0.95, 0.999), weight decay 1e-6; linear warm-up over 500 steps, then
  constant, or cosine decay to 0 at ``lr_decay_steps`` (the paper decays over the whole run:
  set ``lr_decay_steps`` to the number of training steps, which the agent cannot see).
* EMA with the paper's power warm-up (``EMAModel(power=0.75, inv_gamma=1, max_value=0.9999)``):
  decay ``1 - (1 + k)^-0.75`` at the k-th averaging step, capped at 0.9999; actions come from
  the EMA copy.

Alignment convention (the one of :meth:`~diffpolicy.envs.datasets.OfflineData.sequences`).
Window ``i`` holds observations ``o_{i-To+1} .. o_i`` (padded with the episode's first
observation) and actions ``a_i .. a_{i+Tp-1}``: **the chunk starts at the current step**. The
original code instead predicts ``horizon`` actions starting at the *oldest* observed step and
executes ``[To-1 : To-1+Ta]``; here the ``To-1`` past actions are simply not predicted, so
``act`` executes ``chunk[0 : Ta]``. (Paper ``horizon=16, To=2`` corresponds to ``Tp=15`` here.)

Loss. The eps-prediction MSE (Ho et al. 2020 eq. 14) averaged over the *valid* action steps
only: ``sequences()`` pads windows that run past the episode end by repeating the last action,
and ``valid`` marks the real ones. Without the mask, the last ``Tp - 1`` windows of every
episode would teach the model to hold the final action constant, which over-weights episode
ends (most of the chunk is padding there) and biases chunks toward "freeze" near time limits.
The original code does not mask; ``mask_padding=False`` restores that.

Acting (receding horizon). ``act(obs [N, obs_dim])`` is called once per env step. The agent
keeps per-env observation histories ``[N, To, obs_dim]`` (after ``reset()``, or when ``N``
changes, the history is filled by repeating the first observation, as ``sequences()`` pads
episode starts) and a queue of planned actions. When the queue is empty it samples one chunk
per env (one batched reverse chain) and enqueues ``chunk[:, 0:Ta]``; each call pops one
action. So ``T`` calls replan ``ceil(T / Ta)`` times, and ``reset()`` forces a replan.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch
from torch import Tensor

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser
from diffpolicy.ema import EMA
from diffpolicy.losses import diffusion_loss, masked_diffusion_loss
from diffpolicy.nets import TemporalUnet1D
from diffpolicy.samplers import sample

from .base import AgentConfig, OfflineAgent

__all__ = ["DiffusionPolicy", "DiffusionPolicyConfig", "PowerEMA", "make_chunk_denoiser"]


@dataclasses.dataclass
class DiffusionPolicyConfig(AgentConfig):
    lr: float = 1e-4
    # horizons
    obs_horizon: int = 2          # To
    pred_horizon: int = 8         # Tp: length of the predicted chunk, starting at the current step
    action_steps: int = 4         # Ta: actions executed per plan (receding horizon)
    # temporal U-Net (ConditionalUnet1D)
    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8
    time_dim: int = 256
    # diffusion
    diffusion_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "eps"
    sampler: str = "ddpm"
    inference_steps: int = 100
    timestep_spacing: str = "trailing"
    clip_sample: float | None = 1.0
    mask_padding: bool = True
    # optimiser (AdamW) and learning-rate schedule
    adam_betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    lr_warmup_steps: int = 500
    lr_decay_steps: int | None = None
    # EMA with power warm-up
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999


class PowerEMA(EMA):
    """EMA with Diffusion Policy's warm-up (``EMAModel`` with ``inv_gamma=1``, ``update_after_step=0``):
    decay ``min(max_decay, 1 - (1 + k)^-power)`` at averaging step ``k`` (``k = 0``: decay 0, a copy)."""

    def __init__(self, model, power: float = 0.75, max_decay: float = 0.9999):
        self.power = power
        super().__init__(model, decay=max_decay)

    def current_decay(self, k: int) -> float:
        return max(0.0, min(self.decay, 1.0 - (1.0 + max(k, 0)) ** -self.power))


def make_chunk_denoiser(obs_dim: int, act_dim: int, cfg: DiffusionPolicyConfig) -> Denoiser:
    """The temporal U-Net over ``[Tp, act_dim]`` chunks, conditioned on ``To * obs_dim`` features."""
    net = TemporalUnet1D(act_dim, obs_dim=cfg.obs_horizon * obs_dim, down_dims=tuple(cfg.down_dims),
                         kernel_size=cfg.kernel_size, n_groups=cfg.n_groups, time_dim=cfg.time_dim)
    sched = S.DiscreteVP(cfg.diffusion_steps, beta_schedule=cfg.beta_schedule)
    return Denoiser(net, sched, cfg.prediction)


class DiffusionPolicy(OfflineAgent):
    """Diffusion Policy (state-based, U-Net): ``update`` fits the chunk denoiser on
    ``sequences()`` windows, ``act`` runs the receding-horizon controller on the EMA model."""

    name = "diffusion_policy"
    config_class = DiffusionPolicyConfig

    def __init__(self, obs_dim: int, act_dim: int, config: DiffusionPolicyConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        if c.obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {c.obs_horizon}")
        if not 1 <= c.action_steps <= c.pred_horizon:
            raise ValueError(f"action_steps must be in [1, pred_horizon={c.pred_horizon}], got {c.action_steps}")
        self.actor = make_chunk_denoiser(obs_dim, act_dim, c)
        multiple = self.actor.net.horizon_multiple
        if c.pred_horizon % multiple:
            raise ValueError(f"pred_horizon={c.pred_horizon} must be a multiple of {multiple} "
                             f"(2 ** (len(down_dims) - 1) for down_dims={tuple(c.down_dims)})")
        self.ema = PowerEMA(self.actor, power=c.ema_power, max_decay=c.ema_max_decay)
        self._optimizers["actor"] = torch.optim.AdamW(self.actor.parameters(), lr=c.lr, betas=tuple(c.adam_betas),
                                                      weight_decay=c.weight_decay)
        self.reset()

    @property
    def sequence_spec(self) -> dict:
        """The windows this agent learns from: ``OfflineData.sequences(**sequence_spec)``."""
        return {"obs_horizon": self.config.obs_horizon, "action_horizon": self.config.pred_horizon}

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """Learning rate for update ``step`` (0-based): linear warm-up, then constant or cosine to 0
        (diffusers' ``get_cosine_schedule_with_warmup``, which Diffusion Policy uses, with the warm-up
        one step ahead so the first update is not taken at lr 0, and 0 after ``lr_decay_steps``)."""
        c = self.config
        if c.lr_warmup_steps > 0 and step < c.lr_warmup_steps:
            return c.lr * (step + 1) / c.lr_warmup_steps
        if c.lr_decay_steps is None:
            return c.lr
        span = max(1, c.lr_decay_steps - c.lr_warmup_steps)
        progress = min(1.0, (step - c.lr_warmup_steps) / span)
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def bc_loss(self, obs: Tensor, action: Tensor, valid: Tensor | None = None, *, t: Tensor | None = None,
                noise: Tensor | None = None) -> Tensor:
        """Denoising loss on chunks ``action [B, Tp, A]`` given histories ``obs [B, To, D]``.

        The squared error is averaged over action dimensions, then over the steps where
        ``valid [B, Tp]`` is true (all steps when ``valid`` is None or ``mask_padding`` is off).
        """
        B = action.shape[0]
        if valid is None or not self.config.mask_padding:
            return diffusion_loss(self.actor, action, obs.reshape(B, -1), t=t, noise=noise).mean()
        return masked_diffusion_loss(self.actor, action, obs.reshape(B, -1), valid[..., None], t=t, noise=noise)

    def update(self, batch) -> dict[str, Tensor]:
        lr = self.lr_at(self.num_updates)
        for g in self._optimizers["actor"].param_groups:
            g["lr"] = lr
        valid = batch.get("valid", None) if hasattr(batch, "get") else None
        loss = self.bc_loss(batch["observation"], batch["action"], valid)
        self.step("actor", loss)
        self.ema.update(self.actor)
        return {"loss_bc": loss.detach(), "lr": torch.tensor(lr)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.ema.updates = int(self.ema.n_averaged)  # resume the EMA warm-up where it stopped
        self.reset()
        return out

    # ------------------------------------------------------------------ acting
    def sample_chunk(self, obs_history: Tensor, *, ema: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
        """Chunks ``[N, Tp, A]`` in ``[-1, 1]`` for histories ``obs_history [N, To, obs_dim]`` (one reverse chain)."""
        c = self.config
        model = self.ema.module if ema else self.actor
        device = next(model.parameters()).device
        cond = obs_history.reshape(obs_history.shape[0], -1).to(device=device, dtype=torch.float32)
        chunk = sample(model, (cond.shape[0], c.pred_horizon, self.act_dim), c.inference_steps, c.sampler,
                       cond=cond, clip_x0=c.clip_sample, generator=generator, device=device,
                       grid={"spacing": c.timestep_spacing})
        return chunk.clamp(-1.0, 1.0).to(obs_history.device)

    def reset(self) -> None:
        """Forget the observation histories and the planned actions (the next ``act`` replans)."""
        self._obs_history: Tensor | None = None
        self._action_queue: collections.deque = collections.deque()

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        obs = torch.as_tensor(obs)
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must have shape [N, {self.obs_dim}], got {tuple(obs.shape)}")
        obs = obs.to(torch.float32)
        hist = self._obs_history
        if hist is None or hist.shape[0] != obs.shape[0] or hist.device != obs.device:
            self.reset()  # new evaluation or a different number of envs: start fresh histories
            hist = obs[:, None].expand(-1, self.config.obs_horizon, -1).clone()
        else:
            hist = torch.cat([hist[:, 1:], obs[:, None]], dim=1)
        self._obs_history = hist
        if not self._action_queue:
            chunk = self.sample_chunk(hist)
            self._action_queue.extend(chunk[:, : self.config.action_steps].unbind(1))
        return self._action_queue.popleft()

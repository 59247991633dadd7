"""Consistency policies (Ding & Jin 2024, "Consistency Models as a Rich and Efficient Policy Class
for Reinforcement Learning", ICLR 2024): behaviour cloning and actor-critic.

``pi(a | s)`` is a state-conditioned consistency model ``f_theta(a_tau, tau, s)`` over actions in
``[-1, 1]`` (Ding & Jin sec. 4: the consistency function of Song et al. 2023 sec. 3, conditioned on
the state): one network call maps noise at ``tau = sigma_max`` to an action, and a second call
after re-noising refines it (multistep consistency sampling, Song et al. 2023 Alg. 1).

* :class:`ConsistencyBC` (``consistency_bc``): consistency training from scratch (Song et al.
  2023 Alg. 3, with iCT's curriculum and noise sampling, Song & Dhariwal 2023 eq. 6-7) on EDM's
  VE schedule with the paper's ``sigma_min = 0.002``, ``sigma_max = 80``, ``sigma_data = 0.5``,
  ``rho = 7`` and the boundary-respecting skip scalings of Song et al. 2023 (sec. 3, App. C;
  ``ConsistencyPrecond``). Ding & Jin's loss scaling ``lambda(tau_n, tau_{n+1}) = 100 /
  (tau_{n+1} - tau_n)`` (sec. 4.1; ``100 / delta_t`` in their code) is the ``1 / delta_sigma``
  of :func:`~diffpolicy.losses.consistency_training_loss` times ``loss_scale = 100``. Defaults
  are the EMA target with the pseudo-Huber metric and iCT's ``s0 = 10, s1 = 1280``; Ding & Jin's
  code default (l2, ``s0 = 2, s1 = 150``) is ``metric="l2", ct_s0=2, ct_s1=150``. On a two-mode
  toy the l2 metric left 2-3x more samples between the modes after the same training, and
  ``s0 = 2`` spends the first seventh of training on 3 noise levels, where the model can only
  learn a posterior mean (no modes).
* :class:`ConsistencyDistilledBC` (``consistency_bc_cd``): consistency distillation (Song et al.
  2023 Alg. 2) from a trained :class:`~diffpolicy.agents.diffusion_bc.DiffusionBC`.
* :class:`ConsistencyAC` (``consistency_ac``): Consistency-AC (Ding & Jin sec. 4.2): the
  consistency loss plus Diffusion-QL's normalised Q term (Wang et al. 2023 eq. 3),
  ``L(theta) = L_CT(theta) - eta E[Q(s, a_theta)] / E|Q|`` with ``a_theta`` drawn by the
  consistency sampler with gradients, and twin clipped double-Q critics.

All three act through the EMA copy of the consistency model (Diffusion-QL's EMA: decay 0.995,
every 5 updates after 1000), with ``sample_steps`` (1 or 2, default 2) consistency steps and
the x0 estimate clipped to ``[-1, 1]`` at every step (Ding & Jin clip the final action; the
per-step clip is Diffusion-QL's ``clip_denoised``, and a no-op on the last step's output range).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import torch
from torch import Tensor

from diffpolicy.checkpoint import load_checkpoint, load_state_checked, resolve_checkpoint
from diffpolicy import schedules as S
from diffpolicy.chain_losses import normalized_q_term
from diffpolicy.denoiser import ClipX0, ConsistencyPrecond, Denoiser, DenoiserBase
from diffpolicy.ema import EMA
from diffpolicy.losses import consistency_distillation_loss, consistency_training_loss, ct_num_scales
from diffpolicy.nets import MLPDenoiser
from diffpolicy.samplers import consistency_timesteps, prior, sample_consistency, tempered

from .base import EvalSubmodules, OfflineAgent
from .critics import TwinCriticMixin, TwinQ, soft_update
from .diffusion_bc import DiffusionBC, DiffusionBCConfig

__all__ = [
    "ConsistencyBC", "ConsistencyBCConfig", "ConsistencyDistilledBC", "ConsistencyDistilledBCConfig",
    "ConsistencyAC", "ConsistencyACConfig", "make_consistency_denoiser", "sample_consistency_actions",
    "normalized_q_loss", "load_diffusion_bc_teacher",
]

TARGETS = ("ema", "self")


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ConsistencyBCConfig(DiffusionBCConfig):
    """Network and acting-EMA settings are :class:`DiffusionBCConfig`'s (3x256 Mish MLP, 16-d time
    embedding, EMA 0.995 / every 5 / from step 1000); ``diffusion_steps``, ``prediction`` and
    ``sampler`` are unused by consistency training (the consistency function always predicts x0).

    ``target``: ``"ema"`` is the EMA target ``theta^-`` of Song et al. 2023 (Alg. 3, decay
    ``mu(k) = exp(s0 log mu0 / N(k))``, their App. C), ``"self"`` iCT's stop-gradient copy
    (Song & Dhariwal 2023 sec. 3.2). ``ct_total_steps`` is the length of iCT's curriculum
    ``N(k)`` (set it to the training length, ``TrainConfig.steps``).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    sample_steps: int = 2
    ct_total_steps: int = 100_000
    ct_s0: int = 10
    ct_s1: int = 1280
    metric: str = "pseudo_huber"
    target: str = "ema"
    target_mu0: float = 0.95
    loss_scale: float = 100.0


@dataclasses.dataclass
class ConsistencyDistilledBCConfig(ConsistencyBCConfig):
    """Distillation settings; the teacher's architecture and ``diffusion_steps`` are taken from the
    ``config.json`` beside ``teacher_path`` when there is one, else from these same fields.

    ``cd_num_scales``: the distillation grid (``None``: all of the teacher's ``diffusion_steps``
    training times); ``teacher_steps``: DDIM sub-steps of the teacher per grid interval;
    ``teacher_clip_x0``: clip the teacher's x0 estimate to ``[-1, 1]`` as its own sampler does.
    CD uses a constant target decay ``target_mu0`` (Song et al. 2023 App. C) and the l2 metric
    (Ding & Jin's default) unless ``metric`` is changed; ``loss_scale`` multiplies the loss.
    The student shares the teacher's schedule, so ``sigma_max``, ``rho`` and the ``ct_*``
    curriculum do not apply; ``sigma_min = 0`` puts the boundary ``f(x, t) = x`` at the
    teacher chain's end ``t = -1``, where ``sigma = 0``.
    """

    sigma_min: float = 0.0
    teacher_path: str | None = None
    cd_num_scales: int | None = None
    teacher_steps: int = 1
    teacher_clip_x0: bool = True
    metric: str = "l2"
    loss_scale: float = 1.0


@dataclasses.dataclass
class ConsistencyACConfig(ConsistencyBCConfig):
    """Consistency-AC: ``eta`` weighs the normalised Q term; critics are ``critic_depth`` x
    ``critic_hidden`` Mish MLPs with Polyak targets (``tau``); ``train_sample_steps`` is the
    number of consistency steps of the differentiable action ``a_theta`` (``None``: ``sample_steps``);
    ``num_candidates`` actions per state are scored at evaluation and one is drawn with
    probabilities ``softmax(Q / select_temperature)`` (``0``: argmax)."""

    eta: float = 1.0
    tau: float = 0.005
    critic_hidden: int = 256
    critic_depth: int = 3
    critic_lr: float | None = None
    train_sample_steps: int | None = None
    num_candidates: int = 50
    select_temperature: float = 1.0


# ----------------------------------------------------------------------------------------
# Small shared functions
# ----------------------------------------------------------------------------------------

def make_consistency_denoiser(obs_dim: int, act_dim: int, cfg: DiffusionBCConfig, schedule: S.Schedule,
                              sigma_data: float, sigma_min: float | None = None) -> Denoiser:
    """The state-conditioned consistency model ``f_theta(a, tau, s)`` of Ding & Jin (sec. 4).

    Diffusion-QL's MLP (``cfg``'s architecture) behind :class:`ConsistencyPrecond`:
    ``f = c_skip(tau) a + c_out(tau) F(c_in(tau) a, c_noise(tau), s)`` with the scalings of Song et
    al. 2023 (sec. 3 and App. C: EDM's, Karras et al. 2022 Table 1, shifted so that ``f(a, sigma_min) = a``).
    """
    net = MLPDenoiser(act_dim, obs_dim=obs_dim, hidden=cfg.hidden, depth=cfg.depth, time_dim=cfg.time_dim,
                      activation=cfg.activation, residual=cfg.residual, layer_norm=cfg.layer_norm)
    return Denoiser(net, schedule, precond=ConsistencyPrecond(sigma_data, sigma_min))


def sample_consistency_actions(model: DenoiserBase, obs: Tensor, act_dim: int, steps: int,
                               generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
    """``steps``-step consistency sampling (Song et al. 2023 Alg. 1) of one action per row of ``obs``.

    Gradients flow to ``model`` unless the caller disables them (Consistency-AC needs them);
    the x0 estimate is clipped to ``[-1, 1]`` at each step, so the result lies in ``[-1, 1]``.
    ``temperature`` scales the prior and the re-noising (:func:`diffpolicy.samplers.tempered`).
    """
    ts = consistency_timesteps(model.schedule, steps)
    x = prior(model, (obs.shape[0], act_dim), generator=generator, device=obs.device, dtype=obs.dtype)
    x, noise = tempered(x, len(ts) - 1, temperature, generator)
    a = sample_consistency(ClipX0(model, 1.0), x, ts, cond=obs, noise=noise, generator=generator)
    return a.clamp(-1.0, 1.0)


def normalized_q_loss(critic: TwinQ, obs: Tensor, action: Tensor) -> Tensor:
    """``-Q_i(s, a) / E|Q_j(s, a)|`` for a random head ``i`` (:func:`~diffpolicy.chain_losses.normalized_q_term`)."""
    q1, q2 = critic(obs, action)
    if bool(torch.randint(2, ()).item()):
        q1, q2 = q2, q1
    return normalized_q_term(q1, q2)


def load_diffusion_bc_teacher(path: str | os.PathLike, obs_dim: int, act_dim: int,
                              cfg: DiffusionBCConfig) -> DiffusionBC:
    """A :class:`DiffusionBC` restored from a ``train_offline`` run (its directory or checkpoint file).

    Its architecture comes from the run's ``config.json`` next to the checkpoint when that file
    names a ``diffusion_bc`` agent, else from the fields of ``cfg`` shared with ``DiffusionBCConfig``.
    """
    try:
        path = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher_path: {e} (expected a diffusion_bc run of train_offline)") from None
    names = {f.name for f in dataclasses.fields(DiffusionBCConfig)}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    run_cfg = path.with_name("config.json")
    if run_cfg.is_file():
        meta = json.loads(run_cfg.read_text())
        if meta.get("agent") == DiffusionBC.name:
            settings.update({k: v for k, v in meta.get("agent_config", {}).items() if k in names})
    teacher = DiffusionBC(obs_dim, act_dim, DiffusionBCConfig(**settings))
    saved = load_checkpoint(path)
    load_state_checked(teacher, saved["agent"] if "agent" in saved else saved, "diffusion_bc teacher", path)
    return teacher


# ----------------------------------------------------------------------------------------
# Agents
# ----------------------------------------------------------------------------------------

class ConsistencyBC(OfflineAgent):
    """Consistency-BC by consistency training (Ding & Jin sec. 4.1; Song et al. 2023 Alg. 3).

    Loss (Song et al. 2023 Alg. 3, with iCT's pair sampling, Song & Dhariwal 2023 eq. 7):
    ``lambda(s_i, s_{i+1}) d(f_theta(a + s_{i+1} z, s_{i+1}, s), f_{theta^-}(a + s_i z, s_i, s))``
    with ``lambda = loss_scale / (s_{i+1} - s_i)``, ``d`` pseudo-Huber (or l2) and ``N(k)`` Karras
    sigmas from iCT's curriculum (eq. 6).
    """

    name = "consistency_bc"
    config_class = ConsistencyBCConfig
    acting_fields = ("sample_steps", "temperature")
    loss_key = "loss_ct"

    def __init__(self, obs_dim: int, act_dim: int, config: ConsistencyBCConfig | None = None, *,
                 schedule: S.Schedule | None = None, **overrides):
        """``schedule``: the consistency model's noise schedule (default: EDM with the config's sigmas)."""
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        if c.target not in TARGETS:
            raise ValueError(f"unknown consistency target {c.target!r}; valid: {', '.join(TARGETS)}")
        if c.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {c.sample_steps}")
        if schedule is None:
            schedule = S.EDM(c.sigma_min, c.sigma_max, c.rho, c.sigma_data)
        self.actor = make_consistency_denoiser(obs_dim, act_dim, c, schedule, c.sigma_data, c.sigma_min)
        # theta^- of the consistency loss (Song et al. 2023 Alg. 3); separate from the acting EMA
        self.target = copy.deepcopy(self.actor).requires_grad_(False) if c.target == "ema" else None
        self.ema = EMA(self.actor, decay=c.ema_decay)
        self.add_optimizer("actor", self.actor.parameters())

    # ------------------------------------------------------------------ training
    def num_scales(self) -> int:
        """iCT's ``N(k)`` at the current update (Song & Dhariwal 2023 eq. 6)."""
        c = self.config
        return ct_num_scales(self.num_updates, c.ct_total_steps, c.ct_s0, c.ct_s1)

    def target_decay(self) -> float:
        """``mu(k) = exp(s0 log mu0 / N(k))`` (Song et al. 2023 App. C, CT's adaptive EMA)."""
        return math.exp(self.config.ct_s0 * math.log(self.config.target_mu0) / self.num_scales())

    def consistency_loss(self, obs: Tensor, action: Tensor) -> Tensor:
        c = self.config
        loss = consistency_training_loss(self.actor, action, obs, step=self.num_updates, total_steps=c.ct_total_steps,
                                         target=self.target, s0=c.ct_s0, s1=c.ct_s1, metric=c.metric)
        return c.loss_scale * loss.mean()

    def update_target(self) -> None:
        if self.target is not None:
            soft_update(self.target, self.actor, 1.0 - self.target_decay())

    update_ema = DiffusionBC.update_ema  # Diffusion-QL's acting EMA, shared with diffusion BC

    def after_actor_step(self) -> None:
        self.update_target()
        self.update_ema()

    def update(self, batch) -> dict[str, Tensor]:
        loss = self.consistency_loss(batch["observation"], batch["action"])
        self.step("actor", loss)
        self.after_actor_step()
        return {self.loss_key: loss.detach()}

    # ------------------------------------------------------------------ acting
    def sample_actions(self, obs: Tensor, *, ema: bool = True, steps: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """One action per row of ``obs`` by ``steps`` (default ``sample_steps``) consistency steps."""
        model = self.ema.module if ema else self.actor
        return sample_consistency_actions(model, obs, self.act_dim, steps or self.config.sample_steps, generator,
                                          self.config.temperature)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.sample_actions(obs)


class ConsistencyDistilledBC(EvalSubmodules, ConsistencyBC):
    """Consistency-BC by consistency distillation (Song et al. 2023 Alg. 2) of a diffusion BC.

    The teacher is a :class:`DiffusionBC`'s EMA denoiser (eps-prediction on Diffusion-QL's 5-step
    ``DiscreteVP(5, "vp")``), given as ``teacher=`` (the agent or its denoiser) or as
    ``teacher_path`` (a ``train_offline`` checkpoint). Loss:
    ``d(f_theta(x_{t_n}, t_n, s), f_{theta^-}(x_hat_{t_{n+1}}, t_{n+1}, s))`` where
    ``x_hat_{t_{n+1}}`` is the teacher's DDIM (probability-flow ODE) step from ``x_{t_n}``.

    Schedule choice: :func:`~diffpolicy.losses.consistency_distillation_loss` needs teacher and
    student on one schedule, so the student lives on the teacher's ``DiscreteVP`` and its grid
    (all ``N`` training times by default, ``4, 3, 2, 1, 0`` then the chain end ``-1``), with EDM-style
    consistency scalings on the scaled variables ``x / alpha``, ``sigma / alpha``
    (``ConsistencyPrecond(sigma_data=0.5, sigma_min=0)``, so ``f`` is the identity at the chain end
    ``t = -1`` where ``sigma = 0``; the loss handles that boundary pair itself). Acting uses 1 or 2
    consistency steps on that schedule (``t = 4``, or ``t = 4`` then ``t = 2``): a 1-2 step student
    of the 5-step teacher. The student is trained from scratch (its parameterisation differs from
    the teacher's eps network, so the teacher's weights are not a useful initialisation).
    """

    name = "consistency_bc_cd"
    config_class = ConsistencyDistilledBCConfig
    eval_submodules = ("teacher",)  # a teacher trained with dropout gives its targets without it
    loss_key = "loss_cd"

    def __init__(self, obs_dim: int, act_dim: int, config: ConsistencyDistilledBCConfig | None = None, *,
                 teacher: DiffusionBC | DenoiserBase | None = None, **overrides):
        cfg = config if config is not None else self.config_class()
        names = {f.name for f in dataclasses.fields(cfg)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in names})
        if teacher is None and cfg.teacher_path is None:
            raise ValueError(
                f"{type(self).__name__} distils a diffusion BC teacher and none was given: pass teacher=<a trained "
                f"DiffusionBC agent> or teacher_path=<the checkpoint.pt of a diffusion_bc run of train_offline>")
        if teacher is None:
            teacher = load_diffusion_bc_teacher(cfg.teacher_path, obs_dim, act_dim, cfg)
        if isinstance(teacher, DiffusionBC):
            if (teacher.obs_dim, teacher.act_dim) != (obs_dim, act_dim):
                raise ValueError(f"the teacher is for obs_dim={teacher.obs_dim}, act_dim={teacher.act_dim}; "
                                 f"the student for obs_dim={obs_dim}, act_dim={act_dim}")
            teacher = teacher.ema.module
        super().__init__(obs_dim, act_dim, config, schedule=teacher.schedule, **overrides)
        # a frozen private copy: moves with .to(device), makes checkpoints self-contained
        self.teacher = copy.deepcopy(teacher).requires_grad_(False).eval()  # eval for good: eval_submodules
        self.teacher.schedule.timesteps(self.grid_size())  # a clear error now for a grid the schedule lacks

    def grid_size(self) -> int:
        n = self.config.cd_num_scales
        return n if n is not None else int(getattr(self.teacher.schedule, "num_train_timesteps", 18))

    def target_decay(self) -> float:
        return self.config.target_mu0  # constant mu for CD (Song et al. 2023 App. C)

    def consistency_loss(self, obs: Tensor, action: Tensor) -> Tensor:
        c = self.config
        teacher = ClipX0(self.teacher, 1.0) if c.teacher_clip_x0 else self.teacher
        loss = consistency_distillation_loss(self.actor, teacher, action, obs, num_scales=self.grid_size(),
                                             target=self.target, teacher_steps=c.teacher_steps, metric=c.metric)
        return c.loss_scale * loss.mean()


class ConsistencyAC(TwinCriticMixin, ConsistencyBC):
    """Consistency-AC (Ding & Jin sec. 4.2): Consistency-BC's actor with a Q term and twin critics.

    Critic: clipped double Q-learning (Fujimoto et al. 2018 eq. 10) with the target action
    ``a' = f_{theta_ema}(.)(s')`` from the EMA consistency actor and Polyak targets (``tau``).
    Actor: ``L(theta) = L_CT(theta) - eta E_s[Q(s, a_theta)] / E|Q|`` with ``a_theta ~ pi_theta(s)``
    sampled by ``train_sample_steps`` consistency steps *with* gradients (the consistency analogue
    of Diffusion-QL eq. 3). Acting: ``num_candidates`` EMA-actor samples per state, one drawn by
    ``softmax(Q)`` (:func:`~diffpolicy.agents.critics.select_by_q`), as in Diffusion-QL's and Ding & Jin's code.
    """

    name = "consistency_ac"
    config_class = ConsistencyACConfig
    acting_fields = ("num_candidates", "select_temperature")  # its critic targets and Q term sample the actor

    def __init__(self, obs_dim: int, act_dim: int, config: ConsistencyACConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        self.init_twin_critic(c.critic_hidden, c.critic_depth, lr=c.critic_lr)

    def update(self, batch) -> dict[str, Tensor]:
        c = self.config
        obs = batch["observation"]
        with torch.no_grad():
            next_action = self.sample_actions(batch["next", "observation"])
        critic_loss = self.critic_update(batch, next_action)
        ct_loss = self.consistency_loss(obs, batch["action"])
        a_theta = self.sample_actions(obs, ema=False, steps=c.train_sample_steps)
        with self.critic_frozen() as critic:  # the Q term trains the actor only
            q_loss = normalized_q_loss(critic, obs, a_theta)
        self.step("actor", ct_loss + c.eta * q_loss, self.actor.parameters())
        self.after_actor_step()
        self.update_critic_target()
        return {"loss_ct": ct_loss.detach(), "loss_q": q_loss.detach(), "loss_critic": critic_loss.detach()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.act_by_q(obs, self.sample_actions, self.config.num_candidates, self.config.select_temperature)

"""Losses on denoising chains, as TorchRL ``LossModule``s returning TensorDicts of ``loss_*`` terms.

All read the chain layout of :mod:`diffpolicy.chain` (flattened to a batch of transitions
where they score steps): ``x, t, s, cond, ("next", "x"), log_prob, advantage``. Keys can be
renamed with ``loss.set_keys(...)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule

from .chain import REDUCTIONS, rescore, rollout
from .denoiser import DenoiserBase
from .losses import diffusion_loss

__all__ = ["ChainPPOLoss", "ChainScoreFunctionLoss", "RewardWeightedLoss", "QScoreMatchingLoss",
           "DiffusionQLActorLoss"]


class _ChainLoss(LossModule):
    @dataclass
    class _AcceptedKeys:
        """Keys of a chain transition; ``cond`` may be None for unconditional models."""

        x: NestedKey = "x"
        t: NestedKey = "t"
        s: NestedKey = "s"
        cond: NestedKey | None = "cond"
        x_prev: NestedKey = ("next", "x")
        log_prob: NestedKey = "log_prob"
        advantage: NestedKey = "advantage"

    default_keys = _AcceptedKeys

    def __init__(self, denoiser: DenoiserBase, *, eta: float = 1.0, min_logprob_std: float = 0.0,
                 reduction: str = "mean", advantage_clip: float | None = None, clip_x0: float | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        self.denoiser = denoiser
        self.eta, self.min_logprob_std, self.reduction = eta, min_logprob_std, reduction
        self.advantage_clip, self.clip_x0 = advantage_clip, clip_x0

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def _log_prob_and_advantage(self, td: TensorDictBase):
        k = self.tensor_keys
        view = TensorDict({"x": td.get(k.x), "t": td.get(k.t), "s": td.get(k.s),
                           ("next", "x"): td.get(k.x_prev)}, batch_size=td.batch_size)
        if k.cond is not None and td.get(k.cond, None) is not None:
            view["cond"] = td.get(k.cond)
        lp = rescore(self.denoiser, view, eta=self.eta, min_logprob_std=self.min_logprob_std,
                     clip_x0=self.clip_x0, reduction=self.reduction)
        adv = td.get(k.advantage).detach()
        if adv.shape != lp.shape:
            adv = adv.reshape(lp.shape)
        if self.advantage_clip is not None:
            adv = adv.clamp(-self.advantage_clip, self.advantage_clip)
        return lp, adv


class ChainPPOLoss(_ChainLoss):
    """PPO-clip over chain steps (Schulman et al. 2017 eq. 7; DDPO-IS, DPPO's actor).

    ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(log_prob_new - log_prob_old)``,
    averaged over the transitions. ``eps`` is ``clip_epsilon``, or per transition the
    ``clip_epsilon`` entry of the input when it has one (DPPO's clip that grows along the chain).
    Diagnostics: ``clip_fraction``, ``approx_kl`` (``E[(r - 1) - log r]``, Schulman's k3
    estimator), ``ratio``.
    """

    def __init__(self, denoiser: DenoiserBase, *, clip_epsilon: float = 0.2, **kwargs):
        super().__init__(denoiser, **kwargs)
        self.clip_epsilon = clip_epsilon

    def forward(self, td: TensorDictBase) -> TensorDict:
        lp, adv = self._log_prob_and_advantage(td)
        log_ratio = lp - td.get(self.tensor_keys.log_prob).detach()
        ratio = log_ratio.exp()
        eps = td.get("clip_epsilon", None)
        eps = self.clip_epsilon if eps is None else eps.reshape(ratio.shape)
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        with torch.no_grad():
            clip_fraction = ((ratio - 1).abs() > eps).float().mean()
            approx_kl = ((ratio - 1) - log_ratio).mean()
        return TensorDict({"loss_objective": -objective.mean(), "clip_fraction": clip_fraction,
                           "approx_kl": approx_kl, "ratio": ratio.detach().mean()}, batch_size=[])


class ChainScoreFunctionLoss(_ChainLoss):
    """Score-function / REINFORCE over chain steps (Williams 1992; DDPO-SF, Black et al. 2024 eq. 3).

    ``-A log p(x_s | x_t)``; its gradient equals PPO's at ratio 1 without clipping.
    """

    def forward(self, td: TensorDictBase) -> TensorDict:
        lp, adv = self._log_prob_and_advantage(td)
        return TensorDict({"loss_objective": -(adv * lp).mean()}, batch_size=[])


class RewardWeightedLoss(LossModule):
    """Reward- or advantage-weighted diffusion regression (DRWR / DAWR; Peters & Schaal 2007).

    ``w * diffusion_loss(x0)`` on the policy's own samples ``x0`` (``tensor_keys.sample``) with
    weights ``tensor_keys.weight`` (from :func:`~diffpolicy.advantage.reward_weights`),
    normalised by their mean when ``normalize``. Writes ``loss_diffusion``.
    """

    @dataclass
    class _AcceptedKeys:
        """Keys: ``sample`` (x0), ``cond`` (or None) and ``weight``."""

        sample: NestedKey = "action"
        cond: NestedKey | None = "observation"
        weight: NestedKey = "weight"

    default_keys = _AcceptedKeys

    def __init__(self, denoiser: DenoiserBase, *, normalize: bool = False):
        super().__init__()
        self.denoiser, self.normalize = denoiser, normalize

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, td: TensorDictBase) -> TensorDict:
        k = self.tensor_keys
        cond = td.get(k.cond) if k.cond is not None else None
        w = td.get(k.weight).detach().reshape(-1)
        if self.normalize:
            w = w / w.mean().clamp_min(1e-12)
        loss = diffusion_loss(self.denoiser, td.get(k.sample), cond)
        return TensorDict({"loss_diffusion": (w * loss).mean()}, batch_size=[])


class QScoreMatchingLoss(LossModule):
    """Q-score matching (Psenka et al. 2024 eq. 8): align the policy's score with ``grad_a Q``.

    For actions ``a`` (``tensor_keys.sample``) noised to ``a_t = alpha a + sigma eps``:
    ``|| sigma * score_theta(a_t, t | s) - q_coeff * grad_a Q(s, a_t) ||^2``, where
    ``sigma * score = -eps_hat`` is read through the parameterisation. The ``sigma``-scaled score
    is DPPO's well-conditioned form of the objective (Ren et al. 2024, App. C.3: ``-eps`` vs
    ``q_grad_coeff * grad Q``). ``critic(cond, action) -> Q [B]`` or ``[B, 1]``.
    """

    @dataclass
    class _AcceptedKeys:
        """Keys: ``sample`` (the actions) and ``cond`` (the state)."""

        sample: NestedKey = "action"
        cond: NestedKey = "observation"

    default_keys = _AcceptedKeys

    def __init__(self, denoiser: DenoiserBase, critic: Callable, *, q_coeff: float = 1.0):
        super().__init__()
        self.denoiser, self.critic, self.q_coeff = denoiser, critic, q_coeff

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, td: TensorDictBase) -> TensorDict:
        a, cond = td.get(self.tensor_keys.sample), td.get(self.tensor_keys.cond)
        sched = self.denoiser.schedule
        t = sched.sample_t(a.shape[0], device=a.device).to(torch.promote_types(a.dtype, torch.float32))
        alpha, sigma = sched.alpha_sigma(t)
        shape = (-1,) + (1,) * (a.dim() - 1)
        a_t = alpha.view(shape) * a + sigma.view(shape) * torch.randn_like(a)
        with torch.enable_grad():
            a_req = a_t.detach().requires_grad_(True)
            grad_q, = torch.autograd.grad(self.critic(cond, a_req).sum(), a_req)
        _, eps = self.denoiser.x0_eps(a_t, t, cond)
        loss = ((-eps - self.q_coeff * grad_q.detach()) ** 2).flatten(1).sum(1).mean()
        return TensorDict({"loss_qsm": loss}, batch_size=[])


def normalized_q_term(q: Tensor, q_norm: Tensor | None = None) -> Tensor:
    """``-E[Q] / E|Q'|`` with ``Q'`` detached (Diffusion-QL eq. 3's normalisation, ``eta / E|Q|``).

    The paper's code (and Ding & Jin's) uses one random head of twin critics for ``Q`` and the
    other for ``Q'``; ``q_norm=None`` normalises by ``Q`` itself. Makes ``eta`` independent of
    the reward scale.
    """
    q_norm = q if q_norm is None else q_norm
    return -q.mean() / q_norm.detach().abs().mean().clamp_min(1e-8)


class DiffusionQLActorLoss(LossModule):
    """Diffusion-QL's actor objective (Wang et al. 2023 eq. 3): ``L_bc - eta Q(s, a_theta) / E|Q|``.

    ``a_theta`` is drawn by the reverse chain (``steps`` DDPM steps, x0 clipped to ``clip_x0``
    as the acting sampler does) *with* gradients, so the Q term backpropagates through every
    denoising step. ``critic(obs, action)`` returns ``Q [B]`` (normalised by its own mean
    ``|Q|``) or a pair ``(Q_i, Q_j)`` of twin-critic heads (``-E[Q_i] / E|Q_j|``, the paper's
    code); see :func:`normalized_q_term`. Writes ``loss_bc``, ``loss_q`` and ``loss_actor``.
    """

    @dataclass
    class _AcceptedKeys:
        """Keys: ``sample`` (dataset actions) and ``cond`` (observations)."""

        sample: NestedKey = "action"
        cond: NestedKey = "observation"

    default_keys = _AcceptedKeys

    def __init__(self, denoiser: DenoiserBase, critic: Callable, *, eta: float = 1.0, steps: int = 5,
                 action_clip: float | None = 1.0, clip_x0: float | None = None, grid: dict | None = None):
        super().__init__()
        self.denoiser, self.critic, self.eta, self.action_clip = denoiser, critic, eta, action_clip
        self.clip_x0 = clip_x0
        self.ts = denoiser.schedule.timesteps(steps, **(grid or {}))

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, td: TensorDictBase) -> TensorDict:
        a, obs = td.get(self.tensor_keys.sample), td.get(self.tensor_keys.cond)
        bc = diffusion_loss(self.denoiser, a, obs).mean()
        x = self.denoiser.schedule.prior_std() * torch.randn_like(a)
        chain = rollout(self.denoiser, x, self.ts, obs, grad=True, reduction=None, clip_x0=self.clip_x0)
        a_new = chain["next", "x"][:, -1]
        if self.action_clip is not None:
            a_new = a_new.clamp(-self.action_clip, self.action_clip)
        q = self.critic(obs, a_new)
        q_loss = normalized_q_term(*(v.reshape(-1) for v in q)) if isinstance(q, tuple) else normalized_q_term(q.reshape(-1))
        return TensorDict({"loss_bc": bc, "loss_q": q_loss, "loss_actor": bc + self.eta * q_loss}, batch_size=[])

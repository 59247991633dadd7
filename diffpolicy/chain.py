"""The denoising chain as an MDP: one stochastic step, rollouts into TensorDicts, re-scoring.

State ``(x_t, t, cond)``, action ``x_s ~ N(mean, std^2)`` for the next time ``s`` of a grid,
reward 0 until the last step (DDPO, Black et al. 2024 §4.2; DPPO, Ren et al. 2024 §4).
A rollout of ``B`` chains of ``K`` steps is a TensorDict ``[B, K]`` with the keys of
``DESIGN.md``: ``x, t, s, cond, mean, std, log_prob`` and ``("next", "x" | "reward" | "done")``.

Log-probabilities are of the Gaussian step ``N(x_s | mean, std_lp^2)`` reduced over the event
dimensions by ``reduction``: ``"mean"`` (DDPO's choice: the PPO ratio does not scale with
the dimension) or ``"sum"`` (the exact joint density of the event). ``std_lp`` is ``std``
floored by ``min_logprob_std``; sampling uses ``std`` floored by ``min_std`` (DPPO explores
with 0.1 for both). A step with ``std_lp = 0`` (DDIM with eta = 0, or a step into
``sigma = 0``) has no density, and asking for its log-prob raises a ValueError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import Tensor

from .denoiser import DenoiserBase, expand_like
from .samplers import ddim_coefficients, ddim_std, prepare_grid

__all__ = ["StepOutput", "step_distribution", "denoise_step", "gaussian_log_prob", "rollout", "rescore",
           "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """One denoising transition: ``x_prev [B, ...]``, ``mean``, ``std`` (same shape), ``log_prob [B]``."""

    x_prev: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def step_distribution(denoiser: DenoiserBase, x: Tensor, t: Tensor, s: Tensor, cond=None, *, eta: float = 1.0,
                      clip_x0: float | None = None) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM(eta) step ``x_t -> x_s`` (Song et al. 2021 eq. 12), per sample.

    ``t, s [B]`` may differ across the batch (a whole chain scored in one call). ``eta = 1`` is
    the DDPM posterior ``q(x_s | x_t, x0_hat)``. ``clip_x0`` clamps the x0 prediction and
    recomputes eps from it.
    """
    if t.shape != x.shape[:1] or s.shape != x.shape[:1]:
        raise ValueError(f"t and s must have shape [{x.shape[0]}] (the batch of x); got {tuple(t.shape)}, {tuple(s.shape)}")
    sched = denoiser.schedule
    at, st = (expand_like(v, x) for v in sched.alpha_sigma(t))
    as_, ss = (expand_like(v, x) for v in sched.alpha_sigma(s))
    x0, eps = denoiser.x0_eps(x, t, cond)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - at * x0) / st
    std = ddim_std(at, st, as_, ss, eta).expand_as(x)
    return as_ * x0 + (ss**2 - std**2).clamp_min(0).sqrt() * eps, std


def gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """``log N(value | mean, std^2)`` reduced over all but the first dimension (``mean`` or ``sum``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if bool((std <= 0).any()):
        raise ValueError("a step with std 0 (DDIM eta=0, or the step into sigma=0) has no log-prob: "
                         "use eta > 0, a grid that ends above sigma=0 (final_alpha_one=False), or min_logprob_std > 0")
    lp = -((value - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    lp = lp.flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def denoise_step(denoiser: DenoiserBase, x: Tensor, t: Tensor, s: Tensor, cond=None, *, eta: float = 1.0,
                 x_prev: Tensor | None = None, min_std: float = 0.0, min_logprob_std: float = 0.0,
                 noise_clip: float | None = None, clip_x0: float | None = None, reduction: str | None = "mean",
                 noise: Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """One stochastic denoising step; samples ``x_prev`` or scores the given one.

    ``min_std`` floors the sampling std, ``min_logprob_std`` the std of the log-prob (DPPO:
    0.1 each). ``noise_clip`` clips the standard-normal draw (DPPO's ``randn_clip_value``).
    ``reduction=None`` skips the log-prob.
    """
    mean, std = step_distribution(denoiser, x, t, s, cond, eta=eta, clip_x0=clip_x0)
    if x_prev is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if noise_clip is not None:
            noise = noise.clamp(-noise_clip, noise_clip)
        x_prev = mean + std.clamp_min(min_std) * noise
    log_prob = None
    if reduction is not None:
        log_prob = gaussian_log_prob(x_prev.detach(), mean, std.clamp_min(min_logprob_std), reduction)
    return StepOutput(x_prev, mean, std, log_prob)


def _expand_cond(cond, B: int, K: int):
    if cond is None:
        return None
    if cond.shape[0] != B:
        raise ValueError(f"cond has batch size {cond.shape[0]} but the chain has {B}")
    return cond.unsqueeze(1).expand(B, K, *cond.shape[1:])


def rollout(denoiser: DenoiserBase, x: Tensor, ts, cond=None, *, eta: float = 1.0, min_std: float = 0.0,
            min_logprob_std: float = 0.0, noise_clip: float | None = None, clip_x0: float | None = None,
            reduction: str | None = "mean", train_steps: int | None = None, frozen: DenoiserBase | None = None,
            grad: bool = False, generator: torch.Generator | None = None) -> TensorDict:
    """Run ``B`` chains over the grid ``ts`` (``K + 1`` times) into a TensorDict ``[B, K]``.

    Only the last ``train_steps`` steps (default: all) are run by ``denoiser``; earlier ones by
    ``frozen`` (default: ``denoiser``) without a graph, so memory grows with ``train_steps``
    only (DPPO's fine-tuned last K' steps). With ``grad=True`` the graph of the trained steps
    is kept and ``("next", "x")`` and ``mean`` are differentiable (Diffusion-QL, DRaFT);
    otherwise the rollout is data only. ``log_prob`` is always stored as data (the "old"
    log-probs); :func:`rescore` gives differentiable ones. Rewards are zero; put the terminal
    reward with :func:`set_reward`. Without ``clip_x0`` each step is fused into a few tensor ops
    on the grid's precomputed scalars; the result equals :func:`denoise_step`'s.
    """
    ts = torch.as_tensor(ts, dtype=torch.float64)
    K, B = len(ts) - 1, x.shape[0]
    tdtype = torch.promote_types(x.dtype, torch.float32)
    train_steps = K if train_steps is None else train_steps
    if not 0 <= train_steps <= K:
        raise ValueError(f"train_steps must be in [0, {K}], got {train_steps}")
    cond_k = _expand_cond(cond, B, K)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)} (or None: no log-probs)")
    g = prepare_grid(denoiser, x, ts, cond)
    xs, means, stds, lps = [], [], [], []
    for k in range(K):
        trained = k >= K - train_steps
        model = denoiser if trained or frozen is None else frozen
        with torch.set_grad_enabled(grad and trained):
            mean, std, x_next, lp = _fused_step(model, x, g, k, cond, eta, min_std, min_logprob_std, noise_clip,
                                                clip_x0, reduction, generator)
        xs.append(x)
        means.append(mean), stds.append(std), lps.append(None if lp is None else lp.detach())
        x = x_next
    stack = lambda v: torch.stack(v, 1)
    x_all = stack(xs + [x])
    done = torch.zeros(B, K, 1, dtype=torch.bool, device=x.device)
    done[:, -1] = True
    td = TensorDict({
        "x": x_all[:, :-1], "t": ts[:-1].to(x.device, tdtype).expand(B, K), "s": ts[1:].to(x.device, tdtype).expand(B, K),
        "mean": stack(means), "std": stack(stds),
        "next": {"x": x_all[:, 1:], "reward": torch.zeros(B, K, 1, dtype=x.dtype, device=x.device),
                 "done": done, "terminated": done.clone()},
    }, batch_size=[B, K])
    if cond_k is not None:
        td["cond"] = cond_k
    if reduction is not None:
        td["log_prob"] = stack(lps)
    return td


def _fused_step(model, x, g, k, cond, eta, min_std, min_logprob_std, noise_clip, clip_x0, reduction, generator):
    """The step of :func:`denoise_step` with the grid's scalar coefficients: a few tensor ops.

    Unclipped, the mean is linear in ``(x, pred)``; with ``clip_x0`` it is
    ``(alpha_s - k alpha_t / sigma_t) clamp(x0) + (k / sigma_t) x`` (eps recomputed from the
    clipped x0, ``k = sqrt(sigma_s^2 - std^2)``). ``x_s - mean = std_s z``, so
    ``log N(x_s | mean, std_lp^2) = -(std_s/std_lp)^2 z^2/2 - log std_lp - log sqrt(2 pi)``.
    """
    at, st, as_, ss = g.alpha[k], g.sigma[k], g.alpha[k + 1], g.sigma[k + 1]
    std = ddim_std(at, st, as_, ss, eta)
    pred = model(x, g.t[k], cond)
    if clip_x0 is None:
        A, B = ddim_coefficients(*g.coef[k], as_, ss, std)
        mean = pred.mul(B).add_(x, alpha=A)
    else:
        a, b = g.coef[k][:2]
        kk = math.sqrt(max(ss**2 - std**2, 0.0))
        x0 = pred.mul(b).add_(x, alpha=a).clamp(-clip_x0, clip_x0)
        mean = x0.mul(as_ - kk * at / st).add_(x, alpha=kk / st)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise_clip is not None:
        z = z.clamp(-noise_clip, noise_clip)
    std_s, std_lp = max(std, min_std), max(std, min_logprob_std)
    x_next = mean + std_s * z
    lp = None
    if reduction is not None:
        if std_lp <= 0:
            gaussian_log_prob(x_next, mean, torch.zeros(()), reduction)  # raises the documented error
        sq = z.square().flatten(1)
        sq = sq.mean(1) if reduction == "mean" else sq.sum(1)
        n = 1 if reduction == "mean" else z[0].numel()
        lp = sq.mul_(-0.5 * (std_s / std_lp) ** 2).sub_(n * (math.log(std_lp) + _LOG_SQRT_2PI))
    return mean, torch.full_like(x, std), x_next, lp


def set_reward(td: TensorDict, reward: Tensor) -> TensorDict:
    """Put the terminal reward ``R(x_0, cond) [B]`` on the last step of each chain ``[B, K]``."""
    if reward.shape != td.batch_size[:1]:
        raise ValueError(f"reward must have shape [{td.batch_size[0]}], got {tuple(reward.shape)}")
    r = torch.zeros_like(td["next", "reward"])
    r[:, -1, 0] = reward
    td["next", "reward"] = r
    return td


def rescore(denoiser: DenoiserBase, td: TensorDict, *, eta: float = 1.0, min_logprob_std: float = 0.0,
            clip_x0: float | None = None, reduction: str = "mean") -> Tensor:
    """Log-probs ``[...]`` of the stored transitions under ``denoiser``, in one batched call.

    ``td`` is any-shaped slice of a rollout (e.g. ``[B, K']`` for the fine-tuned steps); all its
    steps are scored at once, batched over samples and timesteps. For PPO ratios.
    """
    flat = td.reshape(-1)
    mean, std = step_distribution(denoiser, flat["x"], flat["t"], flat["s"], flat.get("cond", None),
                                  eta=eta, clip_x0=clip_x0)
    lp = gaussian_log_prob(flat["next", "x"], mean, std.clamp_min(min_logprob_std), reduction)
    return lp.reshape(td.batch_size)


__all__ += ["set_reward"]

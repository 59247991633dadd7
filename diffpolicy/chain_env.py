"""The denoising chain as a TorchRL environment, and a TorchRL actor for it.

State ``(x, t, s, step, cond)``, action ``x_s``; reward ``R(x_0, cond)`` on the last step and
0 before; ``done`` after ``K`` steps. Any TorchRL machinery that takes an ``EnvBase`` and a
probabilistic actor (``env.rollout``, collectors, GAE, ``ClipPPOLoss``) runs on it unchanged.
The fused :func:`diffpolicy.chain.rollout` is the fast path to the same data: with the same
seed (global RNG), ``reduction="sum"`` and ``min_std == min_logprob_std`` they agree.
"""
from __future__ import annotations

from typing import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.data import Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType
from torchrl.modules import ProbabilisticActor
from torchrl.modules.distributions import IndependentNormal

from .chain import step_distribution
from .denoiser import DenoiserBase
from .schedules import Schedule

__all__ = ["DenoisingChainEnv", "chain_actor"]


class DenoisingChainEnv(EnvBase):
    """``B`` chains over the grid ``ts`` (``K + 1`` schedule times) as one batched TorchRL env.

    ``event_shape`` is the shape of one sample; ``reward_fn(x0, cond) -> [B]`` gives the terminal
    reward; ``cond_fn(B) -> [B, ...]`` draws contexts at reset (or pass ``cond`` in the reset
    TensorDict). Initial noise is ``schedule.prior_std() N(0, I)`` from the global torch RNG,
    as in :func:`diffpolicy.samplers.prior`.
    """

    def __init__(self, schedule: Schedule, ts, event_shape, batch_size: int, *,
                 reward_fn: Callable | None = None, cond_fn: Callable | None = None, cond_shape=(),
                 device=None):
        super().__init__(batch_size=torch.Size([batch_size]), device=device)
        self.ts = torch.as_tensor(ts, dtype=torch.float64)
        if self.ts.dim() != 1 or len(self.ts) < 2:
            raise ValueError("ts must be a 1-D grid of at least two times (schedule.timesteps(K))")
        self.schedule, self.event_shape = schedule, tuple(event_shape)
        self.K = len(self.ts) - 1
        self.reward_fn, self.cond_fn, self.cond_shape = reward_fn, cond_fn, tuple(cond_shape)
        self._t = self.ts.float()
        B = (batch_size,)
        obs = dict(x=Unbounded(B + self.event_shape), t=Unbounded(B), s=Unbounded(B),
                   step=Unbounded(B, dtype=torch.int64))
        if cond_fn is not None or self.cond_shape:
            obs["cond"] = Unbounded(B + self.cond_shape)
        self.observation_spec = Composite(**obs, shape=B)
        self.action_spec = Unbounded(B + self.event_shape)
        self.reward_spec = Unbounded(B + (1,))

    def _state(self, x, step, cond) -> TensorDict:
        t = self._t.to(x.device)
        td = TensorDict({"x": x, "t": t[step], "s": t[step + 1], "step": step}, self.batch_size)
        if cond is not None:
            td["cond"] = cond
        return td

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B = self.batch_size[0]
        x = self.schedule.prior_std() * torch.randn((B,) + self.event_shape, device=self.device)
        cond = tensordict.get("cond", None) if tensordict is not None else None
        if cond is None and self.cond_fn is not None:
            cond = self.cond_fn(B)
        return self._state(x, torch.zeros(B, dtype=torch.int64, device=x.device), cond)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        x, step, cond = tensordict["action"], tensordict["step"] + 1, tensordict.get("cond", None)
        if bool((step > self.K).any()):
            raise RuntimeError("the chain is over: reset the environment")
        last = step == self.K
        out = self._state(x, step.clamp(max=self.K - 1), cond)
        out["step"] = step
        out["t"] = self._t.to(x.device)[step]
        reward = torch.zeros(self.batch_size + (1,), device=x.device, dtype=x.dtype)
        if self.reward_fn is not None and bool(last.any()):
            reward = torch.where(last.unsqueeze(-1), self.reward_fn(x, cond).reshape(-1, 1).to(x.dtype), reward)
        out.update({"reward": reward, "done": last.unsqueeze(-1), "terminated": last.unsqueeze(-1).clone()})
        return out

    def _set_seed(self, seed: int | None):
        if seed is not None:
            torch.manual_seed(seed)


class _StepDistribution(torch.nn.Module):
    def __init__(self, denoiser, eta, min_std):
        super().__init__()
        self.denoiser, self.eta, self.min_std = denoiser, eta, min_std

    def forward(self, x, t, s, cond=None):
        mean, std = step_distribution(self.denoiser, x, t, s, cond, eta=self.eta)
        scale = std.clamp_min(self.min_std)
        if bool((scale <= 0).any()):
            raise ValueError("a step with std 0 (DDIM eta=0, or the step into sigma=0) has no distribution "
                             "to sample or score: use eta > 0, a grid that ends above sigma=0, or min_std > 0")
        return mean, std, scale


def chain_actor(denoiser: DenoiserBase, *, eta: float = 1.0, min_std: float = 0.0, conditional: bool = False,
                event_dims: int = 1):
    """A TorchRL ``ProbabilisticActor`` taking the step ``N(mean, max(std, min_std)^2)``.

    Writes ``mean``, ``std`` (unfloored), ``scale`` (floored), ``action`` and ``action_log_prob``.
    The log-prob is **summed** over the last ``event_dims`` dimensions (``len(event_shape)``;
    TorchRL's ``IndependentNormal``), i.e. ``reduction="sum"`` of the fused path. Samples by
    default (``ExplorationType.RANDOM``); deterministic evaluation takes the mean. A step whose
    floored std is 0 raises a ``ValueError`` rather than producing NaNs.
    """
    in_keys = ["x", "t", "s"] + (["cond"] if conditional else [])
    module = TensorDictModule(_StepDistribution(denoiser, eta, min_std), in_keys=in_keys,
                              out_keys=["mean", "std", "scale"])
    return ProbabilisticActor(module, in_keys={"loc": "mean", "scale": "scale"}, distribution_class=IndependentNormal,
                              distribution_kwargs={"event_dim": event_dims}, return_log_prob=True,
                              default_interaction_type=ExplorationType.RANDOM)

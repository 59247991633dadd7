"""ReFL (Xu et al., NeurIPS 2023, ImageReward §4): reward feedback on the one-step prediction.

Each iteration runs the chain without a graph down to a random late step ``t_j`` (one of the
last ``late_steps`` of the grid), then predicts ``x0`` from ``x_{t_j}`` in one differentiable
model call and maximises the reward of that prediction: ``-E[r(x0_hat(x_{t_j}, t_j), c)]``
(their Alg. 1, with ``T = sampling_steps`` and ``t ~ U[T - late_steps, T - 1]``).
"""
from __future__ import annotations

import dataclasses

import torch

from diffpolicy.chain import rollout

from .image_tuning import ImageRewardTuner, ImageTuneConfig

__all__ = ["ReFL", "ReFLConfig"]


@dataclasses.dataclass
class ReFLConfig(ImageTuneConfig):
    eta: float = 0.0
    late_steps: int = 5              # stop at one of the last late_steps grid times (ImageReward: 10 of 40)


class ReFL(ImageRewardTuner):
    name = "refl"
    config_class = ReFLConfig
    needs_reward_gradient = True

    def __init__(self, model, reward, size, config=None, **overrides):
        super().__init__(model, reward, size, config, **overrides)
        if not 1 <= self.config.late_steps <= self.config.sampling_steps:
            raise ValueError(f"late_steps must be in [1, sampling_steps={self.config.sampling_steps}]")

    def loss(self, step, generator):
        cfg = self.config
        K = cfg.sampling_steps
        j = int(torch.randint(K - cfg.late_steps, K, (1,), generator=generator))  # evaluation index of t_j
        context = self.contexts(cfg.batch_size, generator)
        x = self.noise(cfg.batch_size, generator)
        if j > 0:
            x = rollout(self.model, x, self.ts[: j + 1], context, eta=cfg.eta, reduction=None,
                        generator=generator)["next", "x"][:, -1]
        t = torch.full((x.shape[0],), float(self.ts[j]), device=x.device)
        x0 = self.model.x0_eps(x, t, context)[0]
        self.last_samples = (x0, context)
        return -self.reward(x0.clamp(-1, 1), context).mean()  # the images as evaluated

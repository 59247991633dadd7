"""DRaFT-K (Clark et al., ICLR 2024): backpropagate a differentiable reward through the last K
steps of the sampling chain.

Each iteration samples ``x_T`` and runs the deterministic DDIM chain (``eta = 0``); the first
``K_total - K`` steps run without a graph and the last ``K`` keep it
(:func:`~diffpolicy.chain.rollout` with ``train_steps=K, grad=True``), so memory grows with K
only. The loss is ``-E[r(x_0, c)]`` (their Alg. 1); ``K = 1`` is DRaFT-1. With
``random_truncation`` K is drawn uniformly from ``1..K`` each iteration (their DRaFT-LV-free
"randomised truncation" variant, §4.2).
"""
from __future__ import annotations

import dataclasses

import torch

from diffpolicy.chain import rollout

from .image_tuning import ImageRewardTuner, ImageTuneConfig

__all__ = ["DRaFT", "DRaFTConfig"]


@dataclasses.dataclass
class DRaFTConfig(ImageTuneConfig):
    eta: float = 0.0
    grad_steps: int = 1               # K: the last steps the reward gradient flows through
    random_truncation: bool = False   # draw K from 1..grad_steps each iteration


class DRaFT(ImageRewardTuner):
    name = "draft"
    config_class = DRaFTConfig
    needs_reward_gradient = True

    def __init__(self, model, reward, size, config=None, **overrides):
        super().__init__(model, reward, size, config, **overrides)
        if not 1 <= self.config.grad_steps <= self.config.sampling_steps:
            raise ValueError(f"grad_steps must be in [1, sampling_steps={self.config.sampling_steps}], "
                             f"got {self.config.grad_steps}")

    def loss(self, step, generator):
        cfg = self.config
        k = cfg.grad_steps
        if cfg.random_truncation:
            k = int(torch.randint(1, cfg.grad_steps + 1, (1,), generator=generator))
        context = self.contexts(cfg.batch_size, generator)
        td = rollout(self.model, self.noise(cfg.batch_size, generator), self.ts, context, eta=cfg.eta,
                     reduction=None, train_steps=k, grad=True, generator=generator)
        x0 = td["next", "x"][:, -1]
        self.last_samples = (x0, context)
        return -self.reward(x0.clamp(-1, 1), context).mean()  # the images as evaluated

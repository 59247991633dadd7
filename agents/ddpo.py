"""DDPO (Black et al., ICLR 2024): policy gradients over the denoising chain of an image model.

Every ``inner_epochs`` iterations a batch of chains is sampled with DDPM steps (``eta = 1``) and
the final images are scored; rewards become advantages by per-context standardisation (their
App. A "per-prompt stat tracking", :class:`~diffpolicy.advantage.PerContextStandardizer`),
clipped to ``+-advantage_clip``, and every step of a chain gets its chain's advantage
(the reward arrives only at the end, §4.2). Each iteration then takes one gradient step on a
random ``train_fraction`` of the steps (timestep subsampling):

- ``importance_sampling=False``: DDPO-SF, ``-A log p(x_s | x_t)`` (their eq. 3);
- ``importance_sampling=True``: DDPO-IS, PPO-clip on ``p_theta / p_old`` with ``clip_epsilon``
  (eq. 4 with the trust region of PPO), reusing the batch for ``inner_epochs`` iterations.

Log-probs are the per-element mean of the step's Gaussian log-density (``reduction="mean"``:
the ratio does not grow with the image size), as in their code. A last step into ``sigma = 0``
(a grid ending at ``alpha = 1``) is deterministic, ``x0 = x0_hat``, and has no density: it is run
outside the trained chain, whose ``K - 1`` steps are then all stochastic.
"""
from __future__ import annotations

import dataclasses

import torch

from diffpolicy.advantage import PerContextStandardizer
from diffpolicy.chain import rollout
from diffpolicy.chain_losses import ChainPPOLoss, ChainScoreFunctionLoss

from .image_tuning import ImageRewardTuner, ImageTuneConfig

__all__ = ["DDPO", "DDPOConfig"]


@dataclasses.dataclass
class DDPOConfig(ImageTuneConfig):
    eta: float = 1.0
    importance_sampling: bool = True     # DDPO-IS (PPO clip) or DDPO-SF
    clip_epsilon: float = 1e-4           # their value for Stable Diffusion
    advantage_clip: float = 5.0
    inner_epochs: int = 1                # iterations per sampled batch (IS only)
    train_fraction: float = 1.0          # fraction of the chain's steps trained per iteration


class DDPO(ImageRewardTuner):
    name = "ddpo"
    config_class = DDPOConfig

    def __init__(self, model, reward, size, config=None, **overrides):
        super().__init__(model, reward, size, config, **overrides)
        c = self.config
        if not c.importance_sampling and c.inner_epochs != 1:
            raise ValueError("DDPO-SF is on-policy: inner_epochs must be 1 (use importance_sampling=True)")
        if not 0 < c.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {c.train_fraction}")
        kw = dict(eta=c.eta, advantage_clip=c.advantage_clip, reduction="mean")
        self.policy_loss = (ChainPPOLoss(self.model, clip_epsilon=c.clip_epsilon, **kw) if c.importance_sampling
                          else ChainScoreFunctionLoss(self.model, **kw))
        self.standardize = PerContextStandardizer(buffer_size=c.batch_size, min_count=max(2, c.batch_size // 4))
        self.batch = None

    def samples(self, iterations: int) -> int:
        return -(-iterations // self.config.inner_epochs) * self.config.batch_size

    def state_dict(self) -> dict:
        """The per-context reward buffers and the batch the inner epochs reuse: a resumed run
        continues exactly, also between inner epochs."""
        batch = None if self.batch is None else {"data": self.batch.to_dict(), "shape": list(self.batch.batch_size)}
        return {"standardize": self.standardize.state_dict(), "batch": batch}

    def load_state_dict(self, state: dict) -> None:
        from tensordict import TensorDict

        self.standardize.load_state_dict(state["standardize"])
        b = state.get("batch")
        self.batch = None if b is None else TensorDict(b["data"], batch_size=b["shape"])

    def collect(self, generator):
        """A batch of chains ``[B, K]`` with old log-probs, rewards and per-chain advantages."""
        c = self.config
        context = self.contexts(c.batch_size, generator)
        sched = self.model.schedule
        deterministic_end = float(sched.alpha_sigma(self.ts[-1:])[1][0]) == 0.0
        ts = self.ts[:-1] if deterministic_end else self.ts
        with torch.no_grad():
            td = rollout(self.model, self.noise(c.batch_size, generator), ts, context, eta=c.eta,
                         reduction="mean", generator=generator)
            x = td["next", "x"][:, -1]
            if deterministic_end:
                x = self.model.x0_eps(x, torch.full((x.shape[0],), float(ts[-1]), device=x.device), context)[0]
            reward = self.reward(x.clamp(-1, 1), context)
        keys = context if context is not None else [0] * c.batch_size
        td["advantage"] = self.standardize(keys, reward)[:, None].expand(td.batch_size)
        self.last_samples = (x.clamp(-1, 1), context)
        return td

    def loss(self, step, generator):
        c = self.config
        if self.batch is None or step % c.inner_epochs == 0:
            self.batch = self.collect(generator)
        td = self.batch
        K = td.batch_size[1]
        n = max(1, round(c.train_fraction * K))
        if n < K:
            td = td[:, torch.randperm(K, generator=generator)[:n]]
        return self.policy_loss(td.reshape(-1))["loss_objective"]

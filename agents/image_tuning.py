"""Reward fine-tuning of image diffusion models: what DDPO, DRaFT, ReFL and DRWR share.

A tuner holds the model being fine-tuned (a copy of the pre-trained one), a reward
(:mod:`diffpolicy.images.rewards`) and the sampling grid; each method defines
``loss(step, generator)``, the scalar loss of one iteration on freshly sampled images, and
:meth:`ImageRewardTuner.fit` runs it through :func:`diffpolicy.distill.train.train_student`
(EMA, CSV + TensorBoard logs, checkpoints). Contexts are class labels drawn uniformly when the
model is class-conditional, else None. :meth:`ImageRewardTuner.samples` gives the images sampled
for training, the budget the methods are compared on. Resume restores the model, optimiser and
RNGs; DDPO's and DRWR's per-context reward statistics restart empty (batch statistics are used
until they refill).

KL regularisation (``kl_weight > 0``, any method): a re-noised eps-matching regulariser,
``E_t ||eps_theta(x_t, t) - eps_ref(x_t, t)||^2`` with ``x_t`` the iteration's own images
re-noised to uniform times. It is in the spirit of DPOK's bound (Fan et al. 2023, Lemma 4.2),
whose expectation is over the fine-tuned chain's own states with per-step weights; this
surrogate is cheaper, works for every method, and is 0 exactly when the model equals the
pre-trained one.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from diffpolicy.denoiser import DenoiserBase
from diffpolicy.images.rewards import Reward
from diffpolicy.samplers import prior

from .base import eval_mode

__all__ = ["ImageRewardTuner", "ImageTuneConfig"]


@dataclasses.dataclass
class ImageTuneConfig:
    sampling_steps: int = 20        # K: the chain every sample runs
    eta: float = 1.0                # 1: DDPM steps (DDPO); 0: DDIM (DRaFT, ReFL)
    batch_size: int = 32            # images sampled per iteration
    lr: float = 1e-4
    ema_decay: float = 0.0          # 0: sample the fine-tuned weights themselves
    num_classes: int | None = None  # contexts drawn from 0..num_classes-1 (0: unconditional; None: the net's)
    kl_weight: float = 0.0          # weight of the KL-to-pre-trained penalty (0: off)
    seed: int = 0


class ImageRewardTuner:
    """Base class; subclasses set ``name``, ``config_class`` and ``loss``."""

    name = "image_tuner"
    config_class = ImageTuneConfig
    needs_reward_gradient = False   # DRaFT / ReFL backpropagate through the reward

    def __init__(self, model: DenoiserBase, reward: Reward, size: int, config: ImageTuneConfig | None = None,
                 **overrides):
        if self.needs_reward_gradient and not reward.differentiable:
            raise ValueError(f"{type(self).__name__} backpropagates through the reward; {reward.name!r} is not "
                             "differentiable (use DDPO or DRWR)")
        cfg = config or self.config_class()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.model = copy.deepcopy(model).train()
        self.model.requires_grad_(True)
        net = getattr(self.model, "net", None)
        if net is not None and hasattr(net, "cfg_dropout"):
            net.cfg_dropout = 0.0  # sampled contexts are always given
        self.reward, self.size = reward, size
        self.ts = self.model.schedule.timesteps(self.config.sampling_steps)
        self.device = next(self.model.parameters()).device
        net_classes = getattr(net, "num_classes", None)
        if self.config.num_classes is None:
            self.config = dataclasses.replace(self.config, num_classes=net_classes or 0)
        elif net_classes == 0 and self.config.num_classes:
            raise ValueError(f"num_classes={self.config.num_classes} but the model is unconditional: use num_classes=0")
        elif net_classes is not None and self.config.num_classes > net_classes:
            raise ValueError(f"num_classes={self.config.num_classes} but the model knows {net_classes} classes")
        self.reference = None
        if self.config.kl_weight > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.last_samples = None  # (images, contexts) of the current iteration, for the KL penalty

    @torch.no_grad()
    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """A training batch of ``batch_size`` images (no graph) and their contexts."""
        from diffpolicy.chain import rollout

        c = self.config
        context = self.contexts(c.batch_size, generator)
        td = rollout(self.model, self.noise(c.batch_size, generator), self.ts, context, eta=c.eta, reduction=None,
                     generator=generator)
        return td["next", "x"][:, -1].clamp(-1, 1), context

    def contexts(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        k = self.config.num_classes
        return None if k == 0 else torch.randint(0, k, (n,), generator=generator).to(self.device)

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        channels = getattr(getattr(self.model, "net", None), "in_channels", 1)
        return prior(self.model, (n, channels, self.size, self.size), generator=generator).to(self.device)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, model: DenoiserBase | None = None) -> tuple[Tensor, Tensor | None]:
        """``n`` images (and their contexts) from ``model`` (default: the fine-tuned one) with the
        tuner's own chain, from a seeded start."""
        from diffpolicy.chain import rollout

        g = torch.Generator().manual_seed(seed)
        context = self.contexts(n, g)
        model = self.model if model is None else model
        with eval_mode(model):
            td = rollout(model, self.noise(n, g), self.ts, context, eta=self.config.eta, reduction=None, generator=g)
        return td["next", "x"][:, -1].clamp(-1, 1), context

    def evaluate(self, n: int = 256, seed: int = 0, model: DenoiserBase | None = None) -> dict[str, float]:
        x, context = self.sample(n, seed, model)
        with torch.no_grad():
            r = self.reward(x, context).double()
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std())}

    def loss(self, step: int, generator: torch.Generator) -> Tensor:
        """The method's loss on one iteration; sets ``last_samples`` to the images it scored."""
        raise NotImplementedError

    def kl_penalty(self, x0: Tensor, context, generator: torch.Generator) -> Tensor:
        """``E ||eps_theta - eps_ref||^2`` at ``x0`` re-noised to uniform times (the module's KL regulariser)."""
        sched = self.model.schedule
        x0 = x0.detach()
        t = sched.sample_t(x0.shape[0], generator=generator).to(x0.device)
        alpha, sigma = (v.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1)) for v in sched.alpha_sigma(t))
        x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        eps = self.model.x0_eps(x_t, t, context)[1]
        with torch.no_grad():
            eps_ref = self.reference.x0_eps(x_t, t, context)[1]
        return (eps - eps_ref).square().flatten(1).mean(1).mean()

    def objective(self, step: int, generator: torch.Generator) -> Tensor:
        """``loss`` plus ``kl_weight`` times the KL penalty on the iteration's images."""
        loss = self.loss(step, generator)
        if self.config.kl_weight > 0:
            loss = loss + self.config.kl_weight * self.kl_penalty(*self.last_samples, generator)
        return loss

    def samples(self, iterations: int) -> int:
        """Images sampled for training in ``iterations`` iterations (the compared budget)."""
        return iterations * self.config.batch_size

    def fit(self, iterations: int, *, run_dir=None, progress: bool = True, log_every: int = 10,
            checkpoint_every: int = 50) -> dict:
        """Run ``iterations`` iterations (a second call with more continues a run in ``run_dir``)."""
        from diffpolicy.distill.train import train_student

        cfg = self.config
        out = train_student(self.model, self.objective, steps=iterations, lr=cfg.lr, ema_decay=cfg.ema_decay,
                            run_dir=run_dir, config={"method": self.name, **dataclasses.asdict(cfg),
                                                     "reward": self.reward.name},
                            seed=cfg.seed, log_every=log_every, checkpoint_every=checkpoint_every,
                            progress=progress, desc=self.name, aux={"tuner": self})
        return out

    def state_dict(self) -> dict:
        """State a tuner carries between iterations besides the model (checkpointed with it)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

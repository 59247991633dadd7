"""Rewards for fine-tuning image diffusion models: ``reward(images, context) -> Tensor [B]``.

``images [B, C, H, W]`` are in ``[-1, 1]``; ``context`` is the conditioning the images were
sampled with (class labels, or None). Each reward declares ``differentiable``: DRaFT and ReFL
backpropagate through it and refuse one that is not; DDPO and DRWR only read its values.

==================== ============================================== ===============
name                 value                                          differentiable
==================== ============================================== ===============
``class``            log p(target | x) under the digit classifier    yes
``brightness``       mean pixel intensity in [0, 1]                  yes
``contrast``         per-image pixel std in [0, 1] units             yes
``compressibility``  minus the JPEG size in kB (Black et al. 2024)   no
``incompressibility`` the JPEG size in kB                            no
==================== ============================================== ===============

The target of ``class`` is the context label when one is given (a class-conditional model is
asked to make its own class more certain), else the fixed ``target``. :class:`FnReward`
wraps any user callable with a declared differentiability.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["REWARDS", "Brightness", "ClassLogProb", "Contrast", "FnReward", "JpegSize", "Reward", "make_reward"]


class Reward:
    """Base class: ``__call__(images, context=None) -> [B]``; ``differentiable`` says whether
    gradients of the value with respect to the images are meaningful."""

    differentiable: bool = False
    name: str = "reward"

    def __call__(self, images: Tensor, context=None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _check(images: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W] in [-1, 1], got {tuple(images.shape)}")


class Brightness(Reward):
    differentiable, name = True, "brightness"

    def __call__(self, images, context=None):
        self._check(images)
        return ((images + 1) / 2).flatten(1).mean(1)


class Contrast(Reward):
    differentiable, name = True, "contrast"

    def __call__(self, images, context=None):
        self._check(images)
        return ((images + 1) / 2).flatten(1).std(1)


class ClassLogProb(Reward):
    """``log softmax(classifier(x))[target]``; the classifier is the digit CNN of
    :mod:`~diffpolicy.images.metrics` (trained and cached on first use) unless one is given."""

    differentiable, name = True, "class"

    def __init__(self, target: int = 0, size: int = 8, classifier: torch.nn.Module | None = None):
        if classifier is None:
            from .metrics import DigitClassifier

            classifier = DigitClassifier.trained(size)
        self.classifier = classifier.eval().requires_grad_(False)
        self.target = target

    def __call__(self, images, context=None):
        self._check(images)
        logp = torch.log_softmax(self.classifier(images.float()), -1)
        target = torch.full((images.shape[0],), self.target, device=images.device) if context is None else context
        return logp.gather(1, target.long().view(-1, 1)).squeeze(1).to(images.dtype)


class JpegSize(Reward):
    """JPEG size in kB at ``quality`` (PIL), negated for compressibility (DDPO's rewards, Black
    et al. 2024 §6.1). Computed on the CPU from 8-bit images; not differentiable."""

    def __init__(self, compressible: bool = True, quality: int = 95):
        self.sign, self.quality = (-1.0 if compressible else 1.0), quality
        self.name = "compressibility" if compressible else "incompressibility"

    def __call__(self, images, context=None):
        from PIL import Image

        self._check(images)
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        sizes = []
        for img in pixels:
            arr = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, dtype=images.dtype, device=images.device)


class FnReward(Reward):
    """Any callable ``fn(images, context) -> [B]``, with its differentiability declared."""

    def __init__(self, fn: Callable, differentiable: bool, name: str = "custom"):
        self.fn, self.differentiable, self.name = fn, differentiable, name

    def __call__(self, images, context=None):
        self._check(images)
        out = self.fn(images, context)
        if not isinstance(out, Tensor) or out.shape != (images.shape[0],):
            raise ValueError(f"reward {self.name!r} must return a tensor of shape [{images.shape[0]}], "
                             f"got {getattr(out, 'shape', type(out))}")
        return out


REWARDS = {"class": ClassLogProb, "brightness": Brightness, "contrast": Contrast,
           "compressibility": lambda **kw: JpegSize(True, **kw), "incompressibility": lambda **kw: JpegSize(False, **kw)}


def make_reward(name: str, **kwargs) -> Reward:
    """A reward by name (see the module table); unknown names raise a ValueError listing the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}")
    return REWARDS[name](**kwargs)

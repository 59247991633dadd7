"""Exponential moving average of model weights (Polyak averaging), on torch's AveragedModel."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMA"]


class EMA(AveragedModel):
    """``theta_ema <- d theta_ema + (1 - d) theta`` after each ``update(model)``.

    With ``warmup`` the decay is ``min(decay, (1 + k) / (10 + k))`` at update ``k`` (the
    schedule of TensorFlow's ExponentialMovingAverage, used by Diffusion-QL and DDPM code),
    so early averages are not dominated by the random initialisation. Buffers are averaged
    too. ``ema.module`` is the averaged copy; call it like the model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.module.requires_grad_(False)
        self.updates = 0  # a Python counter: reading n_averaged would sync a GPU every step

    def current_decay(self, k: int) -> float:
        """The decay used for the ``k``-th update (``k = 0`` is the first)."""
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def _average(self, ema_params, params, num_averaged):
        d = self.current_decay(self.updates - 1)
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - d)
        for e, p in zip(ema_params, params):  # integer buffers (e.g. BatchNorm counters): copy
            if not e.is_floating_point():
                e.copy_(p)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the averaged weights and continue the warmup where the saved EMA stood
        (``n_averaged`` is in the state dict; the Python counter is not)."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)
        return out

    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current parameters into the EMA copy."""
        self.update_parameters(model)
        self.updates += 1

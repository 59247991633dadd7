"""Activations, by name, and a Mish that is fast on the CPU.

Mish (Misra 2019, eq. 1): ``mish(x) = x * tanh(softplus(x))``. With ``u = e^x``,
``tanh(softplus(x)) = tanh(log(1 + u)) = n / (n + 2)`` where ``n = u (u + 2)``, so Mish needs one
``exp`` and no ``tanh``. Its derivative, ``tanh(softplus(x)) + x sigmoid(x) sech^2(softplus(x))``
(Misra 2019, Sec. 3), rewritten the same way, is ``mish'(x) = t + x * sigmoid(x) * (1 - t^2)``
with ``t = n / (n + 2)``, ``sigmoid(x) = u / (1 + u)`` and ``1 - t^2 = 4 (n + 1) / (n + 2)^2``
(exact, no cancellation as ``t -> 1``).

Why: on x86 CPUs PyTorch's ``tanh`` (and so ``torch.nn.functional.mish``) is slow, about three
times ``exp``; on one thread a ``[256, 256]`` Mish takes 0.13 ms forward against ``F.mish``'s
0.25 ms, and a Diffusion-QL training step (about fifty of them) runs 4-5% faster. On other
devices and dtypes :class:`Mish` calls ``torch.nn.functional.mish`` (a fused kernel on CUDA).
``benchmarks/train_step.py`` measures the difference (variant ``nn_mish``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Mish", "make_activation", "mish"]

_EXP_MAX = 20.0  # tanh(softplus(x)) == 1 in float32 (and to 1e-17 in float64) beyond this


def _mish_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, n)`` with ``u = e^x`` (clamped above) and ``n = u (u + 2)``."""
    u = torch.exp(x.clamp(max=_EXP_MAX))
    return u, u * (u + 2.0)


class _MishExp(torch.autograd.Function):
    """Mish with the exp-only forward and derivative above. Only ``x`` is saved and the backward
    recomputes from it with differentiable ops, so double backward is exact too; the separate
    ``setup_context`` and the generated vmap rule let ``torch.func`` transforms (TorchRL's
    vmapped critic ensembles) run through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        _, n = _mish_parts(x)
        return x * n / (n + 2.0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, = ctx.saved_tensors
        u, n = _mish_parts(x)
        d = n + 2.0
        return grad * (n / d + x * (u / (1.0 + u)) * (4.0 * (n + 1.0) / (d * d)))


def mish(x: Tensor) -> Tensor:
    """``x * tanh(softplus(x))``; the exp-only form on the CPU, ``F.mish`` elsewhere."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _MishExp.apply(x)
    return F.mish(x)


class Mish(nn.Module):
    """``nn.Mish`` with the CPU fast path of :func:`mish` (same maths, no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return mish(x)


ACTIVATIONS = {
    "mish": Mish,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def make_activation(name: str) -> nn.Module:
    """Build the activation module called ``name`` (one of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; valid: {valid}") from None

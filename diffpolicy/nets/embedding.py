"""Time embeddings shared by all denoising networks.

The sinusoidal features follow the Transformer positional encoding of
Vaswani et al. (2017), "Attention Is All You Need", as adapted to diffusion
time steps by Ho et al. (2020), "Denoising Diffusion Probabilistic Models".
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .activations import Mish

TimeLike = Union[Tensor, float, int]


def broadcast_time(t: TimeLike, batch_size: int, like: Tensor) -> Tensor:
    """Return network time ``t`` as a ``[batch_size]`` tensor on ``like``'s device/dtype.

    ``t`` may be a ``[B]`` tensor (returned as is when it already matches), a
    tensor with a single element (0-d or ``[1]``), a ``[B, 1]`` tensor, or a
    python/numpy scalar; scalars are broadcast to the whole batch.
    """
    if not isinstance(t, Tensor):
        return torch.full((batch_size,), float(t), dtype=like.dtype, device=like.device)
    if t.dtype != like.dtype or t.device != like.device:  # .to() is not free even as a no-op
        t = t.to(device=like.device, dtype=like.dtype)
    if t.dim() == 1 and t.shape[0] == batch_size:
        return t
    if t.numel() == 1:
        return t.reshape(1).expand(batch_size)
    if t.numel() == batch_size:
        return t.reshape(batch_size)
    raise ValueError(
        f"t must be a scalar or have {batch_size} elements (one per batch row), "
        f"got shape {tuple(t.shape)}"
    )


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a scalar time (Vaswani et al. 2017; Ho et al. 2020).

    ``emb(t) = [sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]``
    with ``h = dim // 2`` and ``f_i = max_period ** (-i / (h - 1))``, exactly the
    DDPM ``get_timestep_embedding`` (also used by Diffusion-QL and Diffusion
    Policy).  Frequencies are a precomputed buffer; the cosines are computed as
    ``sin(t * f + pi / 2)`` so the forward is a single fused multiply-add plus
    one ``sin``.

    Args:
        dim: embedding size (even, >= 2).
        max_period: the lowest frequency is ``1 / max_period``.

    Shapes: ``t`` ``[B]`` -> ``[B, dim]``.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2, got {dim}")
        self.dim = dim
        self.max_period = float(max_period)
        half = dim // 2
        scale = math.log(max_period) / max(half - 1, 1)
        freqs = torch.exp(-scale * torch.arange(half, dtype=torch.float64))
        phase = torch.cat([torch.zeros(half), torch.full((half,), math.pi / 2)])
        self.register_buffer("freqs", torch.cat([freqs, freqs]).float(), persistent=False)
        self.register_buffer("phase", phase.float(), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` ``[B]`` (float) into ``[B, dim]``."""
        if t.dtype != self.freqs.dtype:
            t = t.to(self.freqs.dtype)
        return torch.addcmul(self.phase, t.unsqueeze(-1), self.freqs).sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}"


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding -> Linear -> Mish -> Linear (Diffusion-QL, Wang et al. 2023;
    Diffusion Policy, Chi et al. 2023; sinusoidal features of Ho et al. 2020).

    Args:
        dim: size of the sinusoidal features.
        hidden: width of the hidden layer.
        out_dim: output size (defaults to ``dim``).

    Shapes: ``t`` ``[B]`` -> ``[B, out_dim]``.
    """

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None):
        super().__init__()
        self.out_dim = dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            SinusoidalEmbedding(dim),
            nn.Linear(dim, hidden),
            Mish(),
            nn.Linear(hidden, self.out_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` ``[B]`` into ``[B, out_dim]``."""
        return self.net(t)

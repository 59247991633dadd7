"""Temporal 1-D U-Net over action sequences, after Diffusion Policy.

Chi et al. (2023), "Diffusion Policy: Visuomotor Policy Learning via Action
Diffusion" (``ConditionalUnet1D``): Conv1d-GroupNorm-Mish blocks, conditional
residual blocks modulated by FiLM (Perez et al. 2018) from
``concat(time_embedding, obs)``, strided-conv downsampling, transposed-conv
upsampling and skip connections.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .activations import Mish
from .embedding import TimeEmbedding, TimeLike, broadcast_time


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish (Chi et al. 2023). ``[B, C_in, H]`` -> ``[B, C_out, H]``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            Mish(),
        )


class CondResBlock1D(nn.Module):
    """Residual block with FiLM conditioning (Chi et al. 2023; Perez et al. 2018).

    ``out = block2(scale * block1(x) + bias) + skip(x)`` where ``(scale, bias)``
    is a linear map of ``Mish(cond)``.

    Shapes: ``x`` ``[B, C_in, H]``, ``cond`` ``[B, cond_dim]`` -> ``[B, C_out, H]``.
    """

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.skip(x)


class TemporalUnet1D(nn.Module):
    """Conditional temporal U-Net of Diffusion Policy (Chi et al. 2023, ConditionalUnet1D).

    Level ``i`` has two FiLM residual blocks of width ``down_dims[i]``; all but
    the last level downsample by 2 (strided conv) and the decoder mirrors them
    with ``ConvTranspose1d`` upsampling and skip connections, so the horizon
    must be a multiple of ``2 ** (len(down_dims) - 1)``.

    Args:
        action_dim: size ``A`` of one action.
        obs_dim: size of the conditioning observation (0: unconditional).
        down_dims: channel widths per level (each divisible by ``n_groups``).
        kernel_size: odd convolution kernel size.
        n_groups: GroupNorm groups.
        time_dim: size of the time embedding (hidden layer ``4 * time_dim``).
    """

    def __init__(
        self,
        action_dim: int,
        obs_dim: int = 0,
        down_dims: Sequence[int] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        time_dim: int = 64,
    ):
        super().__init__()
        down_dims = tuple(down_dims)
        if not down_dims or any(d % n_groups for d in down_dims):
            raise ValueError(f"down_dims must be non-empty multiples of n_groups={n_groups}, got {down_dims}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.action_dim, self.obs_dim = action_dim, obs_dim
        self.horizon_multiple = 2 ** (len(down_dims) - 1)
        self.time_embed = TimeEmbedding(time_dim, 4 * time_dim)
        cond_dim = time_dim + obs_dim

        def res(c_in: int, c_out: int) -> CondResBlock1D:
            return CondResBlock1D(c_in, c_out, cond_dim, kernel_size, n_groups)

        dims = (action_dim,) + down_dims
        in_out = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            resample = nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([res(c_in, c_out), res(c_out, c_out), resample]))
        self.mid = nn.ModuleList([res(down_dims[-1], down_dims[-1]), res(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(in_out[1:]):
            upsample = nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)
            self.up.append(nn.ModuleList([res(2 * c_out, c_in), res(c_in, c_in), upsample]))
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def _check(self, x: Tensor, cond: Optional[Tensor]) -> None:
        if x.dim() != 3 or x.shape[2] != self.action_dim:
            raise ValueError(f"x must have shape [B, H, {self.action_dim}], got {tuple(x.shape)}")
        if x.shape[1] % self.horizon_multiple:
            raise ValueError(
                f"x horizon H={x.shape[1]} must be a multiple of {self.horizon_multiple} "
                f"(2 ** (len(down_dims) - 1))"
            )
        if self.obs_dim > 0:
            if cond is None or cond.shape != (x.shape[0], self.obs_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape [B={x.shape[0]}, obs_dim={self.obs_dim}], got {got}")
        elif cond is not None:
            raise ValueError("cond must be None: this network was built with obs_dim=0")

    def forward(self, x: Tensor, t: TimeLike, cond: Optional[Tensor] = None) -> Tensor:
        """Denoise ``x`` ``[B, H, A]`` at time ``t`` ``[B]`` (or scalar) given
        ``cond`` ``[B, obs_dim]`` (None iff ``obs_dim == 0``); returns ``[B, H, A]``."""
        self._check(x, cond)
        c = self.time_embed(broadcast_time(t, x.shape[0], x))
        if cond is not None:
            c = torch.cat((c, cond), dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat((h, skips.pop()), dim=1)
            h = upsample(res2(res1(h, c), c))
        return self.final(h).transpose(1, 2)

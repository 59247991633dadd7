"""Small DDPM-style 2-D U-Net for images, with classifier-free guidance support.

Architecture after Ho et al. (2020), "Denoising Diffusion Probabilistic Models"
(residual blocks with GroupNorm + SiLU and an additive time-embedding
projection, self-attention at low resolution); class conditioning with a
learned null class dropped at training time after Ho & Salimans (2022),
"Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedding import TimeEmbedding, TimeLike, broadcast_time


class ResBlock2D(nn.Module):
    """DDPM residual block (Ho et al. 2020): GN-SiLU-Conv, add ``Linear(SiLU(emb))``, GN-SiLU-Conv.

    Shapes: ``x`` ``[B, C_in, H, W]``, ``emb`` ``[B, emb_dim]`` -> ``[B, C_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return self.out_layers(h) + self.skip(x)


class SelfAttention2D(nn.Module):
    """Single-head spatial self-attention with a residual connection (Ho et al. 2020).

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, HW, C] each
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(1, 2).reshape(b, c, hgt, wid))


class Unet2D(nn.Module):
    """Small DDPM U-Net (Ho et al. 2020) with optional classifier-free guidance
    class conditioning (Ho & Salimans 2022).

    Level ``i`` works at ``base_channels * channel_mults[i]`` channels with
    ``num_res_blocks`` residual blocks; every level but the last halves the
    resolution, so the spatial size must be divisible by
    ``2 ** (len(channel_mults) - 1)``.  The time embedding (plus a class
    embedding when ``num_classes > 0``) is added inside every residual block.

    Args:
        in_channels: image channels ``C``.
        base_channels: channels of the first level (divisible by ``groups``).
        channel_mults: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level in the encoder.
        num_classes: number of classes (0: unconditional).  Label
            ``num_classes`` is the learned null class.
        cfg_dropout: probability of replacing a label by the null class in
            training mode (classifier-free guidance dropout).
        time_dim: embedding size (default ``4 * base_channels``).
        attention: add single-head self-attention at the lowest resolution.
        groups: GroupNorm groups.
        guidance_embed: also condition on a guidance weight ``w``: ``cond`` is then the pair
            ``(labels or None, w [B])`` and a sinusoidal embedding of ``w`` is added to the
            time embedding (the guidance-conditioned student of Meng et al. 2023 §3.1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        num_classes: int = 0,
        cfg_dropout: float = 0.0,
        time_dim: Optional[int] = None,
        attention: bool = False,
        groups: int = 8,
        guidance_embed: bool = False,
    ):
        super().__init__()
        chans = [base_channels * m for m in channel_mults]
        if not chans or any(c % groups for c in chans):
            raise ValueError(f"base_channels * channel_mults must be multiples of groups={groups}, got {chans}")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        emb_dim = 4 * base_channels if time_dim is None else time_dim
        self.in_channels, self.num_classes, self.cfg_dropout = in_channels, num_classes, cfg_dropout
        self.size_multiple = 2 ** (len(chans) - 1)
        self.time_embed = TimeEmbedding(base_channels, emb_dim, out_dim=emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.guidance_embed = TimeEmbedding(base_channels, emb_dim, out_dim=emb_dim) if guidance_embed else None

        def res(c_in: int, c_out: int) -> ResBlock2D:
            return ResBlock2D(c_in, c_out, emb_dim, groups)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skip_chans, ch = nn.ModuleList(), [base_channels], base_channels
        for level, c_out in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(res(ch, c_out))
                ch = c_out
                skip_chans.append(ch)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chans.append(ch)
        self.mid = nn.ModuleList([res(ch, ch), SelfAttention2D(ch, groups) if attention else nn.Identity(), res(ch, ch)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            for _ in range(num_res_blocks + 1):
                self.up.append(res(ch + skip_chans.pop(), chans[level]))
                ch = chans[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))

    @property
    def null_class(self) -> int:
        """Label of the unconditional (null) class, ``num_classes``."""
        return self.num_classes

    def _labels(self, cond: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        """Class labels ``[B]`` after CFG dropout (training only); None -> all null."""
        if cond is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if cond.shape != (batch,) or cond.dtype.is_floating_point or cond.dtype == torch.bool:
            raise ValueError(f"cond must be integer class labels of shape [B={batch}], "
                             f"got {tuple(cond.shape)} {cond.dtype}")
        if self.training and self.cfg_dropout > 0.0:
            drop = torch.rand(batch, device=device) < self.cfg_dropout
            cond = cond.masked_fill(drop, self.null_class)
        return cond

    def forward(self, x: Tensor, t: TimeLike, cond: Optional[Tensor] = None) -> Tensor:
        """Denoise ``x`` ``[B, C, H, W]`` at time ``t`` ``[B]`` (or scalar) with class
        labels ``cond`` ``[B]`` (long; None = null class); returns ``[B, C, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(f"x spatial size {tuple(x.shape[2:])} must be divisible by {self.size_multiple} "
                             f"(2 ** (len(channel_mults) - 1))")
        batch = x.shape[0]
        emb = self.time_embed(broadcast_time(t, batch, x))
        if self.guidance_embed is not None:
            if not isinstance(cond, (tuple, list)) or len(cond) != 2:
                raise ValueError("this network was built with guidance_embed=True: cond must be (labels or None, w [B])")
            cond, w = cond
            emb = emb + self.guidance_embed(broadcast_time(w, batch, x) * 100.0)
        if self.class_embed is not None:
            emb = emb + self.class_embed(self._labels(cond, batch, x.device))
        elif cond is not None:
            raise ValueError("cond must be None: this network was built with num_classes=0")
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock2D) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock2D) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock2D):
                h = layer(torch.cat((h, skips.pop()), dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)

"""Denoising networks: ``forward(x, t, cond=None) -> Tensor`` shaped like ``x``.

- :class:`MLPDenoiser`: Diffusion-QL MLP (Wang et al. 2023), ``x`` ``[B, D]``.
- :class:`TemporalUnet1D`: Diffusion Policy U-Net (Chi et al. 2023), ``x`` ``[B, H, A]``.
- :class:`Unet2D`: DDPM U-Net (Ho et al. 2020) with CFG labels, ``x`` ``[B, C, H, W]``.
"""

from .embedding import SinusoidalEmbedding, TimeEmbedding
from .mlp import MLPDenoiser
from .unet1d import TemporalUnet1D
from .unet2d import Unet2D

__all__ = ["SinusoidalEmbedding", "TimeEmbedding", "MLPDenoiser", "TemporalUnet1D", "Unet2D"]

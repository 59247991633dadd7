"""MLP denoiser for low-dimensional samples (actions), after Diffusion-QL.

Wang, Hunt & Zhou (2023), "Diffusion Policies as an Expressive Policy Class for
Offline Reinforcement Learning" (Diffusion-QL): a 3x256 Mish MLP on
``concat(x, time_embedding, obs)``.  The optional residual variant is the
pre-LayerNorm ``MLPResNet`` of Hansen-Estruch et al. (2023), IDQL (their code's
``MLPResNetBlock``: dropout, LayerNorm, a ``4 x width`` inner layer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .activations import ACTIVATIONS, make_activation  # noqa: F401  (re-exported)
from .embedding import TimeEmbedding, TimeLike, broadcast_time

def _dense(d_in: int, d_out: int, layer_norm: bool) -> nn.Module:
    """Linear layer, followed by LayerNorm when ``layer_norm``."""
    linear = nn.Linear(d_in, d_out)
    return nn.Sequential(linear, nn.LayerNorm(d_out)) if layer_norm else linear


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block ``x + W2 act(W1 LN(dropout(x)))``, ``W1`` to
    ``expansion x width`` (IDQL's ``MLPResNetBlock``: expansion 4, dropout 0.1).

    Shapes: ``[B, width]`` -> ``[B, width]``.
    """

    def __init__(self, width: int, activation: str, layer_norm: bool = False, expansion: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if expansion < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"expansion must be >= 1 and dropout in [0, 1), got {expansion}, {dropout}")
        inner = width * expansion
        self.net = nn.Sequential(
            *([nn.Dropout(dropout)] if dropout > 0 else []),
            nn.LayerNorm(width),
            _dense(width, inner, layer_norm),
            make_activation(activation),
            nn.Linear(inner, width),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class MLPDenoiser(nn.Module):
    """Diffusion-QL MLP denoiser (Wang et al. 2023): ``MLP(concat(x, t_emb, obs))``.

    The network time goes through a ``time_dim``-d sinusoidal embedding and a
    small Mish MLP (``TimeEmbedding(time_dim, 2 * time_dim)``), is concatenated
    with ``x`` and the observation and fed to ``depth`` hidden layers of width
    ``hidden``; a final ``Linear(hidden, x_dim)`` gives the output.

    Args:
        x_dim: size ``D`` of the sample.
        obs_dim: size of the conditioning observation (0: unconditional).
        hidden: hidden width.
        depth: number of hidden layers (residual blocks if ``residual``).
        time_dim: size of the time embedding.
        activation: one of ``mish, relu, silu, gelu, tanh, elu``.
        residual: use an input projection then ``depth`` pre-LayerNorm residual
            blocks of width ``hidden`` instead of a plain MLP.
        layer_norm: add a LayerNorm after each hidden Linear (in residual mode,
            after the first Linear of every block).
        expansion: residual mode: the inner width of every block, in multiples of ``hidden``.
        dropout: residual mode: dropout at the input of every block (training mode only).
    """

    def __init__(
        self,
        x_dim: int,
        obs_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 16,
        activation: str = "mish",
        residual: bool = False,
        layer_norm: bool = False,
        expansion: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not residual and (expansion != 1 or dropout != 0.0):
            raise ValueError("expansion and dropout are settings of the residual blocks: set residual=True")
        self.x_dim, self.obs_dim = x_dim, obs_dim
        self.time_embed = TimeEmbedding(time_dim, 2 * time_dim)
        in_dim = x_dim + time_dim + obs_dim
        if residual:
            layers = [nn.Linear(in_dim, hidden)]
            layers += [ResidualBlock(hidden, activation, layer_norm, expansion, dropout) for _ in range(depth)]
            layers.append(make_activation(activation))
        else:
            layers = []
            for i in range(depth):
                layers += [_dense(in_dim if i == 0 else hidden, hidden, layer_norm),
                           make_activation(activation)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, x_dim)

    def forward(self, x: Tensor, t: TimeLike, cond: Optional[Tensor] = None) -> Tensor:
        """Predict from ``x`` ``[B, x_dim]``, ``t`` ``[B]`` (or scalar) and
        ``cond`` ``[B, obs_dim]`` (None iff ``obs_dim == 0``); returns ``[B, x_dim]``."""
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"x must have shape [B, {self.x_dim}], got {tuple(x.shape)}")
        batch = x.shape[0]
        t_emb = self.time_embed(broadcast_time(t, batch, x))
        if self.obs_dim > 0:
            if cond is None or cond.shape != (batch, self.obs_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape [B={batch}, obs_dim={self.obs_dim}], got {got}")
            h = torch.cat((x, t_emb, cond), dim=-1)
        elif cond is not None:
            raise ValueError("cond must be None: this network was built with obs_dim=0")
        else:
            h = torch.cat((x, t_emb), dim=-1)
        return self.out(self.body(h))

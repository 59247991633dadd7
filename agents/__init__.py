"""One RL algorithm per module (``diffpolicy.agents``), one training loop for all.

Offline agents (:class:`~diffpolicy.agents.base.OfflineAgent`), by name:

==================  =============================  ==========================================
name                module                         what
==================  =============================  ==========================================
diffusion_bc        ``diffusion_bc``               diffusion BC, MLP denoiser on states
diffusion_policy    ``diffusion_policy``           Diffusion Policy: obs history, action chunks,
                                                   temporal U-Net, receding horizon
diffusion_ql        ``diffusion_ql``               Diffusion-QL: BC + Q through the chain
idql                ``idql``                       IDQL: IQL critic + diffusion behaviour policy,
                                                   Q-weighted resampling
consistency_bc      ``consistency_policy``         consistency BC (consistency training)
consistency_bc_cd   ``consistency_policy``         consistency BC distilled from a diffusion BC
consistency_ac      ``consistency_policy``         consistency actor-critic (Q term)
gaussian_bc         ``gaussian_bc``                Gaussian (tanh-normal) BC baseline
td3_bc              ``td3_bc``                     TD3+BC through TorchRL's ``TD3BCLoss``
iql                 ``iql``                        IQL through TorchRL's ``IQLLoss``
==================  =============================  ==========================================

``make_agent(name, obs_dim, act_dim, **settings)`` builds one; ``train_offline`` (in
:mod:`~diffpolicy.agents.trainer`) trains any of them.

Online fine-tuning agents start from a trained BC policy (``Cls.from_diffusion_bc(bc)``, or
``GaussianPPO.from_gaussian_bc(gbc)``) and train with ``train_online`` (in
:mod:`~diffpolicy.agents.online`, TorchRL collectors on vectorised gymnasium envs):

==================  =============================  ==========================================
dppo                ``dppo``                       DPPO: PPO over the last K' denoising steps
drwr                ``drwr``                       reward-weighted diffusion regression
dawr                ``dawr``                       advantage-weighted diffusion regression
qsm                 ``qsm``                        Q-score matching, off-policy twin critic
gaussian_ppo        ``gaussian_ppo``               tanh-normal PPO via TorchRL ``ClipPPOLoss``
==================  =============================  ==========================================

Reward fine-tuning of image models (``Cls(model, reward, size, **settings).fit(iterations)``;
rewards in :mod:`diffpolicy.images.rewards`, shared parts in ``image_tuning``):

==================  =============================  ==========================================
ddpo                ``ddpo``                       DDPO-SF / DDPO-IS over the sampling chain
draft               ``draft``                      DRaFT-K: reward gradient through K steps
refl                ``refl``                       ReFL: reward on a late one-step x0
==================  =============================  ==========================================
"""

from __future__ import annotations

import difflib
import importlib

__all__ = ["AGENTS", "agent_class", "make_agent"]

AGENTS = {
    "diffusion_bc": "diffusion_bc:DiffusionBC",
    "diffusion_policy": "diffusion_policy:DiffusionPolicy",
    "diffusion_ql": "diffusion_ql:DiffusionQL",
    "idql": "idql:IDQL",
    "consistency_bc": "consistency_policy:ConsistencyBC",
    "consistency_bc_cd": "consistency_policy:ConsistencyDistilledBC",
    "consistency_ac": "consistency_policy:ConsistencyAC",
    "gaussian_bc": "gaussian_bc:GaussianBC",
    "td3_bc": "td3_bc:TD3BC",
    "iql": "iql:IQL",
}


def agent_class(name: str):
    """The agent class registered as ``name``."""
    if name not in AGENTS:
        close = difflib.get_close_matches(name, AGENTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown agent {name!r}{hint}; valid: {', '.join(AGENTS)}")
    module, cls = AGENTS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_agent(name: str, obs_dim: int, act_dim: int, **settings):
    """Build agent ``name`` for ``obs_dim``-d observations and ``act_dim``-d actions."""
    return agent_class(name)(obs_dim, act_dim, **settings)

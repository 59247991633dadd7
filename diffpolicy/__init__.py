"""diffpolicy: diffusion models for reinforcement learning, on one schedule/denoiser/sampler core."""
from .denoiser import (
    CFGDenoiser, ClassifierGuidance, ClipX0, ConsistencyPrecond, Denoiser, DenoiserBase, EDMPrecond,
    LCMPrecond, TrigFlowPrecond,
)
from .ema import EMA
from .losses import (
    DenoisingLoss, consistency_distillation_loss, consistency_training_loss, diffusion_loss,
    flow_matching_loss, trigflow_loss,
)
from .metrics import sliced_wasserstein
from .samplers import SAMPLERS, prior, sample
from .schedules import (
    EDM, SCHEDULES, VE, VPSDE, DiscreteVP, RectifiedFlow, Schedule, TrigFlow, make_schedule,
)

__version__ = "0.1.0"

__all__ = [  # the core's public names; agents, envs, images and distillation live in their subpackages
    "CFGDenoiser", "ClassifierGuidance", "ClipX0", "ConsistencyPrecond", "Denoiser", "DenoiserBase", "EDMPrecond",
    "LCMPrecond", "TrigFlowPrecond", "EMA", "DenoisingLoss", "consistency_distillation_loss",
    "consistency_training_loss", "diffusion_loss", "flow_matching_loss", "trigflow_loss", "sliced_wasserstein",
    "SAMPLERS", "prior", "sample", "EDM", "SCHEDULES", "VE", "VPSDE", "DiscreteVP", "RectifiedFlow", "Schedule",
    "TrigFlow", "make_schedule",
]

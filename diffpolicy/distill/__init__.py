"""Distillation of diffusion models into few-step students (the handbook's chapter 4)."""
from .progressive import progressive_distillation_loss, student_timesteps

__all__ = ["progressive_distillation_loss", "student_timesteps"]

"""Distillation of diffusion models into few-step students (the handbook's chapter 4).

================================ =====================================================
file                             method
================================ =====================================================
``progressive.py``               progressive distillation (Salimans & Ho 2022)
``guided.py``                    guided distillation, stage one (Meng et al. 2023)
``reflow.py``                    reflow, InstaFlow one-step, velocity-mapping RF fine-tuning
``score_distillation.py``        SDS, VSD and DMD's distribution-matching gradient
``adversarial.py``               GAN losses, ADD, DMD2's GAN head
``diffpolicy.losses``            consistency distillation / training, LCM (core losses)
``students.py``                  every method above as one entry point (``distill_images``,
                                 ``distill_run``: ``diffpolicy image distill``)
================================ =====================================================
"""
from .adversarial import add_losses, discriminator_loss, generator_adv_loss, noisy, r1_penalty
from .guided import guided_distillation_loss, with_guidance
from .progressive import progressive_distillation_loss, student_timesteps
from .reflow import ode_pairs, one_step, pair_regression_loss, reflow_loss, velocity_mapping_loss
from .score_distillation import fake_score_loss, score_distillation_grad, score_distillation_loss

__all__ = ["add_losses", "discriminator_loss", "fake_score_loss", "generator_adv_loss", "guided_distillation_loss",
           "noisy", "ode_pairs", "one_step", "pair_regression_loss", "progressive_distillation_loss", "r1_penalty",
           "reflow_loss", "score_distillation_grad", "score_distillation_loss", "student_timesteps",
           "velocity_mapping_loss", "with_guidance"]

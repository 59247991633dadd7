"""Image pre-training: one entry point, the model family chosen by config.

Families (all on the core's schedules, denoiser contract and losses, with the small 2-D U-Net):

============== ================================ ===========================================
family         schedule / parameterisation      loss
============== ================================ ===========================================
ddpm_eps       DDPM linear betas, eps           denoising (Ho et al. 2020 eq. 14)
ddpm_x0        DDPM linear betas, x0            denoising, x0 target
ddpm_v         DDPM linear betas, v             denoising, v target (Salimans & Ho 2022)
rf             rectified flow, velocity         flow matching (Liu et al. 2023 eq. 1)
ct             EDM sigmas, consistency scalings consistency training from scratch (iCT)
trigflow       TrigFlow, F                      TrigFlow diffusion objective (Lu & Song 2025)
============== ================================ ===========================================

Class-conditional with classifier-free guidance dropout (label 10 is the null class), EMA of
weights (the EMA model is the one to sample), progress bar, CSV + TensorBoard logs and
checkpoints that resume (model, EMA, optimiser, step, RNGs).

Scale: ``device="cuda"`` and ``bf16=True`` (autocast of the forward and loss in bfloat16, weights
and optimiser in float32). Under ``torchrun`` (a process group initialised before the call) the
network is wrapped in DistributedDataParallel: every rank draws the same global batch of
``batch_size`` and trains on its ``rank::world`` slice with its own noise (the global RNG is
reseeded from ``(seed, rank, step)`` each step, so a resumed run continues exactly), gradients
are averaged over the whole batch, replicas stay identical, and rank 0 alone writes logs and
checkpoints (which every rank resumes from). ``device`` and ``bf16`` are not part of a run's identity: a run may resume elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffpolicy import schedules as S
from diffpolicy.denoiser import CFGDenoiser, ConsistencyPrecond, Denoiser, TrigFlowPrecond
from diffpolicy.ema import EMA
from diffpolicy.losses import consistency_training_loss, diffusion_loss
from diffpolicy.nets import Unet2D
from diffpolicy.checkpoint import CHECKPOINT, find_checkpoint, load_checkpoint, load_state_checked, save_checkpoint
from diffpolicy.runlog import (
    RunLogger, check_device, open_run, process_group, release_run, rng_state, set_rng_state, set_seed,
)
from diffpolicy.samplers import consistency_timesteps, prior, run_sampler, sample

from .data import augment, load_digits

__all__ = ["FAMILIES", "ImagePretrainConfig", "load_pretrained", "make_image_denoiser", "pretrain_images",
           "sample_images"]

FAMILIES = ("ddpm_eps", "ddpm_x0", "ddpm_v", "rf", "ct", "trigflow")
NUM_CLASSES = 10


@dataclasses.dataclass
class ImagePretrainConfig:
    family: str = "ddpm_eps"
    size: int = 8                    # digits at 8 (native) or 16 px
    steps: int = 20_000
    batch_size: int = 128
    lr: float = 2e-4
    ema_decay: float = 0.999
    base_channels: int = 32
    channel_mults: tuple = (1, 2)
    num_res_blocks: int = 1
    class_conditional: bool = True
    cfg_dropout: float = 0.1
    shift: int = 0                   # random translations (pixels) as augmentation
    seed: int = 0
    log_every: int = 200
    checkpoint_every: int = 2_000
    device: str = "cpu"
    bf16: bool = False               # bfloat16 autocast (CUDA, or CPU for tests)


def make_image_denoiser(cfg: ImagePretrainConfig) -> Denoiser:
    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown image family {cfg.family!r}; valid: {', '.join(FAMILIES)}")
    net = Unet2D(1, cfg.base_channels, tuple(cfg.channel_mults), cfg.num_res_blocks,
                 num_classes=NUM_CLASSES if cfg.class_conditional else 0,
                 cfg_dropout=cfg.cfg_dropout if cfg.class_conditional else 0.0)
    if cfg.family.startswith("ddpm_"):
        return Denoiser(net, S.DiscreteVP(1000, "linear"), cfg.family.split("_")[1])
    if cfg.family == "rf":
        return Denoiser(net, S.RectifiedFlow(), "rf_velocity")
    if cfg.family == "ct":
        return Denoiser(net, S.EDM(sigma_data=0.5), precond=ConsistencyPrecond())
    return Denoiser(net, S.TrigFlow(sigma_data=0.5), precond=TrigFlowPrecond())


def _loss(den: Denoiser, cfg: ImagePretrainConfig, x0: Tensor, labels: Tensor | None, step: int) -> Tensor:
    if cfg.family == "ct":
        return consistency_training_loss(den, x0, labels, step=step, total_steps=cfg.steps).mean()
    return diffusion_loss(den, x0, labels).mean()  # eps / x0 / v / RF velocity / TrigFlow F targets


def pretrain_images(cfg: ImagePretrainConfig | None = None, *, run_dir=None, progress: bool = True,
                    data: tuple[Tensor, Tensor] | None = None) -> dict:
    """Train ``cfg.family`` on the digits (or ``data = (images, labels)``); returns ``model``, ``ema``,
    ``history``, ``steps`` and ``seconds`` (training wall time, over all sessions of a resumed run).

    With ``run_dir``: ``config.json``, ``train.csv``, ``tb/`` and ``checkpoint.safetensors``; a second call
    with the same settings and a larger ``steps`` continues the run.
    """
    cfg = cfg or ImagePretrainConfig()
    device = check_device(cfg.device)
    rank, world = process_group()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    set_seed(cfg.seed)  # the same seed gives the same initial weights
    den = make_image_denoiser(cfg).to(device)
    x, y = data if data is not None else load_digits(cfg.size, "train")
    if x.dim() != 4 or x.shape[-1] % den.net.size_multiple:
        raise ValueError(f"images must be [N, C, H, W] with H, W divisible by {den.net.size_multiple}; got {tuple(x.shape)}")
    ema = EMA(den, cfg.ema_decay, warmup=True)
    opt = torch.optim.Adam(den.parameters(), lr=cfg.lr)
    state = {"step": 0, "history": []}
    run_path = pathlib.Path(run_dir) if run_dir is not None else None
    ckpt = run_path / CHECKPOINT if run_path is not None else None
    conf = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                  if k not in ("steps", "device", "bf16")}, default=list))
    saved, error = None, None
    if rank == 0:
        try:
            saved = open_run(run_path, conf, {"steps": cfg.steps})
        except Exception as e:  # every error (a busy directory too) reaches the other ranks, which would wait
            error = e
    if world > 1:  # the others learn rank 0's verdict, then resume from what it checked
        verdict = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ValueError(verdict[0])
        if rank and run_path is not None and find_checkpoint(run_path) is not None:
            saved = load_checkpoint(run_path)
    if error is not None:
        raise error
    if saved is not None:
        load_state_checked(den, saved["model"], "image denoiser", run_path)
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        set_rng_state(saved["rng"])
    logger = RunLogger(run_path if rank == 0 else None, resume_step=state["step"])
    if rank:
        ckpt = None  # rank 0 saves
    gen = torch.Generator().manual_seed(cfg.seed)  # batches and augmentation: the same on every rank
    if saved is not None:
        gen.set_state(saved["data_rng"])
    train_den = den
    if world > 1:  # gradients averaged by DDP; the EMA and the checkpoint keep the plain network
        ddp = torch.nn.parallel.DistributedDataParallel(den.net, device_ids=[device] if device.type == "cuda" else None)
        train_den = Denoiser(ddp, den.schedule, None if den.precond is not None else den.prediction, precond=den.precond)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"pretrain {cfg.family}", disable=not progress or rank > 0)
    den.train()
    losses = []
    state.setdefault("seconds", 0.0)  # training wall time, summed over resumed sessions
    start = time.perf_counter()

    def check_finite(values: list[Tensor]) -> Tensor:
        stacked = torch.stack(values).cpu()
        bad = (~torch.isfinite(stacked)).nonzero()
        if len(bad):
            step = state["step"] - len(values) + int(bad[0, 0]) + 1
            raise FloatingPointError(f"{cfg.family}: loss is {float(stacked[bad[0, 0]])} at step {step}; "
                                     f"the last checkpoint ({ckpt}) is kept")
        return stacked

    try:
        while state["step"] < cfg.steps:
            if world > 1:  # each rank its own noise, times and CFG drops: a function of (seed, rank, step)
                torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + state["step"])
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
            x0 = augment(x[idx], shift=cfg.shift, generator=gen) if cfg.shift else x[idx]
            x0, labels = x0[rank::world].to(device), y[idx][rank::world].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = _loss(train_den, cfg, x0, labels if cfg.class_conditional else None, state["step"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(den)
            state["step"] += 1
            losses.append(loss.detach())
            bar.update(1)
            save = ckpt is not None and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps)
            if save or state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                recent = check_finite(losses)  # one device read per log row, before anything is saved
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                mean = float(recent.mean())
                state["history"].append({"step": state["step"], "loss": mean})
                logger.write("train", state["step"], {"loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                losses = []
            if save or state["step"] == cfg.steps:
                now = time.perf_counter()
                state["seconds"] += now - start
                start = now
            if save:
                save_checkpoint({"model": den.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "state": state, "rng": rng_state(), "data_rng": gen.get_state()}, ckpt)
    finally:
        bar.close()
        logger.close()
        release_run(run_path)
    return {"model": den, "ema": ema.module.eval(), "history": state["history"], "steps": state["step"],
            "seconds": state["seconds"]}


def load_image_model(run_dir) -> tuple[ImagePretrainConfig, Denoiser, dict]:
    """``(config, ema_model, info)`` of any image run: a pre-training run, or a run derived from one
    (a distilled student, a reward-tuned model: ``model.json`` records the pre-training config, so
    the network is rebuilt without the original run; the weights are the run's EMA)."""
    from diffpolicy.config import load_config

    run = pathlib.Path(run_dir)
    if not (run / "model.json").is_file():
        cfg, model, step = load_pretrained(run)
        return cfg, model, {"kind": "pretrained", "step": step}
    record = json.loads((run / "model.json").read_text())
    cfg = load_config(ImagePretrainConfig, **record["teacher_config"])
    ema = EMA(make_image_denoiser(cfg), cfg.ema_decay, warmup=True)
    final = run / record.get("final", ".")
    load_state_checked(ema, load_checkpoint(final)["ema"], f"{record.get('method', 'derived')} model", final)
    return cfg, ema.module.eval(), record


def load_pretrained(run_dir) -> tuple[ImagePretrainConfig, Denoiser, int]:
    """``(config, ema_model, step)`` of a pre-training run directory, without training: the EMA
    weights of its checkpoint (loaded weights-only) in a model built from its ``config.json``."""
    from diffpolicy.config import load_config

    run = pathlib.Path(run_dir)
    if not (run / "config.json").exists() or find_checkpoint(run) is None:
        raise FileNotFoundError(f"{run} holds no pre-training run (config.json and {CHECKPOINT}); "
                                "train one with pretrain_images(cfg, run_dir=...) or `diffpolicy image pretrain`")
    cfg = load_config(ImagePretrainConfig, **json.loads((run / "config.json").read_text()))
    saved = load_checkpoint(run)
    ema = EMA(make_image_denoiser(cfg), cfg.ema_decay, warmup=True)
    load_state_checked(ema, saved["ema"], "image denoiser's EMA", run)
    return cfg, ema.module.eval(), int(saved["state"]["step"])


def sample_images(model: Denoiser, n: int, size: int, steps: int, sampler: str = "ddim", *,
                  labels: Tensor | None = None, guidance: float = 1.0, generator: torch.Generator | None = None,
                  **kwargs) -> Tensor:
    """``n`` images ``[n, C, size, size]`` in ``[-1, 1]`` from ``model`` by ``sampler`` with ``steps`` steps.

    With ``labels [n]`` the samples are class-conditional, guided by classifier-free guidance of
    scale ``guidance`` (1: the conditional model alone; the null class is label 10).
    """
    den = model
    if labels is not None and guidance != 1.0:
        den = CFGDenoiser(model, guidance, null_cond=torch.tensor(NUM_CLASSES))
    shape = (n, model.net.in_channels, size, size)
    with torch.no_grad():
        if sampler == "consistency":  # no evaluation at sigma_min, where f is the identity
            x = prior(den, shape, generator=generator)
            x = run_sampler(sampler, den, x, consistency_timesteps(den.schedule, steps), cond=labels,
                            generator=generator, **kwargs)
        else:
            x = sample(den, shape, steps, sampler, cond=labels, generator=generator, **kwargs)
    return x.clamp(-1, 1)

"""Few-step students of an image diffusion model, by method: one entry point for the CLI and the
benchmark. ``distill_images(method, teacher, data, DistillConfig(...), run_dir=...)`` trains the
student(s) with :func:`~diffpolicy.distill.train.train_student` (EMA, logs, exact resume) and
returns ``[(info, ema_student)]`` (progressive distillation: one per halving round).

=========== ==================================================================================
method      what it trains
=========== ==================================================================================
pd          progressive distillation, ``pd_start`` -> 1 steps, a round per halving
cd          consistency distillation (``cd_scales`` discretisation)
reflow      2-rectified flow on the teacher's ODE coupling (``pairs`` pairs, ``pair_steps`` steps)
instaflow   one-step regression onto the 2-rectified flow's endpoints (reflow first)
dmd         DMD: distribution matching + regression on ODE pairs, online fake score (DMD2 rule)
add         adversarial diffusion distillation with a small projection discriminator
=========== ==================================================================================
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

__all__ = ["DISTILL_METHODS", "STUDENT_SAMPLER", "DistillConfig", "distill_images", "distill_run"]

DISTILL_METHODS = ("pd", "cd", "reflow", "instaflow", "dmd", "add")
# how each student samples (one step: DDIM / Euler / consistency at 1 step all land on the x0 prediction)
STUDENT_SAMPLER = {"pd": "ddim", "cd": "consistency", "reflow": "rf_euler", "instaflow": "rf_euler", "dmd": "ddim",
                   "add": "consistency"}


@dataclasses.dataclass
class DistillConfig:
    method: str = "pd"
    student_steps: int = 1_000      # gradient steps per student (per PD round)
    batch_size: int = 128
    lr: float = 1e-4
    pd_start: int = 32              # teacher steps of the first PD round
    cd_scales: int = 50             # consistency-distillation discretisation
    pairs: int = 4096               # teacher ODE pairs (reflow, InstaFlow, DMD)
    pair_steps: int = 32            # ODE steps per pair
    dmd_fake_updates: int = 2       # fake-score updates per generator step (DMD2's two time-scale rule)
    dmd_regression: float = 0.25    # weight of DMD's regression loss
    seed: int = 0


def _classes(teacher) -> int:
    n = getattr(teacher.net, "num_classes", None)
    if not n:
        raise ValueError("distill_images needs a class-conditional teacher (its net's num_classes)")
    return int(n)


def _student_from(teacher):
    student = copy.deepcopy(teacher).train()
    student.net.cfg_dropout = 0.0  # the teacher's targets are conditional: no label dropout in the student
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _batch(x, y, n, gen):
    i = torch.randint(0, len(x), (n,), generator=gen)
    return x[i], y[i]


@torch.no_grad()
def _pairs(teacher, n, steps, sampler, size, seed, channels=1):
    from diffpolicy.distill import ode_pairs

    labels = torch.randint(0, _classes(teacher), (n,), generator=torch.Generator().manual_seed(seed))
    zs, xs = [], []
    for i in range(0, n, 512):
        z, x = ode_pairs(teacher, (min(512, n - i), channels, size, size), steps, cond=labels[i:i + 512], sampler=sampler,
                         generator=torch.Generator().manual_seed(seed + i))
        zs.append(z)
        xs.append(x.clamp(-1, 1))
    return torch.cat(zs), torch.cat(xs), labels


def distill_images(method: str, teacher, data, cfg: DistillConfig | None = None, *, run_dir, progress: bool = True,
                   reflow_dir=None) -> list[tuple[dict, object]]:
    """Distil ``method`` from ``teacher`` (a class-conditional image denoiser, e.g. the EMA model
    of :func:`~diffpolicy.images.pretrain_images`) on ``data = (images, labels)``; returns
    ``[(info, ema_student)]``. InstaFlow trains its reflow model first in ``reflow_dir``
    (default ``run_dir / "reflow"``)."""
    from diffpolicy.distill import (fake_score_loss, one_step, pair_regression_loss,
                                    progressive_distillation_loss, reflow_loss, score_distillation_loss)
    from diffpolicy.distill.train import train_student
    from diffpolicy.losses import consistency_distillation_loss

    if method not in DISTILL_METHODS:
        raise ValueError(f"unknown distillation method {method!r}; valid: {', '.join(DISTILL_METHODS)}")
    c = cfg or DistillConfig(method=method)
    run_dir = Path(run_dir)
    x, y = data
    size = x.shape[-1]
    common = dict(lr=c.lr, progress=progress, seed=c.seed)
    bs = c.batch_size
    if method == "pd":
        out, current = [], teacher
        n = c.pd_start // 2
        while n >= 1:
            student = _student_from(current)
            res = train_student(student, lambda step, g, t=current, s=student, n=n: progressive_distillation_loss(
                s, t, *_batch(x, y, bs, g), student_steps=n, generator=g).mean(),
                steps=c.student_steps, run_dir=run_dir / f"round_{n}", config={"method": "pd", "student_steps": n},
                desc=f"pd {2 * n}->{n}", **common)
            current = res["ema"]
            out.append(({"student_steps": n, "train_seconds": res["seconds"]}, current))
            n //= 2
        return out
    if method == "cd":
        student = _student_from(teacher)
        res = train_student(student, lambda step, g: consistency_distillation_loss(
            student, teacher, *_batch(x, y, bs, g), num_scales=c.cd_scales, generator=g).mean(),
            steps=c.student_steps, run_dir=run_dir, config={"method": "cd", "num_scales": c.cd_scales},
            desc="cd", **common)
        return [({"train_seconds": res["seconds"]}, res["ema"])]
    if method in ("reflow", "instaflow"):
        source = teacher
        if method == "instaflow":  # InstaFlow distils the 2-rectified flow, trained first (its own run)
            source = distill_images("reflow", teacher, data, c, run_dir=reflow_dir or run_dir / "reflow",
                                    progress=progress)[0][1]
        z, xp, lab = _pairs(source, c.pairs, c.pair_steps, "rf_euler", size, c.seed, x.shape[1])
        student = _student_from(source)

        def step_loss(step, g):
            i = torch.randint(0, len(z), (bs,), generator=g)
            if method == "reflow":  # flow matching on the teacher's coupling
                return reflow_loss(student, z[i], xp[i], lab[i], generator=g).mean()
            return pair_regression_loss(student, z[i], xp[i], lab[i]).mean()  # one step onto the 2-RF's endpoints

        res = train_student(student, step_loss, steps=c.student_steps, run_dir=run_dir,
                            config={"method": method, "pairs": c.pairs, "pair_steps": c.pair_steps},
                            desc=method, **common)
        return [({"train_seconds": res["seconds"]}, res["ema"])]
    if method == "dmd":
        z, xp, lab = _pairs(teacher, c.pairs, c.pair_steps, "ddim", size, c.seed, x.shape[1])
        generator_net, fake = _student_from(teacher), _student_from(teacher)
        fake_opt = torch.optim.Adam(fake.parameters(), lr=c.lr)

        def dmd_loss(step, g):
            labels = torch.randint(0, _classes(teacher), (bs,), generator=g)
            for _ in range(c.dmd_fake_updates):  # DMD2's two time-scale rule
                with torch.no_grad():
                    xg = one_step(generator_net, torch.randn(bs, x.shape[1], size, size, generator=g), labels)
                fl = fake_score_loss(fake, xg, labels, generator=g).mean()
                fake_opt.zero_grad(set_to_none=True)
                fl.backward()
                fake_opt.step()
            xg = one_step(generator_net, torch.randn(bs, x.shape[1], size, size, generator=g), labels)
            i = torch.randint(0, len(z), (bs,), generator=g)
            return (score_distillation_loss(xg, teacher, labels, fake=fake, weighting="dmd", generator=g).mean()
                    + c.dmd_regression * pair_regression_loss(generator_net, z[i], xp[i], lab[i]).mean())

        res = train_student(generator_net, dmd_loss, steps=c.student_steps, run_dir=run_dir,
                            config={"method": "dmd", "pairs": c.pairs, "fake_updates": c.dmd_fake_updates,
                                    "regression": c.dmd_regression},
                            aux={"fake": fake, "fake_opt": fake_opt}, desc="dmd", **common)
        return [({"train_seconds": res["seconds"]}, res["ema"])]
    if method == "add":  # 4 student times; a small projection discriminator on clean images
        from diffpolicy.distill import add_losses
        from diffpolicy.distill.adversarial import ConvDiscriminator

        student = _student_from(teacher)
        disc = ConvDiscriminator(x.shape[1], 16, 2, num_classes=_classes(teacher))
        disc_opt = torch.optim.Adam(disc.parameters(), lr=c.lr, betas=(0.0, 0.99))
        times = teacher.schedule.timesteps(4)[:-1]

        pending = {}

        def add_loss(step, g):
            pending.update(add_losses(student, teacher, disc, *_batch(x, y, bs, g), student_times=times,
                                      generator=g))
            return pending["generator"]

        def disc_step(step):  # after the student's backward, which also ran through the discriminator
            disc_opt.zero_grad(set_to_none=True)
            pending.pop("discriminator").backward()
            disc_opt.step()

        res = train_student(student, add_loss, steps=c.student_steps, run_dir=run_dir, config={"method": "add"},
                            aux={"disc": disc, "disc_opt": disc_opt}, desc="add", after_step=disc_step, **common)
        return [({"train_seconds": res["seconds"]}, res["ema"])]
    raise AssertionError(method)


def distill_run(run_dir, teacher_run, cfg: DistillConfig, *, progress: bool = True) -> dict:
    """Distil the EMA model of the pre-training run ``teacher_run`` into ``run_dir`` (resumable) on
    the teacher's training images; writes ``run_dir/model.json`` (the teacher's config, the method,
    where the final student is and how it samples) for :func:`~diffpolicy.images.load_image_model`.
    Returns that record."""
    import json

    from diffpolicy.images import load_digits, load_pretrained

    t_cfg, teacher, t_step = load_pretrained(teacher_run)
    for p in teacher.parameters():
        p.requires_grad_(False)
    run = Path(run_dir)
    trained = distill_images(cfg.method, teacher, load_digits(t_cfg.size, "train"), cfg, run_dir=run,
                             progress=progress)
    info, _ = trained[-1]
    final = run / f"round_{info['student_steps']}" if cfg.method == "pd" else run
    record = {"method": cfg.method, "teacher_run": str(Path(teacher_run).resolve()), "teacher_step": t_step,
              "teacher_config": json.loads(json.dumps(dataclasses.asdict(t_cfg), default=list)),
              "final": str(final.relative_to(run)), "sampler": STUDENT_SAMPLER[cfg.method],
              "steps": info.get("student_steps", 1 if cfg.method in ("instaflow", "dmd") else 4),
              "config": dataclasses.asdict(cfg), "train_seconds": sum(i["train_seconds"] for i, _ in trained)}
    (run / "model.json").write_text(json.dumps({"kind": "student", **record}, indent=1))
    return record

"""One training loop for every distilled student: Adam, EMA, progress bar, CSV + TensorBoard
logs, and checkpoints that resume exactly (student, EMA, optimiser, any auxiliary networks and
their optimisers -- DMD's fake score, ADD's discriminator -- step and RNG states).

The method is the ``loss_fn(step, generator) -> Tensor`` closure: the scalar student loss of
one batch, built from this package's losses. Auxiliary updates happen with their own optimisers,
inside the closure (DMD's fake-score steps, before the student's forward) or in ``after_step``
(ADD's discriminator step, which must follow the student's backward through the discriminator);
pass those modules and optimisers as ``aux`` so the checkpoint holds them.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffpolicy.ema import EMA
from diffpolicy.checkpoint import CHECKPOINT, load_state_checked, save_checkpoint
from diffpolicy.runlog import RunLogger, open_run, release_run, rng_state, set_rng_state

__all__ = ["train_student"]


def train_student(student: nn.Module, loss_fn: Callable[[int, torch.Generator], Tensor], *, steps: int,
                  lr: float = 1e-4, ema_decay: float = 0.999, run_dir=None, config: dict | None = None,
                  aux: dict[str, object] | None = None, seed: int = 0, log_every: int = 100,
                  checkpoint_every: int = 1000, progress: bool = True, desc: str = "distill",
                  after_step: Callable[[int], None] | None = None) -> dict:
    """Train ``student`` for ``steps`` steps of ``loss_fn``; returns ``{"student", "ema", "history",
    "seconds"}`` (``ema`` is the EMA copy in eval mode, the one to sample).

    With ``run_dir`` the run keeps ``config.json`` (``config`` must match on resume), logs and
    ``checkpoint.safetensors``; calling again with a larger ``steps`` continues it. A non-finite loss stops
    the run with its step, keeping the last checkpoint.
    """
    aux = aux or {}
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    ema = EMA(student, ema_decay, warmup=True)
    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0, "history": [], "seconds": 0.0}
    run_path = pathlib.Path(run_dir) if run_dir is not None else None
    ckpt = run_path / CHECKPOINT if run_path is not None else None
    conf = json.loads(json.dumps({**(config or {}), "lr": lr, "ema_decay": ema_decay, "seed": seed}, default=list))
    saved = open_run(run_path, conf, {"steps": steps})  # JSON round trip: tuples compare as the lists saved
    if saved is not None:
        load_state_checked(student, saved["student"], "student", run_path)
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        for name, obj in aux.items():
            if name in saved.get("aux", {}):  # state added since an older run was saved: its default
                obj.load_state_dict(saved["aux"][name])
        state = saved["state"]
        gen.set_state(saved["gen"])
        set_rng_state(saved["rng"])
    logger = RunLogger(run_path, resume_step=state["step"])
    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=not progress)
    losses: list[Tensor] = []
    start = time.perf_counter()
    student.train()
    try:
        while state["step"] < steps:
            loss = loss_fn(state["step"], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(state["step"])
            ema.update(student)
            state["step"] += 1
            losses.append(loss.detach())
            bar.update(1)
            last = state["step"] == steps
            save = ckpt is not None and (state["step"] % checkpoint_every == 0 or last)
            if save or state["step"] % log_every == 0 or last:
                recent = torch.stack(losses).cpu()  # one device read per log row
                if not bool(recent.isfinite().all()):
                    bad = int((~recent.isfinite()).nonzero()[0, 0])
                    raise FloatingPointError(f"{desc}: loss is {float(recent[bad])} at step "
                                             f"{state['step'] - len(losses) + bad + 1}; the last checkpoint ({ckpt}) is kept")
                mean = float(recent.mean())
                losses = []
                state["history"].append({"step": state["step"], "loss": mean})
                logger.write("train", state["step"], {"loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            if save:
                now = time.perf_counter()
                state["seconds"] += now - start
                start = now
                save_checkpoint({"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "aux": {k: v.state_dict() for k, v in aux.items()}, "state": state,
                             "gen": gen.get_state(), "rng": rng_state()}, ckpt)
    finally:
        bar.close()
        logger.close()
        release_run(run_path)
    if ckpt is None:
        state["seconds"] += time.perf_counter() - start
    return {"student": student, "ema": ema.module.eval(), "history": state["history"], "seconds": state["seconds"]}

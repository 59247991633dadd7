"""One training step on a device: float32, bfloat16 autocast and ``torch.compile``, side by side.

What is measured: the wall time of ``agent.update(batch)`` (forward, backward, optimiser steps,
EMA and target updates: everything the offline loop does per step except sampling the batch)
for Hopper-sized Diffusion BC and Diffusion-QL (obs 11, action 3, batch 256; Diffusion-QL
backpropagates through its 5-step chain), and for one image pre-training step of the digits
U-Net (16x16, batch 128, ``ddpm_v``). Four variants of each, as ``TrainConfig`` and
``ImagePretrainConfig`` run them: ``fp32``; ``bf16`` (``torch.autocast(bfloat16)`` around the
update, weights float32); ``compile`` (``compile_networks`` / ``torch.compile`` of the networks,
inductor); ``nn_mish`` (fp32 with ``torch.nn.Mish`` in place of our exp-only
:class:`diffpolicy.nets.activations.Mish`, to show what that buys). Each variant gets its own
copy of the same initial weights, rounds interleave the variants in shuffled order after a
warm-up (compilation happens there), and each timed call ends with a device synchronise; medians
per step are reported with ratios to ``fp32``.

    python benchmarks/train_step.py --device cuda --json benchmarks/results/train_step_cuda.json
    python benchmarks/train_step.py --device cpu --threads 1 --json benchmarks/results/train_step_cpu.json

``--variants`` and ``--jobs`` pick subsets. The committed CPU figures are in
``benchmarks/results/train_step_cpu.{json,md}``; run the CUDA line wherever a GPU is available.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
from tensordict import TensorDict

from diffpolicy.plotting import report_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, shared
from timing import measure  # noqa: E402

VARIANTS = ("fp32", "bf16", "compile", "nn_mish")
OBS, ACT, BATCH = 11, 3, 256


def _batch(device, generator) -> TensorDict:
    r = lambda *s: torch.randn(*s, generator=generator).to(device)  # noqa: E731
    done = torch.zeros(BATCH, 1, dtype=torch.bool, device=device)
    return TensorDict({"observation": r(BATCH, OBS), "action": r(BATCH, ACT).clamp(-1, 1),
                       "next": {"observation": r(BATCH, OBS), "reward": r(BATCH, 1), "terminated": done,
                                "done": done, "truncated": done}}, batch_size=[BATCH], device=device)


def with_torch_mish(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every :class:`diffpolicy.nets.activations.Mish` swapped for ``torch.nn.Mish``."""
    from diffpolicy.nets.activations import Mish

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Mish):
                setattr(parent, name, torch.nn.Mish())
    return module


def agent_steps(name: str, device, variants) -> dict:
    """``{variant: step()}`` for offline agent ``name``, each variant on its own copy of one agent."""
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import compile_networks

    torch.manual_seed(0)
    base = make_agent(name, OBS, ACT).to(device).train()
    batches = [_batch(device, torch.Generator().manual_seed(i)) for i in range(8)]
    steps = {}
    for v in variants:
        agent = copy.deepcopy(base)
        if v == "compile":
            compile_networks(agent)
        if v == "nn_mish":
            with_torch_mish(agent)
        it = iter(range(10**9))

        def step(agent=agent, bf16=v == "bf16", it=it):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                agent.update(batches[next(it) % len(batches)])
        steps[v] = step
    return steps


def image_steps(device, variants) -> dict:
    """``{variant: step()}``: one digits pre-training step as ``pretrain_images`` runs it (loss,
    backward, Adam, EMA), 16x16, batch 128, ``ddpm_v``."""
    from diffpolicy.ema import EMA
    from diffpolicy.images.pretrain import ImagePretrainConfig, _loss, make_image_denoiser

    cfg = ImagePretrainConfig(family="ddpm_v", batch_size=128, size=16)
    torch.manual_seed(0)
    base = make_image_denoiser(cfg).to(device).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 16, 16, generator=g).to(device), torch.randint(10, (128,), generator=g).to(device)
    steps = {}
    for v in variants:
        den = copy.deepcopy(base)
        if v == "compile":
            den.net.compile()
        if v == "nn_mish":
            with_torch_mish(den)
        opt, ema = torch.optim.Adam(den.parameters(), lr=cfg.lr), EMA(den, cfg.ema_decay, warmup=True)

        def step(den=den, opt=opt, ema=ema, bf16=v == "bf16"):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = _loss(den, cfg, x, y, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(den)
        steps[v] = step
    return steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--jobs", nargs="+", default=["diffusion_bc", "diffusion_ql", "image_ddpm_v"],
                   choices=["diffusion_bc", "diffusion_ql", "image_ddpm_v"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    ms = {}
    for job in args.jobs:
        steps = image_steps(device, args.variants) if job.startswith("image") else agent_steps(job, device, args.variants)
        ms[job] = measure(steps, args.rounds, args.warmup, sync)
        print(job, {k: round(v, 3) for k, v in ms[job].items()}, flush=True)
    res = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
           "ms_per_step": {j: {k: round(v, 4) for k, v in m.items()} for j, m in ms.items()},
           "ratio_vs_fp32": {j: {k: round(v / m["fp32"], 4) for k, v in m.items()} for j, m in ms.items() if "fp32" in m}}
    lines = [f"Training step, {res['device']}, {res['threads']} thread(s), torch {res['torch']}, "
             f"median of {args.rounds} interleaved rounds", "",
             "| job | " + " | ".join(f"{v} (ms)" for v in args.variants) + " | "
             + " | ".join(f"{v}/fp32" for v in args.variants if v != "fp32") + " |",
             "|---|" + "---:|" * (2 * len(args.variants) - ("fp32" in args.variants))]
    for j, m in ms.items():
        ratios = [f"{m[v] / m['fp32']:.3f}" if "fp32" in m else "n/a" for v in args.variants if v != "fp32"]
        lines.append(f"| {j} | " + " | ".join(f"{m[v]:.3f}" for v in args.variants) + " | " + " | ".join(ratios) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    report_file(args.json, ".md").write_text(md)
    return res


if __name__ == "__main__":
    main()

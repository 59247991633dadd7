"""Per-sampling overhead of ``diffpolicy.samplers.sample_ddim`` against a bare loop and diffusers.

What is measured: the wall time of one full 20-step DDIM sampling (eta = 0) of a Diffusion-QL
size denoiser, ``MLPDenoiser(x_dim=3, obs_dim=11)`` (3x256 Mish MLP), conditioned on an 11-d
observation, on ``DiscreteVP(1000)`` (linear betas, final alpha 1), at batch 1
(latency bound: per-step Python/dispatch overhead dominates) and batch 256 (compute bound).

Three variants, all under ``torch.no_grad()`` and ``torch.set_num_threads(--threads)`` (1):

* ``ours``: ``sample_ddim(Denoiser(net, schedule, "eps"), x, schedule.timesteps(20), cond=obs)``,
  all included (grid preparation, denoiser wrapper); grid: the default "trailing" (``SPACING``).
* ``bare``: the same 20 forwards ``net(x_k, t_k, obs)`` on the very inputs ``x_k`` our sampler
  feeds the net (recorded once) with precomputed ``t_k [B]`` tensors and no other arithmetic:
  the floor any sampler can reach.
* ``diffusers``: ``DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
  set_alpha_to_one=True, clip_sample=False, timestep_spacing=SPACING)`` (ours does not clip),
  ``set_timesteps(20)`` once outside the timing, then the user loop
  ``for t in scheduler.timesteps: eps = net(x, t.expand(B), obs); x = scheduler.step(eps, t, x).prev_sample``.

Before timing, ours and the diffusers loop must give the same samples from the same noise
(``allclose``, atol 1e-4 and the default rtol 1e-5: the untrained net's samples are O(100), so
float32 rounding alone is ~1e-4 absolute; the max abs/rel differences are in the JSON). Timing
interleaves the three variants round-robin (shuffled order each round, after warmup) so machine
noise hits them alike, and reports the median time per full sampling. Ratios: ours / reference.

With ``--device cuda`` everything runs on the GPU (each timed call ends with a synchronise) and a
fourth variant is added: ``graphed``, the same sampling through ``diffpolicy.graphs.GraphedSampler``
(the whole chain replayed from one CUDA graph); its ratio to ``ours`` is ``graphed_ratio_vs_ours``.
The CPU targets do not apply on a GPU and are reported as "n/a" there.

Usage: ``python benchmarks/sampler_speed.py --json PATH [--md PATH] [--repeats R] [--threads T] [--device D]``
(``--repeats`` scales the rounds: R at batch 1, max(R // 6, 10) at batch 256; default 200).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import diffusers
import torch

from diffpolicy.denoiser import Denoiser
from diffpolicy.graphs import GraphedSampler
from diffpolicy.nets.mlp import MLPDenoiser
from diffpolicy.plotting import report_file
from diffpolicy.samplers import sample_ddim
from diffpolicy.schedules import DiscreteVP

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, shared
from timing import measure  # noqa: E402

STEPS, X_DIM, OBS_DIM, SPACING = 20, 3, 11, "trailing"
TARGETS = {"batch1_ratio_vs_bare": 1.25, "batch1_ratio_vs_diffusers": 0.6, "batch256_ratio_vs_bare": 1.05}


def make_variants(net, B: int, seed: int = 0, device="cpu"):
    schedule = DiscreteVP(1000)
    denoiser, ts = Denoiser(net, schedule, "eps"), schedule.timesteps(STEPS, spacing=SPACING)
    g = torch.Generator().manual_seed(seed)
    x0, obs = torch.randn(B, X_DIM, generator=g).to(device), torch.randn(B, OBS_DIM, generator=g).to(device)
    t_bare = [torch.full((B,), float(t), device=device) for t in ts[:-1].tolist()]
    x_bare = []  # the inputs our sampler feeds the net, so bare runs the very same forwards
    sample_ddim(denoiser, x0, ts, cond=obs, callback=lambda d: x_bare.append(d["x"].clone()))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                                     clip_sample=False, timestep_spacing=SPACING)
    sched.set_timesteps(STEPS, device=device)

    def run_ours():
        return sample_ddim(denoiser, x0, ts, cond=obs)

    def run_bare():
        for x, t in zip(x_bare, t_bare):
            out = net(x, t, obs)
        return out

    def run_diffusers():
        x = x0
        for t in sched.timesteps:
            eps = net(x, t.expand(B), obs)
            x = sched.step(eps, t, x).prev_sample
        return x

    variants = {"ours": run_ours, "bare": run_bare, "diffusers": run_diffusers}
    if torch.device(device).type == "cuda":
        graphed = GraphedSampler(denoiser, (B, X_DIM), ts, "ddim", cond=obs)
        variants["graphed"] = lambda: graphed(obs, x0)
    return variants


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the JSON results")
    p.add_argument("--md", default=None, help="Markdown table path (default: JSON path with .md)")
    p.add_argument("--repeats", type=int, default=200, help="rounds at batch 1 (batch 256: R // 6)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cuda adds the CUDA-graph variant)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    net = MLPDenoiser(x_dim=X_DIM, obs_dim=OBS_DIM).eval().to(device)
    ms, diff = {}, {}
    with torch.no_grad():
        for B, rounds in ((1, args.repeats), (256, max(args.repeats // 6, 10))):
            v = make_variants(net, B, device=device)
            a, b = v["ours"](), v["diffusers"]()
            diff[B] = {"abs": float((a - b).abs().max()), "rel": float(((a - b) / b).abs().max())}
            assert torch.allclose(a, b, atol=1e-4), f"batch {B}: ours and diffusers differ by {diff[B]}"
            if cuda:
                c = v["graphed"]()
                diff[B]["graphed_abs"] = float((c - a).abs().max())
                assert torch.allclose(c, a, atol=1e-4), f"batch {B}: graphed and eager differ by {diff[B]}"
            ms[B] = measure(v, rounds, warmup=max(rounds // 10, 3), sync=sync)
    ratios = {"batch1_ratio_vs_bare": ms[1]["ours"] / ms[1]["bare"],
              "batch1_ratio_vs_diffusers": ms[1]["ours"] / ms[1]["diffusers"],
              "batch256_ratio_vs_bare": ms[256]["ours"] / ms[256]["bare"]}
    if cuda:
        ratios.update({f"batch{B}_graphed_ratio_vs_ours": ms[B]["graphed"] / ms[B]["ours"] for B in ms})
    res = {**{k: round(r, 4) for k, r in ratios.items()},
           "batch1_ms": {k: round(t, 4) for k, t in ms[1].items()},
           "batch256_ms": {k: round(t, 4) for k, t in ms[256].items()},
           "targets": {k: {"target": t, "value": round(ratios[k], 4), "met": bool(ratios[k] <= t) if not cuda else None}
                       for k, t in TARGETS.items()},
           "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "diff_vs_diffusers": {f"batch{B}": d for B, d in diff.items()},
           "steps": STEPS, "spacing": SPACING, "repeats": args.repeats, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
           "machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; CPU "
                      f"shared with other work, so timings are medians of interleaved rounds"}
    g_head, g_sep = (" graphed (ms) | graphed/ours |", "---:|---:|") if cuda else ("", "")
    lines = [f"DDIM {STEPS} {SPACING} steps, MLPDenoiser(3, obs 11), {res['device']}, {res['threads']} thread(s), "
             f"torch {res['torch']}", "",
             f"| batch | ours (ms) | bare (ms) | diffusers (ms) | ours/bare | ours/diffusers |{g_head}",
             f"|---:|---:|---:|---:|---:|---:|{g_sep}"]
    lines += [f"| {B} | {m['ours']:.3f} | {m['bare']:.3f} | {m['diffusers']:.3f} | {m['ours'] / m['bare']:.3f} | "
              f"{m['ours'] / m['diffusers']:.3f} |" + (f" {m['graphed']:.3f} | {m['graphed'] / m['ours']:.3f} |"
                                                       if cuda else "") for B, m in ms.items()]
    lines += ["", "| target (CPU) | value | goal | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {k} | {t['value']:.3f} | <= {t['target']} | "
              f"{'n/a (GPU)' if t['met'] is None else 'yes' if t['met'] else 'no'} |" for k, t in res["targets"].items()]
    md = "\n".join(lines) + "\n"
    print(md)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    Path(args.md or report_file(args.json, ".md")).write_text(md)
    return res


if __name__ == "__main__":
    main()

"""Contextual-bandit demonstration that the chain core learns: DDPO-SF, DDPO-IS, DRWR and QSM.

Context: one of C classes (one-hot); action: a 2-D point; reward ``-|a - target_c|^2`` (optimal
0 at a class-specific target on a circle of radius 1.5). Every method starts from the same
diffusion policy pre-trained on a broad action distribution (N(0, I) for every class) and gets
the same sample budget (iterations x batch of chains of K = 10 DDPM steps). Also measured, in
the same process: ``rollout_ratio_vs_bare`` (a K=10 rollout with log-probs at batch 256 of a
3x256 MLP policy against 10 bare forwards of that network) and the autograd memory of
fine-tuning K'=2 versus K'=10 of K=20 steps (bytes of tensors saved for backward).

Usage: ``python benchmarks/chain_bandit.py --json PATH [--iters N] [--quick]``; writes PATH,
PATH with .md and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from diffpolicy.advantage import PerContextStandardizer, reward_weights
from diffpolicy.chain import rollout, set_reward
from diffpolicy.chain_losses import ChainPPOLoss, ChainScoreFunctionLoss, QScoreMatchingLoss, RewardWeightedLoss
from diffpolicy.denoiser import Denoiser
from diffpolicy.losses import diffusion_loss
from diffpolicy.nets import MLPDenoiser
from diffpolicy.plotting import png_figure, report_file
from diffpolicy.schedules import DiscreteVP

C, K, BATCH, MIN_STD = 4, 10, 256, 0.05
TARGETS = 1.5 * torch.stack([torch.cos(torch.arange(C) * 6.2832 / C), torch.sin(torch.arange(C) * 6.2832 / C)], -1)


def reward(a, c):
    return -((a - TARGETS[c]) ** 2).sum(-1)


def contexts(n, g):
    c = torch.randint(0, C, (n,), generator=g)
    return c, torch.nn.functional.one_hot(c, C).float()


def pretrain(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    den = Denoiser(MLPDenoiser(2, obs_dim=C, hidden=64, depth=3, time_dim=16), DiscreteVP(100), "eps")
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(1500):
        _, obs = contexts(512, g)
        loss = diffusion_loss(den, torch.randn(512, 2, generator=g), obs, generator=g).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    return den


def chains(den, g, n=BATCH):
    c, obs = contexts(n, g)
    with torch.no_grad():
        td = rollout(den, torch.randn(n, 2, generator=g), den.schedule.timesteps(K), obs, min_std=MIN_STD,
                     min_logprob_std=MIN_STD, generator=g)
    r = reward(td["next", "x"][:, -1], c)
    return c, obs, set_reward(td, r), r


def evaluate(den, seed=123):
    return float(chains(den, torch.Generator().manual_seed(seed), 2048)[3].mean())


def finetune(name: str, base: Denoiser, iters: int, seed: int):
    den = copy.deepcopy(base)
    opt = torch.optim.Adam(den.parameters(), lr=1e-3 if name != "qsm" else 3e-4)
    g = torch.Generator().manual_seed(seed)
    stats = PerContextStandardizer(buffer_size=64, min_count=16)
    critic = torch.nn.Sequential(torch.nn.Linear(C + 2, 128), torch.nn.Mish(), torch.nn.Linear(128, 128),
                                 torch.nn.Mish(), torch.nn.Linear(128, 1))
    copt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    q = lambda obs, a: critic(torch.cat([obs, a], -1)).squeeze(-1)
    losses = {"ddpo_sf": ChainScoreFunctionLoss(den, min_logprob_std=MIN_STD),
              "ddpo_is": ChainPPOLoss(den, min_logprob_std=MIN_STD, clip_epsilon=0.2, advantage_clip=5.0),
              "drwr": RewardWeightedLoss(den, normalize=True),
              "qsm": QScoreMatchingLoss(den, q, q_coeff=1.0)}
    loss_fn, curve = losses[name], []
    for it in range(iters):
        c, obs, td, r = chains(den, g)
        curve.append(float(r.mean()))
        if name in ("ddpo_sf", "ddpo_is"):
            td["advantage"] = stats(c, r).unsqueeze(1).expand(BATCH, K)
            flat = td.reshape(-1)
            for _ in range(1 if name == "ddpo_sf" else 4):
                for mb in flat[torch.randperm(len(flat), generator=g)].split(len(flat) // 4):
                    opt.zero_grad(), loss_fn(mb)["loss_objective"].backward(), opt.step()
        elif name == "drwr":
            data = td[:, -1].select().update({"action": td["next", "x"][:, -1], "observation": obs,
                                              "weight": reward_weights(r - r.max(), beta=4.0)})
            for _ in range(4):
                opt.zero_grad(), loss_fn(data)["loss_diffusion"].backward(), opt.step()
        else:  # QSM: fit Q by regression on the bandit's rewards (a one-step TD target), then match
            a = td["next", "x"][:, -1]
            for _ in range(20):
                copt.zero_grad(), ((q(obs, a) - r) ** 2).mean().backward(), copt.step()
            data = td[:, -1].select().update({"action": a, "observation": obs})
            for _ in range(4):
                opt.zero_grad(), loss_fn(data)["loss_qsm"].backward(), opt.step()
    return den, curve


def rollout_ratio(repeats: int = 30) -> float:
    torch.manual_seed(0)
    net = MLPDenoiser(3, obs_dim=11).eval()
    den = Denoiser(net, DiscreteVP(1000), "eps")
    x, obs = torch.randn(256, 3), torch.randn(256, 11)
    ts = den.schedule.timesteps(10)
    tv = [torch.full((256,), float(t)) for t in ts[:-1].tolist()]
    fused = lambda: rollout(den, x, ts, obs, min_logprob_std=0.1)
    bare = lambda: [net(x, t, obs) for t in tv]
    times = {"fused": [], "bare": []}
    with torch.no_grad():
        for r in range(repeats + 3):
            for k, f in (("fused", fused), ("bare", bare)) if r % 2 else (("bare", bare), ("fused", fused)):
                t0 = time.perf_counter()
                f()
                if r >= 3:
                    times[k].append(time.perf_counter() - t0)
    return statistics.median(times["fused"]) / statistics.median(times["bare"])


def saved_bytes(train_steps: int) -> int:
    """Bytes of tensors autograd saves for a K=20 rollout that fine-tunes the last ``train_steps``."""
    torch.manual_seed(0)
    den = Denoiser(MLPDenoiser(3, obs_dim=11), DiscreteVP(1000), "eps")
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rollout(den, torch.randn(256, 3), den.schedule.timesteps(20), torch.randn(256, 11), train_steps=train_steps,
                frozen=copy.deepcopy(den), grad=True, min_logprob_std=0.1)
    return total[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--iters", type=int, default=60, help="fine-tuning iterations (x 256 chains each)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 iterations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    iters = 8 if args.quick else args.iters
    torch.set_num_threads(1)
    base = pretrain(args.seed)
    before = evaluate(base)
    res = {"methods": {}, "iters": iters, "batch": BATCH, "K": K, "samples_per_method": iters * BATCH}
    curves = {}
    for name in ("ddpo_sf", "ddpo_is", "drwr", "qsm"):
        t0 = time.perf_counter()
        den, curves[name] = finetune(name, base, iters, args.seed + 1)
        after = evaluate(den)
        res["methods"][name] = {"reward_before": before, "reward_after": after, "reward_optimal": 0.0,
                                "gap_closed": (after - before) / (0.0 - before), "seconds": time.perf_counter() - t0}
        print(f"{name}: reward {before:.3f} -> {after:.3f} (gap closed {res['methods'][name]['gap_closed']:.2f})")
    res["rollout_ratio_vs_bare"] = rollout_ratio()
    res["saved_bytes_train_last_2_of_20"] = saved_bytes(2)
    res["saved_bytes_train_last_10_of_20"] = saved_bytes(10)
    res["targets"] = {"gap_closed_min": 0.5, "rollout_ratio_vs_bare_max": 1.3,
                      "met": all(m["gap_closed"] >= 0.5 for m in res["methods"].values())
                      and res["rollout_ratio_vs_bare"] <= 1.3}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = ["| method | reward before | reward after | optimal | gap closed | seconds |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {k} | {m['reward_before']:.3f} | {m['reward_after']:.3f} | 0 | {m['gap_closed']:.2f} | {m['seconds']:.0f} |"
           for k, m in res["methods"].items()]
    md += ["", f"rollout_ratio_vs_bare (K=10, batch 256, 3x256 MLP): {res['rollout_ratio_vs_bare']:.3f} (target <= 1.3)",
           f"autograd saved tensors, K=20: last 2 steps {res['saved_bytes_train_last_2_of_20'] / 2**20:.1f} MiB, "
           f"last 10 steps {res['saved_bytes_train_last_10_of_20'] / 2**20:.1f} MiB",
           f"budget: {iters} iterations x {BATCH} chains x K={K} DDPM steps per method"]
    report_file(out, ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    with png_figure(report_file(out, ".png")) as (_, axes):
        ax = axes[0, 0]
        for k, v in curves.items():
            ax.plot([(i + 1) * BATCH for i in range(len(v))], v, label=k)
        ax.axhline(0.0, color="k", ls="--", lw=0.8, label="optimal")
        ax.set_xlabel("samples"), ax.set_ylabel("mean reward"), ax.legend(), ax.set_title("chain bandit")
    return res


if __name__ == "__main__":
    main()

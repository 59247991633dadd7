"""Offline RL benchmark: every agent on local D4RL-style datasets, D4RL-normalised scores.

For each dataset quality (default: medium, medium-replay, medium-expert of ``--env``, made with
:func:`diffpolicy.envs.make_dataset` or reused from the local Minari directory), each agent and
each seed, one run of :func:`diffpolicy.agents.trainer.train_offline` with the same
gradient-step budget, batch and evaluation protocol. Every run lives in its own directory
``<runs>/<env>/<quality>/<agent>/seed<k>/`` (checkpoint, CSV/TensorBoard logs; not committed) and,
when it finishes, writes its result to ``benchmarks/results/offline_runs/<env>/<quality>/<agent>/seed<k>.json``
(committed); the table is assembled from whatever results exist, so an interrupted sweep
continues where it stopped (an unfinished run resumes from its checkpoint; ``--assemble`` only
rebuilds the table).

Reported per (dataset, agent): the normalised score of the final checkpoint (mean over
``--final-episodes`` episodes, default 50, then mean ± std over seeds; the learning curves use
``--eval-episodes``), training wall time (evaluations
excluded) and inference latency per action (batch 1, mean over consecutive calls, so action
chunks are amortised). Also, measured in this process:
``throughput_ratio_vs_bare``, diffusion BC's gradient steps per second through the shared loop
(replay buffer, loss, EMA, logging) against a bare PyTorch loop with the same network and batch.

Usage::

    python benchmarks/offline.py --quick                        # smoke run, Pendulum-v1, minutes
    python benchmarks/offline.py --steps 100000 --seeds 0 1 2   # the full Hopper-v5 run
    python benchmarks/offline.py --assemble                     # table from finished runs only
    python benchmarks/offline.py --rescore                      # final evaluations finished runs lack
    python benchmarks/offline.py --assemble --measure           # ... plus throughput and latency, measured now

Writes ``--out`` ``.json``, ``.md`` and ``.png`` (learning curves).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from diffpolicy.plotting import png_figure, report_file, seed_spread

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # benchmarks/timing.py, shared
from timing import measured_before  # noqa: E402

DEFAULT_AGENTS = ["gaussian_bc", "diffusion_bc", "diffusion_bc_t0", "td3_bc", "iql", "idql", "diffusion_ql", "consistency_bc",
                  "consistency_bc_cd", "consistency_ac", "diffusion_policy"]
DEFAULT_QUALITIES = ["medium-replay", "medium", "medium-expert"]
#: Rows scored from another agent's trained runs, acting differently (acting-only settings; no training):
#: diffusion BC acting by its noise-free path from x_T = 0 (DDIM, temperature 0), the counterpart of
#: Gaussian BC acting by its mean.
VARIANTS = {"diffusion_bc_t0": ("diffusion_bc", {"sampler": "ddim", "temperature": 0.0})}


def agent_settings(name: str, steps: int, run_root: Path, quality: str, seed: int, quick: bool) -> dict:
    """Per-agent settings for this budget (everything else: the agent's paper defaults)."""
    s: dict = {}
    if name.startswith("consistency"):
        s["ct_total_steps"] = steps
    if name == "consistency_bc_cd":  # distilled from the diffusion BC run of the same data and seed
        s["teacher_path"] = str(run_root / quality / "diffusion_bc" / f"seed{seed}" / "checkpoint.pt")
    if name == "diffusion_policy":  # a CPU-sized U-Net and the paper's 10-step DDIM inference
        s.update(down_dims=(32, 64, 128), time_dim=32, sampler="ddim", inference_steps=10, lr_decay_steps=steps)
    if quick and name not in ("gaussian_bc", "td3_bc", "iql", "diffusion_policy"):
        s.update(ema_start=min(100, steps // 4))
    return s


def latency_ms(agent, obs_dim: int, repeats: int = 120) -> float:
    """Mean wall time of ``agent.act`` on one observation: per action, so a chunking agent's plan
    is amortised over the actions it executes (hence the mean over consecutive calls, not the median)."""
    agent.eval()
    obs = torch.zeros(1, obs_dim)
    agent.reset()
    for _ in range(5):
        agent.act(obs)
    times = []
    for _ in range(repeats):  # a multiple of any action-chunk length up to 10
        t = time.perf_counter()
        agent.act(obs)
        times.append(time.perf_counter() - t)
    agent.reset()
    return 1000 * statistics.fmean(times)


def latency_table(obs_dim: int, act_dim: int, agents, steps: int, rounds: int = 5) -> dict[str, float]:
    """Per-action latency of every agent at its benchmark settings (weights do not change the cost):
    the median over ``rounds`` interleaved passes, so a busy machine slows every agent alike."""
    from diffpolicy.agents import make_agent

    built = {}
    for name in agents:
        base, variant = VARIANTS.get(name, (name, {}))
        settings = {**agent_settings(base, steps, Path("."), "", 0, False), **variant}
        settings.pop("teacher_path", None)
        if name == "consistency_bc_cd":  # a teacher only shapes the student's training, not its acting cost
            from diffpolicy.agents.diffusion_bc import DiffusionBC

            settings["teacher"] = DiffusionBC(obs_dim, act_dim)
        built[name] = make_agent(base, obs_dim, act_dim, **settings)
        if name == "consistency_bc":  # the one-step sampler of the same model
            built["consistency_bc_1step"] = make_agent(base, obs_dim, act_dim, **{**settings, "sample_steps": 1})
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, agent in built.items():
            times[name].append(latency_ms(agent, obs_dim))
    return {name: statistics.median(t) for name, t in times.items()}


def train_run(env_id, quality, data, name, seed, args, run_root: Path):
    """Train (or resume, or just open) the run directory of (``quality``, ``name``, ``seed``): ``(agent, out)``."""
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline

    torch.manual_seed(seed)
    agent = make_agent(name, data.obs_dim, data.act_dim, **agent_settings(name, args.steps, run_root, quality, seed,
                                                                         args.quick))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, eval_every=args.eval_every,
                      eval_episodes=args.eval_episodes, seed=seed, log_every=max(1, min(1000, args.steps // 10)),
                      compile=args.compile)
    out = train_offline(agent, data, cfg, env_id=env_id, run_dir=run_root / quality / name / f"seed{seed}",
                        progress=not args.no_progress)
    return agent, out


def run_one(env_id, quality, data, name, seed, args, run_root: Path, result_root: Path) -> dict | None:
    """Train (or resume) one run and score it; its result file makes a later call free. ``None``
    with ``args.rescore`` for a run not finished under this budget (nothing is trained)."""
    from diffpolicy.agents import agent_class

    base, variant = VARIANTS.get(name, (name, {}))
    run_dir = run_root / quality / base / f"seed{seed}"
    result_path = result_root / quality / name / f"seed{seed}.json"
    settings = agent_settings(base, args.steps, run_root, quality, seed, args.quick)
    cls = agent_class(base)
    defaults = cls.config_class()
    acting = {**{k: settings.get(k, getattr(defaults, k)) for k in cls.acting_fields}, **variant}
    res = None
    if result_path.exists():
        old = json.loads(result_path.read_text())
        if old["steps"] == args.steps and old["batch_size"] == args.batch:
            res = old  # finished under this budget (another budget: train on from the checkpoint)
    if res is None and variant:  # the base agent's run (trained first if need be), acting otherwise
        trained = run_one(env_id, quality, data, base, seed, args, run_root, result_root)
        if trained is None:
            return None
        res = {k: v for k, v in trained.items() if k not in ("final_eval", "curve_score")}
        res.update(agent=name, history=[], variant_of=base)  # its curve was measured acting as the base
    if res is None:
        if getattr(args, "rescore", False):
            return None
        if name == "consistency_bc_cd":  # its teacher's run directory, finished: on another machine (or after
            # the run directories were cleared) only the teacher's result file is left, so train it again; a
            # seeded run is reproducible, and a finished one returns at once
            train_run(env_id, quality, data, "diffusion_bc", seed, args, run_root)
        agent, out = train_run(env_id, quality, data, name, seed, args, run_root)
        res = {"env": env_id, "dataset": data.dataset_id, "agent": name, "seed": seed, "steps": out["steps"],
               "score": out["final"]["score_mean"], "return": out["final"]["return_mean"],
               "train_seconds": out["train_seconds"], "latency_ms": latency_ms(agent, data.obs_dim),
               "history": out["history"], "batch_size": args.batch, "eval_episodes": args.eval_episodes,
               "compile": args.compile, "ref_scores": [data.ref_min_score, data.ref_max_score]}
        _write(result_path, res)
    done = res.get("final_eval", {})
    if done.get("episodes") != args.final_episodes or done.get("acting") != acting:
        res = final_evaluation(res, run_dir, data, acting, args.final_episodes)
        _write(result_path, res)
    return res


def data_references(run: dict) -> tuple[float, float] | None:
    """The reference returns ``(random, expert)`` of the dataset a result file's run was scored on:
    as recorded (``ref_scores``), or, in files written before they were, solved from the run's
    (normalised score, return) pairs, as ``score = 100 (R - ref_min) / (ref_max - ref_min)`` is a line
    (``envs.datasets.normalized_score``). ``None`` with fewer than two distinct pairs (an acting variant)."""
    if run.get("ref_scores"):
        return tuple(run["ref_scores"])
    pairs = {(h["score_mean"], h["return_mean"]) for h in run.get("history", []) if "return_mean" in h}
    if "return" in run:
        pairs.add((run["score"], run["return"]))
    (s0, r0), (s1, r1) = min(pairs, default=(0, 0)), max(pairs, default=(0, 0))
    if s1 == s0:
        return None
    slope = (r1 - r0) / (s1 - s0)  # (ref_max - ref_min) / 100
    return r0 - slope * s0, r0 + slope * (100.0 - s0)


def check_same_data(result_root: Path, quality: str, data) -> None:
    """Stop before anything trains when the store already holds runs of ``quality`` scored on other data.

    The datasets are made here, from an SB3 behaviour run, and that run depends on the machine's BLAS
    kernels (see the README): a dataset rebuilt on another machine can differ, and runs on it would
    not be comparable with the stored ones. Reference returns tell the two apart."""
    mine = (data.ref_min_score, data.ref_max_score)
    if None in mine:
        return
    scale = 1e-6 * abs(mine[1] - mine[0])  # references solved from rounded scores are close, not equal
    for path in sorted((result_root / quality).glob("*/seed*.json")):
        theirs = data_references(json.loads(path.read_text()))
        if theirs is None or all(math.isclose(a, b, rel_tol=1e-6, abs_tol=scale) for a, b in zip(mine, theirs)):
            continue
        raise SystemExit(
            f"{data.dataset_id}: the local dataset's reference returns (random {mine[0]:.2f}, expert {mine[1]:.2f}) "
            f"differ from those of the runs already in {result_root / quality} (random {theirs[0]:.2f}, expert "
            f"{theirs[1]:.2f}; e.g. {path.relative_to(result_root)}). It was made by another behaviour run, so new runs "
            "would not be comparable with them. Rebuild the datasets as those were made (README, 'Reproducing the "
            "datasets'), or put this sweep in another store: --results DIR --out STEM.")


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def final_evaluation(res: dict, run_dir: Path, data, acting: dict, episodes: int) -> dict:
    """The table's score of a finished run: its final checkpoint on ``episodes`` episodes (the
    same episode seeds for every run; the policy's own noise seeded by the run's seed), acting
    under the agent's current acting-only settings (``acting_fields``; the trained weights do not
    depend on them, so a changed default re-scores the run instead of training it again).

    Ten evaluation episodes (the learning curves') leave a standard error of about 3 points on
    Hopper, as large as the gaps the targets ask about; the curves stay as measured in training
    and their last point is kept as ``curve_score``."""
    import dataclasses

    from diffpolicy.agents import load_agent
    from diffpolicy.agents.trainer import TrainConfig, evaluate_agent

    agent = load_agent(run_dir)
    trained = {k: getattr(agent.config, k) for k in acting}
    agent.config = dataclasses.replace(agent.config, **acting)
    torch.manual_seed(res["seed"])
    r = evaluate_agent(agent, data, res["env"], episodes=episodes, seed=TrainConfig.eval_seed)
    curve = res["history"][-1]["score_mean"] if res.get("history") else None  # a variant has no curve
    return {**res, "score": r.score_mean, "return": r.return_mean, "score_episode_std": r.score_std,
            "curve_score": res.get("curve_score", curve),
            "final_eval": {"episodes": episodes, "acting": acting, "trained_with": trained}}


def throughput_ratio(data, steps: int = 300, rounds: int = 3) -> dict:
    """Diffusion BC steps/s through ``train_offline`` against a bare loop, same net and batch, interleaved."""
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline
    from diffpolicy.losses import diffusion_loss

    batch = 256
    agent = make_agent("diffusion_bc", data.obs_dim, data.act_dim)
    net = make_agent("diffusion_bc", data.obs_dim, data.act_dim).actor  # same architecture, own weights
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    td = data.transitions()
    obs, act = td["observation"], td["action"]
    n = obs.shape[0]

    def bare():
        t = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(n, (batch,))
            loss = diffusion_loss(net, act[idx], obs[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps / (time.perf_counter() - t)

    def ours():  # the loop's own clock: sampling, update, EMA, logging; not its one-off setup
        out = train_offline(agent, data, TrainConfig(steps=steps, batch_size=batch, log_every=100), evaluate=False,
                            progress=False)
        return steps / out["train_seconds"]

    bare(), ours()  # warm-up
    b, o = [], []
    for _ in range(rounds):
        b.append(bare())
        o.append(ours())
    return {"ours_steps_per_s": statistics.median(o), "bare_steps_per_s": statistics.median(b),
            "ratio": statistics.median(o) / statistics.median(b)}


def assemble(result_root: Path, env_id: str, qualities, agents, steps: int | None = None) -> dict:
    """Mean ± std over the finished seeds of each (quality, agent); only runs of ``steps`` steps when given."""
    results, curves = {}, {}
    for q in qualities:
        for name in agents:
            runs = [json.loads(p.read_text()) for p in sorted((result_root / q / name).glob("seed*.json"))]
            runs = [r for r in runs if steps is None or r["steps"] == steps]
            if not runs:
                continue
            scores = [r["score"] for r in runs]
            results.setdefault(q, {})[name] = {
                "score_mean": statistics.fmean(scores), "score_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
                "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
                "latency_ms": statistics.fmean(r["latency_ms"] for r in runs),
                "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"],
            }
            if not runs[0]["history"]:  # an acting variant: no curve of its own
                continue
            curves.setdefault(q, {})[name] = [[h["step"] for h in runs[0]["history"]],
                                              [statistics.fmean(r["history"][i]["score_mean"] for r in runs
                                                                if i < len(r["history"]))
                                               for i in range(len(runs[0]["history"]))]]
    return {"env": env_id, "results": results, "curves": curves}


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    res = report["results"]
    agents = sorted({a for q in res.values() for a in q}, key=lambda a: DEFAULT_AGENTS.index(a)
                    if a in DEFAULT_AGENTS else 99)
    lines = [f"# Offline benchmark: {report['env']} (D4RL-style normalised score, mean ± std over seeds)", ""]
    lines.append("| agent | " + " | ".join(res) + " | train s | latency ms/action |")
    lines.append("|---|" + "---:|" * (len(res) + 2))
    for a in agents:
        cells = [f"{seed_spread(res[q][a]['score_mean'], res[q][a]['score_std'], len(res[q][a]['seeds']))} "
                 f"({len(res[q][a]['seeds'])})" if a in res[q] else "—" for q in res]
        mine = [(res[q][a], len(res[q][a]["seeds"])) for q in res if a in res[q]]
        train_s, latency = (sum(r[k] * n for r, n in mine) / sum(n for _, n in mine)
                            for k in ("train_seconds", "latency_ms"))
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {train_s:.0f} | {latency:.2f} |")
    lines.append("")
    lines.append("(n) = seeds finished. train s and latency ms/action: mean over all of the agent's finished runs, "
                 "every dataset. " + report.get("budget", ""))
    if "throughput" in report:
        t = report["throughput"]
        lines.append(f"\nthroughput_ratio_vs_bare (diffusion BC, batch 256): {report['throughput_ratio_vs_bare']:.3f} "
                     f"({t['ours_steps_per_s']:.1f} vs {t['bare_steps_per_s']:.1f} steps/s; target >= 0.85)")
    if report.get("latency_ms"):
        lines.append("\nLatency per action (ms, batch 1, one thread, benchmark settings): " + ", ".join(
            f"{a} {v:.2f}" for a, v in report["latency_ms"].items()))
    if "latency_ratio_consistency_vs_diffusion" in report:
        lines.append(f"consistency_bc / diffusion_bc (5 steps) latency per action: 2 steps "
                     f"{report['latency_ratio_consistency_vs_diffusion']:.3f}, 1 step "
                     f"{report['latency_ratio_consistency_1step_vs_diffusion']:.3f} (target <= 0.5)")
    report_file(out, ".md").write_text("\n".join(lines) + "\n")
    qs = list(report["curves"])
    if qs:
        with png_figure(report_file(out, ".png"), 1, len(qs), figsize=(5 * len(qs), 4)) as (_, axes):
            for ax, q in zip(axes[0], qs):
                for a, (x, y) in report["curves"][q].items():
                    ax.plot(x, y, label=a, marker="o", ms=3)
                ax.set_title(f"{report['env']} {q}")
                ax.set_xlabel("gradient steps")
                ax.set_ylabel("normalised score")
            axes[0][-1].legend(fontsize=7)


MEASURED = ("throughput", "throughput_ratio_vs_bare", "latency_ms")  # kept by rewrites that do not time


def with_latency_ratios(report: dict) -> dict:
    lat = report.get("latency_ms", {})
    if "consistency_bc" in lat and "diffusion_bc" in lat:
        report["latency_ratio_consistency_vs_diffusion"] = lat["consistency_bc"] / lat["diffusion_bc"]
        report["latency_ratio_consistency_1step_vs_diffusion"] = lat["consistency_bc_1step"] / lat["diffusion_bc"]
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--qualities", nargs="+", default=DEFAULT_QUALITIES)
    p.add_argument("--agents", nargs="+", default=DEFAULT_AGENTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100_000, help="gradient steps per run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes of each point of the learning curves")
    p.add_argument("--final-episodes", type=int, default=50, help="episodes of the final checkpoint's score")
    p.add_argument("--transitions", type=int, default=200_000, help="size of random/medium/expert/medium-expert data")
    p.add_argument("--behaviour-steps", type=int, default=150_000, help="SB3 SAC steps of the behaviour run")
    p.add_argument("--runs", default=None, help="run directories (default benchmarks/runs/offline/<env>)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/offline)")
    p.add_argument("--results", default=None, help="the store of per-run result files (default <out>_runs), e.g. the "
                   "committed one while a sweep's own table goes elsewhere")
    p.add_argument("--quick", action="store_true", help="smoke run: Pendulum-v1, tiny budgets, one seed")
    p.add_argument("--assemble", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: give finished runs the final evaluation they lack (new --final-episodes or "
                        "acting defaults), then rebuild the table")
    p.add_argument("--measure", action="store_true",
                   help="with --assemble: also measure throughput and latency here (on a quiet machine)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-latency", action="store_true", help="a sweep on a busy machine: keep the table's latencies")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", default="", metavar="BACKEND",
                   help="torch.compile the denoisers and critics (e.g. inductor: Diffusion-QL steps about 25%% faster "
                        "on one CPU thread, IDQL's no faster; see benchmarks/results/train_step_cpu.md); changes only "
                        "the speed, so a run may resume with or without it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.env = "Pendulum-v1" if "--env" not in (argv or sys.argv) else args.env
        given = argv or sys.argv
        args.seeds = args.seeds if "--seeds" in given else [0]
        args.steps, args.eval_every, args.eval_episodes, args.final_episodes = 300, 150, 5, 5
        args.transitions, args.behaviour_steps = 20_000, 6_000
        args.qualities = ["medium-replay"] if "--qualities" not in (argv or sys.argv) else args.qualities
    out = Path(args.out) if args.out else ROOT / "results" / ("offline_quick" if args.quick else "offline")
    tag = "offline_quick" if args.quick else "offline"
    run_root = Path(args.runs) if args.runs else ROOT / "runs" / tag / args.env
    result_root = (Path(args.results) if args.results else report_file(out, "_runs")) / args.env

    from diffpolicy.envs.datasets import OfflineData, dataset_id, load_dataset, make_dataset

    # the table holds every finished run, also those of other invocations (other --agents / --qualities)
    table_keys = (list(dict.fromkeys(DEFAULT_QUALITIES + args.qualities)), list(dict.fromkeys(DEFAULT_AGENTS + args.agents)))
    budget = (f"Budget: {args.steps} gradient steps per run, batch {args.batch}, evaluation every {args.eval_every} "
              f"steps on {args.eval_episodes} episodes; score: the final checkpoint on {args.final_episodes} episodes; "
              f"datasets: {args.transitions} transitions (medium-replay: the SB3 "
              f"SAC replay buffer up to the medium checkpoint of a {args.behaviour_steps}-step run). Scores "
              "use the datasets' own reference returns (a random policy; the behaviour run's best checkpoint as "
              "expert), not D4RL's: they are not comparable to published scores.")
    if not args.assemble:
        data = {}
        for q in args.qualities:
            make_dataset(args.env, q, n_transitions=args.transitions, behaviour_steps=args.behaviour_steps,
                         progress=not args.no_progress)
            data[q] = OfflineData.from_minari(load_dataset(dataset_id(args.env, q), download=False))
            check_same_data(result_root, q, data[q])
        for seed in args.seeds:
            for q in args.qualities:
                for name in args.agents:
                    t = time.time()
                    res = run_one(args.env, q, data[q], name, seed, args, run_root, result_root)
                    if res is None:  # --rescore: not finished under this budget
                        continue
                    print(f"[{q} {name} seed {seed}] score {res['score']:.1f} ({time.time() - t:.0f} s)", flush=True)
                    write_outputs(with_latency_ratios({**assemble(result_root, args.env, *table_keys, args.steps),
                                                       "budget": budget, **measured_before(out, MEASURED)}), out)
    report = {**assemble(result_root, args.env, *table_keys, args.steps), "budget": budget, **measured_before(out, MEASURED)}
    measure = (not args.assemble or args.measure)
    if measure and not args.no_throughput:
        q0 = args.qualities[0]
        tp = throughput_ratio(OfflineData.from_minari(load_dataset(dataset_id(args.env, q0), download=False)),
                              steps=100 if args.quick else 300)
        report["throughput"], report["throughput_ratio_vs_bare"] = tp, tp["ratio"]
    if measure and not args.no_latency:
        d0 = OfflineData.from_minari(load_dataset(dataset_id(args.env, args.qualities[0]), download=False))
        report["latency_ms"] = latency_table(d0.obs_dim, d0.act_dim, DEFAULT_AGENTS, args.steps)
    write_outputs(with_latency_ratios(report), out)
    print(report_file(out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

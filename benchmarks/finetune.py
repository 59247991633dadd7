"""Online fine-tuning benchmark: DPPO, DRWR, DAWR, QSM and Gaussian PPO from the same pre-trained
policies, stable-baselines3 PPO and SAC from scratch, on one environment-step budget.

The pre-trained policies are a diffusion BC (for the diffusion methods) and a Gaussian BC (for
Gaussian PPO), trained by :func:`~diffpolicy.agents.trainer.train_offline` on the local
``--quality`` dataset of ``--env`` (made or reused as in ``benchmarks/offline.py``), or given
with ``--pretrained`` / ``--gaussian-pretrained`` (run directories or checkpoint files of such runs). Every
(method, seed) run has its own directory ``<runs>/<env>/<method>/seed<k>/`` (checkpoints,
CSV/TensorBoard logs; not committed) and writes ``benchmarks/results/finetune_runs/<env>/<method>/seed<k>.json``
(committed) when it finishes; the table is assembled from whatever results exist, so a sweep
continues where it stopped (an unfinished run resumes from its checkpoint). The table at a budget
takes every run that reached it, cut at its first evaluation at or after the budget: a run's
first ``B`` environment steps do not depend on its total budget (no schedule looks at it; SB3
SAC's learning start, ``min(5000, budget / 10)``, does below 5e4 steps), so a 2e6-step run also
stands for the 1e6-step one, and ``--results`` lets tables at several budgets share one store of runs.

Reported per method: D4RL-normalised score (deterministic evaluation on ``--eval-episodes``
episodes) against environment steps (PNG: mean ± std over seeds), the score at 25 / 50 / 100 %
of the budget, and wall-clock seconds per iteration (collection + update). An iteration is the
same number of environment steps for every method (``num_envs x steps_per_iter x action_chunk``:
the unchunked Gaussian PPO takes ``action_chunk`` times more decisions per iteration), so the
evaluations fall on the same environment steps. Also, measured in
this process: ``dppo_rollout_ratio_vs_bare``, the time of one DPPO collection iteration (chain
machinery: rollout with log-probs, std floors, clipping, TorchRL collector) against the same
iteration whose policy makes the same ``K`` bare network forwards.

Usage::

    python benchmarks/finetune.py --quick                           # smoke run, minutes
    python benchmarks/finetune.py --seeds 0 1 2                     # the full Hopper-v5 run (1e6 env steps)
    python benchmarks/finetune.py --assemble                        # table from finished runs only
    python benchmarks/finetune.py --env-steps 2000000 --out benchmarks/results/finetune_2e6 \
        --results benchmarks/results/finetune_runs                  # 2e6 steps, the same store of runs
"""
from __future__ import annotations

import argparse
import json
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

DIFFUSION_METHODS = ["dppo", "drwr", "dawr", "qsm"]
METHODS = DIFFUSION_METHODS + ["gaussian_ppo", "sb3_ppo", "sb3_sac"]
MEASURED = ("rollout", "dppo_rollout_ratio_vs_bare")  # kept by rewrites that do not time


def bc_settings(name: str, args) -> dict:
    """DPPO's pre-trained policy (Ren et al. 2024 App. D; ANCHORS.md): ``--denoising-steps`` cosine-schedule
    steps over ``--action-chunk`` actions; Gaussian BC unchunked."""
    if name != "diffusion_bc":
        return {}
    return dict(diffusion_steps=args.denoising_steps, horizon=args.action_chunk, beta_schedule="squaredcos_cap_v2")


def pretrain(name: str, data, steps: int, run_root: Path, seed: int, progress: bool, settings: dict):
    """The BC policy ``name`` trained for ``steps`` on ``data`` (resumed / reused from ``run_root``)."""
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline

    torch.manual_seed(seed)
    agent = make_agent(name, data.obs_dim, data.act_dim, **settings)
    cfg = TrainConfig(steps=steps, eval_every=steps, eval_episodes=10, seed=seed, log_every=max(1, min(1000, steps // 10)))
    train_offline(agent, data, cfg, run_dir=run_root / "pretrain" / name, progress=progress)
    return agent


def load_pretrained(name: str, path: str):
    """The trained ``name`` agent of a run directory (or of the directory of a checkpoint file)."""
    from diffpolicy.agents import load_agent

    run = Path(path)
    agent = load_agent(run if run.is_dir() else run.parent)
    if agent.name != name:
        raise ValueError(f"{path} holds a {agent.name} run, not {name}")
    return agent


def make_method(name: str, bc, gbc, args):
    from diffpolicy.agents import make_online_agent

    if name == "gaussian_ppo":  # one action per decision: as many decisions as env steps in an iteration
        clip = {} if args.gaussian_clip is None else {"clip_epsilon": args.gaussian_clip}
        return make_online_agent(name, gbc, num_envs=args.num_envs, steps_per_iter=args.steps_per_iter * args.action_chunk,
                                 **clip)
    common = dict(num_envs=args.num_envs, steps_per_iter=args.steps_per_iter)
    if name == "dppo":  # PPO on the last ft_steps denoising steps
        common["ft_steps"] = min(args.ft_steps, bc.config.diffusion_steps)
        if args.dppo_clip is not None:  # a flat clip over the fine-tuned steps (sensitivity runs)
            common.update(clip_epsilon=args.dppo_clip, clip_epsilon_base=args.dppo_clip)
        if args.dppo_actor_lr is not None:
            common["actor_lr"] = args.dppo_actor_lr
    return make_online_agent(name, bc, **common)  # DRWR / DAWR / QSM: whole-model losses, every step fine-tuned


def run_sb3(name: str, env_id: str, data, seed: int, args, run_dir: Path) -> dict:
    """SB3 PPO or SAC from scratch on the same normalised-action env, evaluated like the others
    (deterministic actions, the same episodes). Saved at every evaluation, each file replaced
    whole: ``model.zip``, SAC's replay buffer (``replay_buffer.pkl``: without it a resumed SAC
    would start again from an empty buffer) and the evaluation history; a later call resumes."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback

    import gymnasium as gym
    from gymnasium.wrappers import RescaleAction

    from diffpolicy.envs.factory import evaluate

    algo = {"sb3_ppo": PPO, "sb3_sac": SAC}[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path, hist_path = run_dir / "model.zip", run_dir / "history.json"
    buffer_path = run_dir / "replay_buffer.pkl"
    env = RescaleAction(gym.make(env_id), -1.0, 1.0)  # SB3 clips to the (bounded) box itself
    if model_path.exists() and hist_path.exists():
        model = algo.load(model_path, env=env)
        if hasattr(model, "replay_buffer"):
            if not buffer_path.exists():
                raise FileNotFoundError(f"{run_dir} holds an {name} model but not its replay buffer "
                                        f"({buffer_path.name}); delete the directory to start the run again")
            model.load_replay_buffer(buffer_path)
        state = json.loads(hist_path.read_text())
    else:
        kw = {"learning_starts": min(5000, args.env_steps // 10)} if algo is SAC else {}
        model = algo("MlpPolicy", env, seed=seed, verbose=0, **kw)
        state = {"history": [], "train_seconds": 0.0}
    iter_steps = args.num_envs * args.steps_per_iter * args.action_chunk  # env steps of one iteration of the others
    every = iter_steps * args.eval_every

    def score(returns):
        return data.normalized_score(returns)

    def run_eval(step):
        res = evaluate(lambda o: torch.as_tensor(model.predict(o.numpy(), deterministic=True)[0]), env_id,
                       episodes=args.eval_episodes, seed=10_000, score_fn=score)
        state["history"].append({"env_steps": step, "score_mean": res.score_mean, "score_std": res.score_std,
                                 "return_mean": res.return_mean})

    def save():  # each file replaced whole; the history last, so it never runs ahead of the model
        if hasattr(model, "replay_buffer"):
            model.save_replay_buffer(run_dir / "replay_buffer.tmp.pkl")
            os.replace(run_dir / "replay_buffer.tmp.pkl", buffer_path)
        model.save(run_dir / "model.tmp.zip")
        os.replace(run_dir / "model.tmp.zip", model_path)
        (run_dir / "history.tmp.json").write_text(json.dumps(state))
        os.replace(run_dir / "history.tmp.json", hist_path)

    class Eval(BaseCallback):
        pending = False  # an evaluation not saved yet

        def _on_step(self):
            if self.num_timesteps % every == 0:
                state["train_seconds"] += time.perf_counter() - self.t0
                run_eval(self.num_timesteps)
                self.pending = True
                self.t0 = time.perf_counter()
            return True

        def _on_rollout_end(self):  # SB3 calls on_step before it stores the step's transition; here it has
            if self.pending:
                state["train_seconds"] += time.perf_counter() - self.t0
                save()
                self.pending = False
                self.t0 = time.perf_counter()

        def _on_training_start(self):
            self.t0 = time.perf_counter()

    if not state["history"]:
        run_eval(0)
        save()
    done = model.num_timesteps
    if done < args.env_steps:
        model.learn(args.env_steps - done, callback=Eval(), reset_num_timesteps=False,
                    progress_bar=False)
    if state["history"][-1]["env_steps"] != model.num_timesteps:
        run_eval(model.num_timesteps)
    save()
    iters = max(1, model.num_timesteps // iter_steps)
    return {"history": state["history"], "seconds_per_iter": state["train_seconds"] / iters,
            "env_steps": model.num_timesteps}


def pretrained_record(agent, source: Path) -> dict:
    """Where a fine-tuning run started from, as ``diffpolicy finetune`` records it in ``config.json``: a
    benchmark run then opens with :func:`~diffpolicy.agents.load_agent` and ``diffpolicy eval``."""
    from diffpolicy.agents import describe_agent

    source = Path(source)
    return {"run": str((source.parent if source.is_file() else source).resolve()), **describe_agent(agent)}


def run_one(name: str, env_id: str, data, bc, gbc, seed: int, args, run_root: Path, result_root: Path,
            sources: dict | None = None) -> dict:
    """One (method, seed) run, or its finished result. ``sources``: the run directories of ``bc`` and
    ``gbc`` (``{"diffusion_bc": dir, "gaussian_bc": dir}``), recorded in the run's ``config.json``."""
    from diffpolicy.agents import describe_agent
    from diffpolicy.agents.online import OnlineConfig, train_online

    result_path = result_root / name / f"seed{seed}.json"
    if result_path.exists():
        old = json.loads(result_path.read_text())
        if old["env_steps"] >= args.env_steps:
            return old
    run_dir = run_root / name / f"seed{seed}"
    if name.startswith("sb3_"):
        out = run_sb3(name, env_id, data, seed, args, run_dir)
        history = out["history"]
    else:
        torch.manual_seed(seed)
        agent = make_method(name, bc, gbc, args)
        cfg = OnlineConfig(env_steps=args.env_steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                           checkpoint_every=args.eval_every, seed=seed)
        base, kind = (gbc, "gaussian_bc") if name == "gaussian_ppo" else (bc, "diffusion_bc")
        source = (sources or {}).get(kind)
        res = train_online(agent, env_id, data, cfg, run_dir=run_dir, progress=not args.no_progress,
                           pretrained=pretrained_record(base, source) if source is not None else None)
        history = res["history"]
        out = {"env_steps": res["env_steps"], "seconds_per_iter": res["train_seconds"] / max(1, res["iterations"]),
               "agent_config": describe_agent(agent)["agent_config"]}
    result = {"env": env_id, "method": name, "seed": seed, "env_steps": out["env_steps"],
              "scores": [h["score_mean"] for h in history], "steps": [h["env_steps"] for h in history],
              "final_score": history[-1]["score_mean"], "seconds_per_iter": out["seconds_per_iter"],
              "num_envs": args.num_envs, "steps_per_iter": args.steps_per_iter,
              **({"agent_config": out["agent_config"]} if "agent_config" in out else {})}  # which settings ran
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    return result


def rollout_ratio(bc, data, env_id: str, num_envs: int, steps: int, ft_steps: int, rounds: int = 3) -> dict:
    """One DPPO collection iteration (``num_envs x steps`` decisions) against the same with bare forwards."""
    from tensordict.nn import TensorDictModule
    from torchrl.collectors import Collector

    from diffpolicy.agents.dppo import DPPO
    from diffpolicy.envs.factory import make_env

    agent = DPPO.from_diffusion_bc(bc, num_envs=num_envs, steps_per_iter=steps,
                                   ft_steps=min(ft_steps, bc.config.diffusion_steps))
    net, K = agent.actor.net, agent.K
    ts = agent.ts[:-1].float()

    class Bare(torch.nn.Module):  # the same K network forwards, no chain machinery
        @torch.no_grad()
        def forward(self, obs):
            x = torch.randn(obs.shape[0], agent.act_dim)
            for k in range(K):
                x = net(x, ts[k].expand(obs.shape[0]), obs)
            return x.clamp(-1, 1)

    policies = {"dppo": agent.policy_module(),
                "bare": TensorDictModule(Bare(), in_keys=["observation"], out_keys=["action"])}
    times = {k: [] for k in policies}
    for _ in range(rounds):
        for k, pol in policies.items():
            env = make_env(env_id, num_envs=num_envs, obs_loc=data.obs_mean, obs_scale=data.obs_std,
                           action_chunk=agent.action_chunk)
            env.set_seed(0)
            col = Collector(env, pol, frames_per_batch=num_envs * steps, total_frames=-1,
                            auto_register_policy_transforms=False)
            it = iter(col)
            t = time.perf_counter()
            next(it)
            times[k].append(time.perf_counter() - t)
            col.shutdown()
    best = {k: min(v) for k, v in times.items()}
    return {"ratio": best["dppo"] / best["bare"], "dppo_seconds": best["dppo"], "bare_seconds": best["bare"],
            "num_envs": num_envs, "steps": steps, "denoising_steps": K}


def at_budget(run: dict, budget: int) -> dict | None:
    """``run`` cut at its first evaluation at or after ``budget`` environment steps (``None``: it has
    not reached the budget). A longer run's prefix is the shorter run: nothing depends on the total."""
    if run["env_steps"] < budget:
        return None
    k = next((i for i, s in enumerate(run["steps"]) if s >= budget), None)
    if k is None:
        return None
    return {**run, "steps": run["steps"][:k + 1], "scores": run["scores"][:k + 1], "final_score": run["scores"][k]}


def assemble(result_root: Path, env_id: str, methods, budget: int) -> dict:
    results, curves = {}, {}
    for m in methods:
        runs = [at_budget(json.loads(p.read_text()), budget) for p in sorted((result_root / m).glob("seed*.json"))]
        runs = [r for r in runs if r is not None]
        if not runs:
            continue
        finals = [r["final_score"] for r in runs]
        n = min(len(r["scores"]) for r in runs)
        x = runs[0]["steps"][:n]
        mean = [statistics.fmean(r["scores"][i] for r in runs) for i in range(n)]
        std = [statistics.pstdev([r["scores"][i] for r in runs]) if len(runs) > 1 else 0.0 for i in range(n)]

        def at(frac):
            target = frac * budget
            i = min(range(n), key=lambda j: abs(x[j] - target))
            return mean[i]

        results[m] = {"scores": mean, "scores_std": std, "env_steps": x, "final_score_mean": statistics.fmean(finals),
                      "final_score_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                      "seconds_per_iter": statistics.fmean(r["seconds_per_iter"] for r in runs),
                      "at_25": at(0.25), "at_50": at(0.5), "seeds": [r["seed"] for r in runs]}
        curves[m] = (x, mean, std)
    start = [results[m]["scores"][0] for m in DIFFUSION_METHODS if m in results]
    return {"env": env_id, "start_score": statistics.fmean(start) if start else None, "results": results}


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    res = report["results"]
    lines = [f"# Online fine-tuning: {report['env']} (D4RL-style normalised score, mean ± std over seeds)", ""]
    if report.get("start_score") is not None:
        lines.append(f"Pre-trained diffusion BC (deterministic evaluation): {report['start_score']:.1f}\n")
    lines.append("| method | 25% budget | 50% budget | final | s / iteration | seeds |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for m, r in res.items():
        final = seed_spread(r["final_score_mean"], r["final_score_std"], len(r["seeds"]))
        lines.append(f"| {m} | {r['at_25']:.1f} | {r['at_50']:.1f} | {final} | {r['seconds_per_iter']:.2f} | "
                     f"{len(r['seeds'])} |")
    lines.append("\n" + report.get("budget", ""))
    if "dppo_rollout_ratio_vs_bare" in report:
        rr = report["rollout"]
        lines.append(f"\ndppo_rollout_ratio_vs_bare: {report['dppo_rollout_ratio_vs_bare']:.3f} ({rr['dppo_seconds']:.2f} s "
                     f"vs {rr['bare_seconds']:.2f} s per {rr['num_envs']}x{rr['steps']}-step collection, "
                     f"K={rr['denoising_steps']}; target <= 1.3"
                     + ("; smoke settings: so few envs and steps that the chain's fixed cost per step weighs "
                        "more than at the full run's, where the target is read)" if rr.get("smoke") else ")"))
    report_file(out, ".md").write_text("\n".join(lines) + "\n")
    with png_figure(report_file(out, ".png")) as (_, axes):
        ax = axes[0, 0]
        for m, r in res.items():
            x, y, s = r["env_steps"], r["scores"], r["scores_std"]
            ax.plot(x, y, label=m, marker="o", ms=3)
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.15)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("normalised score")
        ax.set_title(f"{report['env']}: fine-tuning")
        ax.legend(fontsize=7)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--quality", default="medium")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--env-steps", type=int, default=1_000_000, help="environment steps per run")
    p.add_argument("--num-envs", type=int, default=10)
    p.add_argument("--steps-per-iter", type=int, default=250,
                   help="policy decisions per env per iteration (action chunks for the diffusion methods)")
    p.add_argument("--denoising-steps", type=int, default=20, help="K of the pre-trained diffusion BC (DPPO: 20)")
    p.add_argument("--ft-steps", type=int, default=10, help="DPPO's fine-tuned last denoising steps (DPPO: 10)")
    p.add_argument("--dppo-clip", type=float, default=None, help="DPPO's PPO clip, flat over the fine-tuned steps "
                   "(default: DPPOConfig's 0.1; the paper's 40x500-decision iterations use 0.01); use a separate --out / "
                   "--runs for such sensitivity runs")
    p.add_argument("--dppo-actor-lr", type=float, default=None, help="DPPO's actor learning rate (default 1e-4)")
    p.add_argument("--gaussian-clip", type=float, default=None, help="Gaussian PPO's clip (default: GaussianPPOConfig's "
                   "0.2, standard PPO; the DPPO paper's Gaussian fine-tuning baselines use its Gym clip 0.01); a separate "
                   "--out / --runs, as for --dppo-clip")
    p.add_argument("--action-chunk", type=int, default=4, help="actions per diffusion decision (DPPO: 4)")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=100_000, help="gradient steps of the BC policies")
    p.add_argument("--pretrained", default=None, help="a diffusion_bc run directory (or its checkpoint) to start from")
    p.add_argument("--gaussian-pretrained", default=None, help="a gaussian_bc run directory (or its checkpoint)")
    p.add_argument("--transitions", type=int, default=200_000)
    p.add_argument("--behaviour-steps", type=int, default=150_000)
    p.add_argument("--runs", default=None, help="run directories (default benchmarks/runs/finetune/<env>)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/finetune)")
    p.add_argument("--results", default=None, help="the store of per-run result files (default <out>_runs): "
                   "tables at several --env-steps can share one")
    p.add_argument("--quick", action="store_true", help="smoke run: Pendulum-v1, tiny budgets, one seed")
    p.add_argument("--assemble", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--no-rollout-ratio", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv
    torch.set_num_threads(1)
    if args.quick:
        args.env = args.env if "--env" in given else "Pendulum-v1"
        args.seeds = args.seeds if "--seeds" in given else [0]
        args.env_steps, args.num_envs, args.steps_per_iter, args.eval_every, args.eval_episodes = 2000, 4, 100, 2, 3
        args.pretrain_steps, args.transitions, args.behaviour_steps = 500, 20_000, 6_000
        args.denoising_steps, args.ft_steps, args.action_chunk = 5, 3, 2
        args.quality = args.quality if "--quality" in given else "medium-replay"
    tag = "finetune_quick" if args.quick else "finetune"
    out = Path(args.out) if args.out else ROOT / "results" / tag
    run_root = Path(args.runs) if args.runs else ROOT / "runs" / tag / args.env
    result_root = (Path(args.results) if args.results else report_file(out, "_runs")) / args.env
    budget = (f"Budget: {args.env_steps} environment steps per run ({args.num_envs} envs x {args.steps_per_iter} "
              f"decisions per iteration; diffusion policies act in chunks of {args.action_chunk}), evaluation every "
              f"{args.eval_every} iterations on {args.eval_episodes} episodes; pre-trained BC: {args.pretrain_steps} "
              f"gradient steps on {args.env} {args.quality} (diffusion: {args.denoising_steps} cosine steps, DPPO "
              f"fine-tunes the last {args.ft_steps}); seeds: the table's last column.")
    settings = [f"{what} {v:g}" for what, v in (("DPPO clip (flat)", args.dppo_clip), ("DPPO actor lr", args.dppo_actor_lr),
                                                 ("Gaussian PPO clip", args.gaussian_clip)) if v is not None]
    if settings:
        budget += " Not the defaults: " + ", ".join(settings) + "."

    from diffpolicy.envs.datasets import OfflineData, dataset_id, load_dataset, make_dataset

    make_dataset(args.env, args.quality, n_transitions=args.transitions, behaviour_steps=args.behaviour_steps,
                 progress=not args.no_progress)
    data = OfflineData.from_minari(load_dataset(dataset_id(args.env, args.quality), download=False))
    if data.ref_min_score is not None:
        budget += (f" Scores: 100 x (return - {data.ref_min_score:.1f}) / ({data.ref_max_score:.1f} - "
                   f"{data.ref_min_score:.1f}), the dataset's own random and expert returns, not D4RL's: not "
                   "comparable to published scores, and above 100 where a policy beats that expert.")
    needs_bc = any(m in DIFFUSION_METHODS for m in args.methods) or not args.no_rollout_ratio
    bc = gbc = None
    if not args.assemble and needs_bc:
        st = bc_settings("diffusion_bc", args)
        bc = (load_pretrained("diffusion_bc", args.pretrained) if args.pretrained
              else pretrain("diffusion_bc", data, args.pretrain_steps, run_root, 0, not args.no_progress, st))
    if not args.assemble and "gaussian_ppo" in args.methods:
        gbc = (load_pretrained("gaussian_bc", args.gaussian_pretrained) if args.gaussian_pretrained
               else pretrain("gaussian_bc", data, args.pretrain_steps, run_root, 0, not args.no_progress, {}))
    sources = {"diffusion_bc": Path(args.pretrained) if args.pretrained else run_root / "pretrain" / "diffusion_bc",
               "gaussian_bc": (Path(args.gaussian_pretrained) if args.gaussian_pretrained
                               else run_root / "pretrain" / "gaussian_bc")}
    report = {}
    if not args.assemble:
        for seed in args.seeds:
            for m in args.methods:
                t = time.time()
                r = run_one(m, args.env, data, bc, gbc, seed, args, run_root, result_root, sources)
                print(f"[{m} seed {seed}] final score {r['final_score']:.1f} ({time.time() - t:.0f} s)", flush=True)
                write_outputs({**assemble(result_root, args.env, METHODS, args.env_steps), "budget": budget,
                               **measured_before(out, MEASURED)}, out)
    if not args.assemble and not args.no_rollout_ratio:
        rr = rollout_ratio(bc, data, args.env, args.num_envs, min(args.steps_per_iter, 100), args.ft_steps)
        rr["smoke"] = args.quick
        report["rollout"], report["dppo_rollout_ratio_vs_bare"] = rr, rr["ratio"]
    else:
        report.update(measured_before(out, MEASURED))
    # the table holds every finished run, also those of other invocations (e.g. another --methods)
    report = {**assemble(result_root, args.env, METHODS, args.env_steps), "budget": budget, **report}
    write_outputs(report, out)
    print(report_file(out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

"""IDQL's score against its critic's training budget: the critic of a finished run trained on alone.

IDQL (Hansen-Estruch et al. 2023) trains its IQL critic independently of its diffusion behaviour
model and joins them only when acting, re-ranking behaviour samples by Q. The offline benchmark
gives every agent 1e5 gradient steps; the authors train for 3e6. On our Hopper medium-replay data
IDQL's learning curve is flat from 1e4 steps, so its behaviour model is not short of steps. This
benchmark asks whether its critic is. It opens a finished IDQL run, freezes the behaviour model and
trains only the critic (``IDQL.update_critic``: same data, batch, reward scaling, optimisers and
target networks, continuing from the run's own state) to ``--critic-steps`` steps in all. Every
``--eval-every`` steps it scores the policy as the offline benchmark scores a finished run:
``--episodes`` episodes from the same episode seeds, the policy's noise seeded by the run's seed.
The first point is the run as trained, scored in this process.

``--expectile TAU`` asks a second question: would a critic of another expectile re-rank the
behaviour samples better? It replaces the run's critic by a fresh, untrained IQL critic at
expectile ``TAU`` (the only setting changed; the behaviour model is still the run's; with the
default ``selection="argmax"`` the expectile enters acting only through the critic) and trains it
from step 0, scoring it the same way. Its first point is then the behaviour model ranked by an
untrained critic.

The IDQL run is only read. ``--work`` holds this job's own run directory: ``config.json``,
``checkpoint.safetensors`` (at every evaluation; a second call resumes), ``train.csv`` / ``eval.csv``
and TensorBoard events.

Usage::

    python benchmarks/idql_critic_budget.py --run RUNS/Hopper-v5/medium-replay/idql/seed0 \\
        --critic-steps 1000000 --eval-every 100000 --work RUNS/idql_critic_budget/seed0

Writes ``--out`` ``.json``, ``.md`` and ``.png`` (score against critic steps).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from diffpolicy.plotting import png_figure, report_file

ROOT = Path(__file__).resolve().parent


def with_fresh_critic(agent, expectile: float):
    """A copy of IDQL ``agent`` with its behaviour model (weights, EMA, actor optimiser, update count) and an
    untrained critic at ``expectile`` (fresh value and Q optimisers); ``agent`` itself is left as it was."""
    fresh = type(agent)(agent.obs_dim, agent.act_dim, dataclasses.replace(agent.config, expectile=expectile))
    state = {k: v for k, v in agent.state_dict().items() if not k.startswith("critic_loss.")}
    # deep copies: Optimizer.load_state_dict would otherwise share the source's Adam moment tensors
    state["_optimizers"] = copy.deepcopy({k: v for k, v in state["_optimizers"].items() if k not in ("value", "critic")})
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("critic_loss.") for k in missing):
        raise RuntimeError(f"the run's behaviour model does not fit a fresh IDQL: missing {missing}, "
                           f"unexpected {unexpected}")
    return fresh.eval()


@torch.no_grad()
def candidate_spread(agent, data, states: int = 256, seed: int = 0) -> dict:
    """How far IDQL's critic separates one state's behaviour candidates, beside how far it separates states.

    On ``states`` dataset states (drawn with ``seed``), ``agent.config.candidates`` behaviour samples
    each, scored by the critic that ranks them when acting (``min`` of the target Qs), in the
    critic's own reward-scaled units: ``q_std_across_states`` (of the candidates' mean Q),
    ``q_std_across_candidates`` (within a state, averaged over states), ``argmax_minus_mean`` and
    ``argmax_minus_v`` (how far the chosen candidate stands above the others and above ``V(s)``).
    """
    from diffpolicy.agents.iql import q_and_v

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:states]
    n, k = len(idx), agent.config.candidates
    obs = data.normalize_obs(data.observations[idx]).repeat_interleave(k, 0)
    q, v = q_and_v(agent.critic_loss, obs, agent.sample_actions(obs, generator=g))
    q, v = q.reshape(n, k).double(), v.reshape(n, k)[:, 0].double()
    best = q.max(1).values
    return {"states": n, "candidates": k, "q_std_across_states": q.mean(1).std().item(),
            "q_std_across_candidates": q.std(1).mean().item() if k > 1 else 0.0,
            "argmax_minus_mean": (best - q.mean(1)).mean().item(), "argmax_minus_v": (best - v).mean().item()}


def _last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in a run directory's ``train.csv`` (None when absent)."""
    import csv

    path = run_dir / "train.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key) not in (None, "")]
    return float(values[-1]) if values else None


def _td_error(run_dir: Path, agent) -> dict:
    """The last logged ``loss_qvalue`` of a run directory and its root-mean-square TD error per Q net
    (TorchRL's ``IQLLoss.qvalue_loss`` sums the nets' mean squared TD errors), comparable with Q's spreads."""
    loss = _last_logged(run_dir, "loss_qvalue")
    rms = None if loss is None else math.sqrt(loss / agent.critic_loss.num_qvalue_nets)
    return {"loss_qvalue": loss, "td_rms_per_q_net": rms}


def critic_budget(run: Path, work: Path, critic_steps: int, eval_every: int, episodes: int,
                  progress: bool = True, expectile: float | None = None) -> dict:
    """Train the critic of IDQL run ``run`` on to ``critic_steps`` steps, scoring every ``eval_every``;
    with ``expectile``, a fresh critic at that expectile trained from step 0 instead.
    Returns ``{"source", "source_steps", "dataset", "seed", ["fresh_critic_expectile",] "start_step",
    "critic_steps", "episodes", "train_seconds", "history": [{"critic_steps", "score_mean", "score_std",
    "return_mean"}], "spread": {"as_trained" | "final": candidate_spread(...) + TD error}}``."""
    from tqdm.auto import tqdm

    from diffpolicy.agents import load_agent
    from diffpolicy.agents.trainer import TrainConfig, evaluate_agent
    from diffpolicy.checkpoint import CHECKPOINT, load_state_checked, save_checkpoint
    from diffpolicy.envs.datasets import OfflineData, load_dataset
    from diffpolicy.runlog import RunLogger, open_run, release_run, rng_state, set_rng_state, set_seed

    meta = json.loads((run / "config.json").read_text())
    if meta.get("agent") != "idql":
        raise ValueError(f"{run} is a {meta.get('agent')!r} run; this benchmark trains on the critic of an idql run")
    agent = source = load_agent(run)
    seed, source_steps = meta["train"]["seed"], source.num_updates
    if expectile is not None:
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"--expectile must lie in (0, 1), got {expectile}")
        torch.manual_seed(seed + 2)  # the fresh critic's initialisation
        agent = with_fresh_critic(source, expectile)
    start = 0 if expectile is not None else agent.num_updates  # a fresh critic has taken no step yet
    if critic_steps < start:
        raise ValueError(f"--critic-steps {critic_steps} is below the {start} steps {run} has already trained")
    data = OfflineData.from_minari(load_dataset(meta["dataset"], download=False),
                                   drop_nonfinite=meta.get("drop_nonfinite", False))
    rb = data.replay_buffer(meta["train"]["batch_size"], reward_scale=meta["reward_scale"])
    as_trained = {**candidate_spread(source, data, seed=seed), **_td_error(run, source)}  # before it trains on
    state = {"step": start, "history": [], "train_seconds": 0.0}
    config = {"source": str(run.resolve()), "source_steps": source_steps, "dataset": meta["dataset"], "seed": seed}
    if expectile is not None:
        config["fresh_critic_expectile"] = expectile
    saved = open_run(work, config, {"critic_steps": critic_steps},
                     load=lambda s: load_state_checked(agent, s["agent"], "idql agent", work))
    set_seed(seed + 1)  # not the run's own stream: this is a new phase of training
    if saved is not None:
        state = saved["state"]
        set_rng_state(saved["rng"])
    logger = RunLogger(work, resume_step=state["step"])

    def score(step):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            r = evaluate_agent(agent, data, meta["env_id"], episodes=episodes, seed=TrainConfig.eval_seed)
        rec = {"critic_steps": step, "score_mean": r.score_mean, "score_std": r.score_std,
               "return_mean": r.return_mean}
        state["history"].append(rec)
        logger.write("eval", step, {k: v for k, v in rec.items() if k != "critic_steps"})
        save_checkpoint({"agent": agent.state_dict(), "state": state, "rng": rng_state()}, work / CHECKPOINT)
        return rec

    try:
        if not state["history"]:
            score(state["step"])
        bar = tqdm(total=critic_steps, initial=state["step"], desc="idql critic", unit="step", disable=not progress)
        sums: dict[str, float] = {}
        logged, log_every = state["step"], min(1000, eval_every)
        agent.train()
        t0 = time.perf_counter()
        while state["step"] < critic_steps:
            for k, v in agent.update_critic(rb.sample()).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            state["step"] += 1
            step = state["step"]
            bar.update(1)
            if step % log_every == 0 or step == critic_steps:
                means = {k: v / (step - logged) for k, v in sums.items()}
                if not all(math.isfinite(v) for v in means.values()):
                    raise FloatingPointError(f"a critic loss is not finite by step {step}: {means}; the last "
                                             f"checkpoint in {work} is kept")
                logger.write("train", step, means)
                sums.clear()
                logged = step
            if step % eval_every == 0 or step == critic_steps:
                state["train_seconds"] += time.perf_counter() - t0
                score(step)
                t0 = time.perf_counter()
        bar.close()
    finally:
        release_run(work)
    spread = {"as_trained": as_trained, "final": {**candidate_spread(agent, data, seed=seed), **_td_error(work, agent)}}
    return {**config, "start_step": start, "critic_steps": critic_steps, "episodes": episodes,
            "train_seconds": state["train_seconds"], "history": state["history"], "spread": spread}


def _label(run: dict) -> str:
    tau = run.get("fresh_critic_expectile")
    return f"seed {run['seed']}" + ("" if tau is None else f", fresh critic at expectile {tau:g}")


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    lines = ["# IDQL: score against the critic's training budget (behaviour model fixed)", "",
             "| run | dataset | " + " | ".join(f"{h['critic_steps']:g}" for h in report["runs"][0]["history"])
             + " |", "|---|---|" + "---:|" * len(report["runs"][0]["history"])]
    for r in report["runs"]:
        lines.append(f"| {_label(r)} | {r['dataset']} | "
                     + " | ".join(f"{h['score_mean']:.1f}" for h in r["history"]) + " |")
    lines += ["", f"Columns: critic gradient steps in all (the first: the run as trained, or, for a fresh critic, "
                  f"the behaviour model ranked by the untrained critic). Scores: normalised, "
                  f"{report['runs'][0]['episodes']} episodes each, the offline benchmark's episode seeds. "
                  f"Critic training time: " + ", ".join(f"{r['train_seconds']:.0f} s" for r in report["runs"]) + "."]
    if report.get("reference"):
        lines.append("Reference (offline table, same data): " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["reference"].items()) + ".")
    lines += ["", "How far each critic separates a state's behaviour candidates (reward-scaled units; "
                  f"{report['runs'][0]['spread']['final']['states']} dataset states, "
                  f"{report['runs'][0]['spread']['final']['candidates']} candidates each; TD error: root mean square "
                  "per Q net, from the last logged loss_qvalue):", "",
              "| run | critic | Q std across states | Q std across candidates | argmax - mean | argmax - V | TD error |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        for name, sp in r["spread"].items():
            critic = {"as_trained": f"the run's, {r['source_steps']:g} steps",
                      "final": f"{r['critic_steps']:g} steps"}[name]
            loss = "—" if sp["td_rms_per_q_net"] is None else f"{sp['td_rms_per_q_net']:.2f}"
            lines.append(f"| {_label(r)} | {critic} | {sp['q_std_across_states']:.1f} | "
                         f"{sp['q_std_across_candidates']:.2f} | {sp['argmax_minus_mean']:.2f} | "
                         f"{sp['argmax_minus_v']:.2f} | {loss} |")
    report_file(out, ".md").write_text("\n".join(lines) + "\n")
    with png_figure(report_file(out, ".png"), figsize=(5.5, 4)) as (_, axes):
        ax = axes[0, 0]
        for r in report["runs"]:
            ax.plot([h["critic_steps"] for h in r["history"]], [h["score_mean"] for h in r["history"]],
                    marker="o", ms=3, label=f"idql {_label(r)}")
        for k, v in (report.get("reference") or {}).items():
            ax.axhline(v, ls="--", lw=1, color="grey")
            ax.annotate(k, (ax.get_xlim()[0], v), fontsize=7, va="bottom")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlabel("critic gradient steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs="+", required=True, help="finished idql run directories (offline benchmark's)")
    p.add_argument("--work", nargs="+", required=True, help="one work directory per --run (checkpoints, logs)")
    p.add_argument("--critic-steps", type=int, default=1_000_000, help="critic gradient steps in all")
    p.add_argument("--eval-every", type=int, default=100_000)
    p.add_argument("--expectile", type=float, default=None,
                   help="replace the run's critic by a fresh one at this expectile, trained from step 0")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--reference", default=None,
                   help="an offline benchmark table (.json) whose scores on the run's dataset are drawn as lines")
    p.add_argument("--out", default=str(ROOT / "results" / "idql_critic_budget"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.work) != len(args.run):
        p.error(f"give one --work directory per --run ({len(args.run)} runs, {len(args.work)} work directories)")
    torch.set_num_threads(1)
    runs = [critic_budget(Path(r), Path(w), args.critic_steps, args.eval_every, args.episodes, not args.no_progress,
                          expectile=args.expectile) for r, w in zip(args.run, args.work)]
    reference = None
    if args.reference:
        table = json.loads(Path(args.reference).read_text())["results"]
        quality = runs[0]["dataset"].split("/")[-1].rsplit("-v", 1)[0]  # diffpolicy/<env>/<quality>-v<k>
        reference = {a: v["score_mean"] for a, v in table.get(quality, {}).items() if a in ("gaussian_bc", "idql",
                                                                                              "iql", "diffusion_ql")}
    report = {"runs": runs, "reference": reference}
    write_outputs(report, Path(args.out))
    print(report_file(args.out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

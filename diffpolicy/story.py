"""``diffpolicy demo`` (``make demo``): the library's whole story on one small problem.

1. make a local Minari dataset of Pendulum-v1 (D4RL's "medium": an SB3 SAC policy at about a
   third of the expert's return, trained here; reference scores from the random and expert policies);
2. train Gaussian BC, diffusion BC and Diffusion-QL on it (the offline loop: EMA, evaluation,
   CSV / TensorBoard logs, safetensors checkpoints);
3. fine-tune the diffusion BC online with DPPO (TorchRL collectors, PPO over the denoising chain);
4. print a comparison table and write plots (``compare.md / .json / .png``).

Every step is the same call the CLI makes (``diffpolicy dataset make``, ``train``, ``finetune``,
``compare``), each run is a run directory under ``out`` that resumes, so a second ``make demo``
only redoes what is missing. Budgets fit about 10 minutes on 2 CPU cores; ``quick`` is a smoke run.
"""
from __future__ import annotations

import pathlib
import time

__all__ = ["run_story", "STORY", "QUICK"]

# (what, budget) of the full story and of the smoke run
STORY = dict(transitions=20_000, behaviour_steps=8_000, offline_steps=4_000, eval_every=1_000, eval_episodes=5,
             env_steps=24_000, num_envs=4, steps_per_iter=250, ft_steps=5)
QUICK = dict(transitions=2_000, behaviour_steps=1_000, offline_steps=60, eval_every=30, eval_episodes=2,
             env_steps=800, num_envs=2, steps_per_iter=100, ft_steps=3)
ENV, QUALITY = "Pendulum-v1", "medium"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_story(out="runs/demo", *, quick: bool = False, progress: bool = True) -> dict:
    """Run the story into ``out``; returns the comparison report (see :func:`~diffpolicy.compare.compare_runs`)."""
    from diffpolicy.agents import describe_agent, load_agent, make_agent, make_online_agent
    from diffpolicy.agents.online import OnlineConfig, train_online
    from diffpolicy.agents.trainer import TrainConfig, train_offline
    from diffpolicy.compare import compare_runs, markdown
    from diffpolicy.envs.datasets import OfflineData, make_dataset

    b = QUICK if quick else STORY
    out = pathlib.Path(out)
    t0 = time.perf_counter()

    _say(f"1/4 dataset: {ENV} {QUALITY}, {b['transitions']} transitions from an SB3 SAC policy trained "
         f"{b['behaviour_steps']} steps here (reused when it exists)")
    ds = make_dataset(ENV, QUALITY, n_transitions=b["transitions"], behaviour_steps=b["behaviour_steps"],
                      behaviour_eval_every=max(500, b["behaviour_steps"] // 8), ref_episodes=5 if quick else 20,
                      progress=progress)
    data = OfflineData.from_minari(ds)
    if len(data) != b["transitions"]:
        print(f"note: reusing the existing {data.dataset_id} ({len(data)} transitions, not {b['transitions']}); "
              f"delete it (or `diffpolicy dataset make {ENV} {QUALITY} --overwrite ...`) to make the demo's own")
    print(f"{data.dataset_id}: {len(data)} transitions; reference returns random {data.ref_min_score:.1f}, "
          f"expert {data.ref_max_score:.1f}; dataset episodes score "
          f"{float(data.normalized_score(data.episode_returns().numpy()).mean()):.1f} on average")

    _say(f"2/4 offline training: Gaussian BC, diffusion BC, Diffusion-QL ({b['offline_steps']} gradient steps each)")
    runs = []
    small = {"diffusion_bc": dict(diffusion_steps=5, ema_start=min(500, b["offline_steps"] // 4)),
             "diffusion_ql": dict(ema_start=min(500, b["offline_steps"] // 4)), "gaussian_bc": {}}
    for name in ("gaussian_bc", "diffusion_bc", "diffusion_ql"):
        agent = make_agent(name, data.obs_dim, data.act_dim, **small[name])
        cfg = TrainConfig(steps=b["offline_steps"], batch_size=256, eval_every=b["eval_every"],
                          eval_episodes=b["eval_episodes"], log_every=max(10, b["eval_every"] // 4))
        res = train_offline(agent, data, cfg, run_dir=out / name, progress=progress)
        print(f"{name}: score {res['final']['score_mean']:.1f} ({res['train_seconds']:.0f} s)")
        runs.append(out / name)

    _say(f"3/4 online fine-tuning of the diffusion BC with DPPO ({b['env_steps']} env steps)")
    bc = load_agent(out / "diffusion_bc")  # the trained run, as `diffpolicy finetune --from` loads it
    dppo = make_online_agent("dppo", bc, num_envs=b["num_envs"], steps_per_iter=b["steps_per_iter"],
                             ft_steps=b["ft_steps"])
    iter_steps = b["num_envs"] * b["steps_per_iter"]
    ocfg = OnlineConfig(env_steps=b["env_steps"], eval_every=max(1, b["env_steps"] // iter_steps // 6),
                        eval_episodes=b["eval_episodes"], checkpoint_every=2)
    res = train_online(dppo, ENV, data, ocfg, run_dir=out / "dppo", progress=progress,
                       pretrained={"run": str((out / "diffusion_bc").resolve()), **describe_agent(bc)})
    print(f"dppo: score {res['history'][0]['score_mean']:.1f} -> {res['history'][-1]['score_mean']:.1f}")
    runs.append(out / "dppo")

    _say("4/4 comparison")
    report = compare_runs(runs, out / "compare")
    print(markdown(report), end="")
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.png'}; logs: tensorboard --logdir {out}; "
          f"total {time.perf_counter() - t0:.0f} s")
    return report

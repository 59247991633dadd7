"""benchmarks/finetune.py end to end on a tiny budget: every method and baseline, the JSON the issue asks for."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("finetune_bench", Path(__file__).parents[1] / "benchmarks" / "finetune.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_every_method_runs_end_to_end_and_the_table_reassembles(pendulum_data, tmp_path):
    args = ["--env", "Pendulum-v1", "--quality", "medium", "--seeds", "0", "--env-steps", "400", "--num-envs", "2",
            "--steps-per-iter", "50", "--eval-every", "1", "--eval-episodes", "1", "--pretrain-steps", "20",
            "--denoising-steps", "6", "--ft-steps", "3", "--action-chunk", "2",
            "--transitions", "2000", "--behaviour-steps", "1000", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out" / "finetune"), "--no-progress"]
    bench.main(args)
    rep = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert set(rep["results"]) == set(bench.METHODS)
    for m, r in rep["results"].items():
        assert r["env_steps"][0] == 0 and r["env_steps"][-1] >= 400, m
        assert len(r["scores"]) == len(r["env_steps"]) and r["seconds_per_iter"] > 0
        assert {"final_score_mean", "final_score_std"} <= set(r)
    assert isinstance(rep["start_score"], float) and rep["dppo_rollout_ratio_vs_bare"] > 0
    assert (tmp_path / "out" / "finetune.png").exists()
    assert "Not the defaults" not in (tmp_path / "out" / "finetune.md").read_text()
    pre = json.loads((tmp_path / "runs" / "pretrain" / "diffusion_bc" / "config.json").read_text())["agent_config"]
    assert (pre["diffusion_steps"], pre["horizon"]) == (6, 2)  # DPPO's chunked pre-training, at test size
    dppo = json.loads((tmp_path / "runs" / "dppo" / "seed0" / "config.json").read_text())
    assert dppo["agent_config"]["ft_steps"] == 3
    assert dppo["pretrained"]["run"] == str((tmp_path / "runs" / "pretrain" / "diffusion_bc").resolve())
    from diffpolicy.agents import load_agent  # a benchmark run opens like any fine-tuning run (diffpolicy eval)

    for m in ("dppo", "gaussian_ppo"):
        assert load_agent(tmp_path / "runs" / m / "seed0").name == m
    runs = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("seed0.json"))
    assert len(runs) == len(bench.METHODS)
    recorded = {p.parent.name: json.loads((tmp_path / "out" / p).read_text()).get("agent_config") for p in runs}
    assert recorded["dppo"]["ft_steps"] == 3 and recorded["dawr"]["buffer_size"] == 200_000  # which settings ran
    assert recorded["sb3_ppo"] is None
    md = (tmp_path / "out" / "finetune.md").read_text()
    assert "target <= 1.3)" in md and "smoke settings" not in md and rep["rollout"]["smoke"] is False
    for m, r in rep["results"].items():  # one seed: the final score alone (its spread is unknown, not zero)
        assert f"| {r['final_score_mean']:.1f} | {r['seconds_per_iter']:.2f} | 1 |" in md, m
    again = bench.main(args + ["--assemble"])  # no training: the same table from the run files
    assert again["results"] == rep["results"] and (tmp_path / "out" / "finetune.md").read_text() == md
    # a sweep that does not time (--no-rollout-ratio: every run here is finished) keeps the measured ratio
    kept = bench.main(args + ["--no-rollout-ratio"])
    assert kept["dppo_rollout_ratio_vs_bare"] == rep["dppo_rollout_ratio_vs_bare"] and kept["rollout"] == rep["rollout"]
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["dppo_rollout_ratio_vs_bare"] == rep["dppo_rollout_ratio_vs_bare"]
    # a sensitivity table names the settings that are not the defaults
    bench.main(args + ["--assemble", "--gaussian-clip", "0.01", "--out", str(tmp_path / "out" / "clip")])
    assert "Not the defaults: Gaussian PPO clip 0.01." in (tmp_path / "out" / "clip.md").read_text()
    # --pretrained: a BC run directory (or its checkpoint) restores that run's agent, with its own settings
    bc_run = tmp_path / "runs" / "pretrain" / "diffusion_bc"
    bc = bench.load_pretrained("diffusion_bc", str(bc_run / "checkpoint.safetensors"))
    assert bc.config.horizon == 2 and bc.config.diffusion_steps == 6
    with pytest.raises(ValueError, match="holds a diffusion_bc run, not gaussian_bc"):
        bench.load_pretrained("gaussian_bc", str(bc_run))


def _run(root, method, seed, steps, scores):
    p = root / method / f"seed{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"method": method, "seed": seed, "env_steps": steps[-1], "steps": steps, "scores": scores,
                             "final_score": scores[-1], "seconds_per_iter": 1.0}))


def test_a_table_at_a_budget_takes_every_run_that_reached_it_cut_there(tmp_path):
    _run(tmp_path, "dppo", 0, [0, 100, 200, 300, 400], [10.0, 11.0, 12.0, 13.0, 14.0])  # a longer run
    _run(tmp_path, "dppo", 1, [0, 100, 200], [10.0, 15.0, 20.0])
    _run(tmp_path, "dawr", 0, [0, 100], [10.0, 11.0])  # short of both budgets
    _run(tmp_path, "sb3_ppo", 0, [0, 100, 200, 208], [0.0, 1.0, 2.0, 3.0])  # SB3 ends past its last regular evaluation
    short = bench.assemble(tmp_path, "E", bench.METHODS, 200)["results"]
    assert set(short) == {"dppo", "sb3_ppo"}
    assert short["dppo"]["env_steps"] == [0, 100, 200] and short["dppo"]["final_score_mean"] == pytest.approx(16.0)
    assert short["dppo"]["seeds"] == [0, 1] and short["dppo"]["at_50"] == pytest.approx(13.0)
    assert short["sb3_ppo"]["final_score_mean"] == 2.0  # the evaluation at the budget, not the run's last
    long = bench.assemble(tmp_path, "E", bench.METHODS, 400)["results"]
    assert set(long) == {"dppo"} and long["dppo"]["seeds"] == [0] and long["dppo"]["final_score_mean"] == 14.0
    assert bench.at_budget({"env_steps": 150, "steps": [0, 100, 150], "scores": [0, 1, 2]}, 120)["final_score"] == 2
    assert bench.at_budget({"env_steps": 100, "steps": [0, 100], "scores": [0, 1]}, 120) is None


def test_the_clip_options_reach_the_agents():
    import argparse

    from diffpolicy.agents import make_agent

    gbc, bc = make_agent("gaussian_bc", 3, 2), make_agent("diffusion_bc", 3, 2, diffusion_steps=6, horizon=2)
    args = argparse.Namespace(num_envs=2, steps_per_iter=5, action_chunk=2, ft_steps=3, dppo_clip=None,
                              dppo_actor_lr=None, gaussian_clip=None)
    default_g, default_d = bench.make_method("gaussian_ppo", bc, gbc, args), bench.make_method("dppo", bc, gbc, args)
    assert default_g.config.clip_epsilon == 0.2 and default_g.config.steps_per_iter == 10  # unchunked: 2 x 5 decisions
    assert (default_d.config.clip_epsilon, default_d.config.ft_steps) == (0.1, 3)  # DPPOConfig's default
    args.gaussian_clip, args.dppo_clip = 0.01, 0.02
    assert bench.make_method("gaussian_ppo", bc, gbc, args).config.clip_epsilon == 0.01
    dppo = bench.make_method("dppo", bc, gbc, args)
    assert dppo.config.clip_epsilon == dppo.config.clip_epsilon_base == 0.02


def test_sb3_sac_resumes_with_its_replay_buffer(pendulum_data, tmp_path):
    import argparse

    from stable_baselines3 import SAC

    args = argparse.Namespace(env_steps=300, num_envs=1, steps_per_iter=50, action_chunk=1, eval_every=2,
                              eval_episodes=1)
    run = tmp_path / "sac"
    first = bench.run_sb3("sb3_sac", "Pendulum-v1", pendulum_data, 0, args, run)
    assert first["env_steps"] == 300 and [h["env_steps"] for h in first["history"]] == [0, 100, 200, 300]
    model = SAC.load(run / "model.zip")
    model.load_replay_buffer(run / "replay_buffer.pkl")
    assert model.replay_buffer.size() == 300
    args.env_steps = 500  # a longer budget continues the same run, buffer included
    again = bench.run_sb3("sb3_sac", "Pendulum-v1", pendulum_data, 0, args, run)
    assert [h["env_steps"] for h in again["history"]] == [0, 100, 200, 300, 400, 500]
    model.load_replay_buffer(run / "replay_buffer.pkl")
    assert model.replay_buffer.size() == 500  # 300 from before the resume, not 200
    (run / "replay_buffer.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="not its replay buffer"):
        bench.run_sb3("sb3_sac", "Pendulum-v1", pendulum_data, 0, args, run)

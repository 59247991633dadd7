"""The console script: the toy demo, datasets, train / finetune / eval / compare, the end-to-end demo."""
import json
import subprocess
import sys

import pytest
import torch

from diffpolicy.cli import main
from diffpolicy.demo import PLAN


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["toy-demo", "--train-steps", "40", "--ct-steps", "20", "--n-eval", "200",
                 "--n-held-out", "1000", "--hidden", "32", "--n-paired", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == len(PLAN)
    nfe = {(r["sampler"], r["steps"]): r["nfe"] for r in res["rows"]}
    assert nfe[("heun", 10)] == 19 and nfe[("ddim", 50)] == 50 and nfe[("consistency", 2)] == 2
    assert all(r["swd"] > 0 for r in res["rows"]) and res["floor_swd"] > 0
    assert (out / "samples.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| eps | dpmpp_2m | logsnr | 10 |" in printed and "| eps | dpmpp_2m | power 2.5 | 10 |" in printed
    assert "sliced W2" in printed and "DPM++ at least as good" in printed
    assert [(p["family"], p["grid"], p["n"]) for p in res["paired"]] == [
        ("eps", "quadratic", 2), ("eps", "power 2.5", 2), ("v", "quadratic", 2), ("v", "power 2.5", 2)]
    assert all(abs(p["mean_diff"]) < 10 and 0 <= p["dpm_wins"] <= 2 for p in res["paired"])


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["toy-demo", "--help"])
    assert e.value.code == 0 and "--train-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["toy-demo", "--train-steps", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_console_script_module_entry():
    r = subprocess.run([sys.executable, "-m", "diffpolicy.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_dataset_list_info_and_unknown_id(pendulum_data, capsys):
    assert main(["dataset", "list"]) == 0
    assert pendulum_data.dataset_id in capsys.readouterr().out
    assert main(["dataset", "info", pendulum_data.dataset_id]) == 0
    out = capsys.readouterr().out
    assert "2000 steps" in out and "ref_min_score" in out and "(3,)" in out
    assert main(["dataset", "info", "diffpolicy/none/medium-v0"]) == 2
    err = capsys.readouterr().err
    assert "diffpolicy dataset make" in err and pendulum_data.dataset_id in err
    with pytest.raises(SystemExit) as e:
        main(["dataset", "make", "--help"])
    assert e.value.code == 0 and "medium-replay" in capsys.readouterr().out


def test_dataset_make_with_a_td3_behaviour_policy(offline_home, tmp_path, monkeypatch, capsys):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))  # the session's Pendulum datasets stay SAC's
    assert main(["dataset", "make", "Pendulum-v1", "medium", "--algo", "td3", "--transitions", "300",
                 "--behaviour-steps", "600", "--behaviour-eval-every", "300", "--ref-episodes", "1"]) == 0
    did = "diffpolicy/pendulum/medium-v0"
    assert f"made {did}" in capsys.readouterr().out
    ds = minari.load_dataset(did)
    md = ds.storage.metadata
    assert ds.total_steps == 300 and "SB3 TD3 policy at step" in md["algorithm_name"]
    assert md["ref_max_score"] is not None and md["ref_min_score"] is not None
    # made again with other options: reused as it is, and the output says so
    assert main(["dataset", "make", "Pendulum-v1", "medium", "--transitions", "500"]) == 0
    out = capsys.readouterr().out
    assert f"reusing the existing {did} (" in out and "300 steps" in out and "--overwrite" in out
    assert minari.load_dataset(did).total_steps == 300


def test_dataset_make_rejects_unknown_quality(capsys):
    from diffpolicy.envs.datasets import QUALITIES

    with pytest.raises(SystemExit) as e:
        main(["dataset", "make", "Hopper-v5", "excellent"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(q in err for q in QUALITIES)


def test_image_pretrain_then_sample_and_clear_errors(tmp_path, capsys):
    run = tmp_path / "v"
    assert main(["image", "pretrain", str(run), "family=ddpm_v", "steps=20", "batch_size=16", "base_channels=8",
                 "log_every=10", "--no-progress"]) == 0
    assert "ddpm_v: 20 steps" in capsys.readouterr().out
    assert main(["image", "sample", str(run), "--n", "12", "--steps", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert "12 samples of ddpm_v at step 20" in capsys.readouterr().out
    import torch
    x = torch.load(tmp_path / "g.pt")
    assert x.shape == (12, 1, 8, 8) and (tmp_path / "g.png").stat().st_size > 0
    assert main(["image", "pretrain", str(run), "stesp=5"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["image", "sample", str(tmp_path / "nothing")]) == 2
    assert "holds no pre-training run" in capsys.readouterr().err
    assert main(["image", "sample", str(run), "--sampler", "magic"]) == 2
    assert "unknown sampler 'magic'" in capsys.readouterr().err
    # distil it into a few-step student, fine-tune it with a reward; both sample from their own directory
    import json

    student = tmp_path / "pd"
    assert main(["image", "distill", str(student), "--teacher", str(run), "method=pd", "pd_start=4",
                 "student_steps=3", "batch_size=8", "--no-progress"]) == 0
    assert "pd student" in capsys.readouterr().out
    rec = json.loads((student / "model.json").read_text())
    assert (rec["kind"], rec["steps"], rec["final"], rec["sampler"]) == ("student", 1, "round_1", "ddim")
    assert main(["image", "sample", str(student), "--n", "10", "--out", str(tmp_path / "s.png")]) == 0
    assert "10 samples of pd (ddim, 1 steps, classes 0-9)" in capsys.readouterr().out
    assert torch.load(tmp_path / "s.pt").shape == (10, 1, 8, 8)
    tuned = tmp_path / "ddpo"
    assert main(["image", "finetune", "ddpo", str(tuned), "--from", str(run), "reward=brightness", "iterations=2",
                 "batch_size=4", "sampling_steps=4", "--no-progress"]) == 0
    assert "ddpo on brightness: reward" in capsys.readouterr().out
    assert json.loads((tuned / "model.json").read_text())["kind"] == "tuned"
    assert main(["image", "sample", str(tuned), "--n", "10", "--out", str(tmp_path / "t.png")]) == 0
    assert "10 samples of ddpo (ddpm, 4 steps, classes 0-9)" in capsys.readouterr().out
    steer = tmp_path / "steer"  # unconditional samples toward one digit
    assert main(["image", "finetune", "draft", str(steer), "--from", str(run), "reward=class", "target_class=3",
                 "num_classes=0", "iterations=1", "batch_size=4", "sampling_steps=3", "--no-progress"]) == 0
    assert "draft on class: reward" in capsys.readouterr().out
    rec = json.loads((steer / "model.json").read_text())
    assert rec["reward_before"] < -0.5 and rec["num_classes"] == 0  # a 3 is one digit in ten
    assert main(["image", "sample", str(steer), "--n", "4", "--out", str(tmp_path / "u.png")]) == 0
    assert "unconditional) ->" in capsys.readouterr().out  # sampled as it was tuned
    assert main(["image", "sample", str(steer), "--guidance", "2"]) == 2
    assert "needs class labels" in capsys.readouterr().err
    assert main(["image", "finetune", "ddpoo", str(tuned), "--from", str(run)]) == 2
    assert "did you mean 'ddpo'" in capsys.readouterr().err
    assert main(["image", "distill", str(student), "--teacher", str(run), "method=magic"]) == 2
    assert "unknown distillation method 'magic'" in capsys.readouterr().err


def test_train_finetune_eval_compare_through_the_cli(pendulum_data, tmp_path, capsys):
    """The commands a user chains: each run directory is the next command's input."""
    did, bc, ft = pendulum_data.dataset_id, tmp_path / "bc", tmp_path / "ft"
    (tmp_path / "bc.yaml").write_text("agent:\n  hidden: 32\ntrain:\n  eval_episodes: 2\n")
    assert main(["train", "diffusion_bc", str(bc), "--dataset", did, "--config", str(tmp_path / "bc.yaml"),
                 "steps=40", "eval_every=20", "diffusion_steps=4", "--no-progress"]) == 0
    assert "diffusion_bc: 40 steps, final score" in capsys.readouterr().out
    conf = json.loads((bc / "config.json").read_text())
    assert conf["agent_config"]["hidden"] == 32 and conf["steps"] == 40 and conf["train"]["eval_episodes"] == 2
    assert main(["finetune", "dppo", str(ft), "--from", str(bc), "env_steps=400", "num_envs=2", "steps_per_iter=100",
                 "ft_steps=2", "eval_every=1", "eval_episodes=2", "--no-progress"]) == 0
    assert "dppo: 400 env steps" in capsys.readouterr().out
    assert json.loads((ft / "config.json").read_text())["pretrained"]["run"] == str(bc.resolve())
    # eval rebuilds each agent from its run directory alone: the fine-tuned one also after its source is gone
    scores = {}
    for run in (bc, ft):
        assert main(["eval", str(run), "--episodes", "2"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["episodes"] == 2 and rec["score_mean"] == rec["score_mean"]  # a number, not NaN
        scores[run] = rec["return_mean"]
    moved = tmp_path / "moved_bc"
    bc.rename(moved)
    assert main(["eval", str(ft), "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["return_mean"] == scores[ft]  # the same agent, the same episodes
    moved.rename(bc)
    assert main(["compare", str(bc), str(ft), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| diffusion_bc |" in table and "| fine-tuned dppo |" in table and "400 env steps" in table
    assert (tmp_path / "cmp.png").stat().st_size > 5_000
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    evals = (bc / "eval.csv").read_text().splitlines()
    assert rows[0]["final"] == pytest.approx(float(evals[-1].split(",")[3]))  # score_mean of the last evaluation


def test_finetune_from_scratch_through_the_cli(tmp_path, capsys):
    """No --from: an untrained policy (its settings under policy:) on --env, no dataset; eval and resume work."""
    ft = tmp_path / "scratch"
    argv = ["finetune", "dppo", str(ft), "--env", "Pendulum-v1", "policy.hidden=16", "policy.diffusion_steps=3",
            "env_steps=200", "num_envs=2", "steps_per_iter=50", "eval_every=1", "eval_episodes=1", "--no-progress"]
    assert main(argv) == 0
    assert "dppo: 200 env steps, return" in capsys.readouterr().out
    conf = json.loads((ft / "config.json").read_text())
    assert conf["dataset"] is None and conf["pretrained"]["run"] is None
    assert conf["pretrained"]["agent_config"]["hidden"] == 16 and conf["pretrained"]["agent_config"]["diffusion_steps"] == 3
    assert main(["eval", str(ft), "--episodes", "1"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["return_mean"] < 0 and rec["score_mean"] != rec["score_mean"]  # Pendulum's returns; no reference: NaN
    assert main([*argv[:-6], "env_steps=400", *argv[-5:]]) == 0  # a larger budget continues the run
    assert "dppo: 400 env steps" in capsys.readouterr().out
    assert len((ft / "train.csv").read_text().splitlines()) == 1 + 4
    changed = [a.replace("policy.hidden=16", "policy.hidden=16 policy.prediction=v").split(" ") for a in argv]
    assert main([b for a in changed for b in a]) == 2  # the same shapes, another policy: not this run
    assert "different configuration (scratch_policy differ)" in capsys.readouterr().err
    assert main(["finetune", "gaussian_ppo", str(tmp_path / "g"), "--env", "Pendulum-v1", "hidden=64"]) == 2
    assert "policy.hidden=64" in capsys.readouterr().err  # not silently the default width
    assert main(["finetune", "dppo", str(tmp_path / "x")]) == 2
    assert "--from RUN_DIR" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["finetune", "dppo", str(tmp_path / "x"), "--env", "Pendulum-v1", "policy.hiden=3"]) == 2
    assert "did you mean policy.hidden" in capsys.readouterr().err


def test_train_drops_non_finite_transitions_when_asked(offline_home, tmp_path, capsys):
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    eps = []
    for k in range(4):
        obs = rng.normal(size=(51, 3)).astype(np.float32)
        if k == 1:
            obs[10, 0] = np.nan
        eps.append(EpisodeBuffer(observations=obs, actions=rng.uniform(-2, 2, (50, 1)).astype(np.float32),
                                 rewards=rng.normal(size=50), terminations=np.zeros(50, bool),
                                 truncations=np.eye(50, dtype=bool)[-1]))
    minari.create_dataset_from_buffers("test/nan/pendulum-v0", eps, env=gym.make("Pendulum-v1").spec)
    run = tmp_path / "bc"
    argv = ["train", "diffusion_bc", str(run), "--dataset", "test/nan/pendulum-v0", "steps=4", "eval_every=4",
            "eval_episodes=1", "hidden=8", "--no-progress"]
    assert main(argv) == 2
    assert "non-finite values (observations: 1, next_observations: 1) in 2 of 200" in capsys.readouterr().err
    assert not run.exists()
    with pytest.warns(UserWarning, match="dropped 2 of 200"):
        assert main([*argv, "--drop-nonfinite"]) == 0
    assert json.loads((run / "config.json").read_text())["drop_nonfinite"] is True
    capsys.readouterr()
    with pytest.warns(UserWarning, match="dropped 2 of 200"):  # eval and finetune open the data the same way
        assert main(["eval", str(run), "--episodes", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 1
    with pytest.warns(UserWarning, match="dropped 2 of 200"):
        assert main(["finetune", "dppo", str(tmp_path / "ft"), "--from", str(run), "env_steps=20", "num_envs=1",
                     "steps_per_iter=20", "eval_episodes=1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["drop_nonfinite"] is True


@pytest.mark.parametrize("argv, message", [
    (["train", "diffusion_bc", "RUN", "--dataset", "diffpolicy/none/medium-v0"], "diffpolicy dataset make"),
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "hiden=3"], "did you mean 'hidden'"),
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "train.stpes=3"], "did you mean train.steps"),
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "--env", "Hopper-v5", "steps=2"], "Hopper-v5"),
    (["finetune", "dppo", "RUN", "--from", "NOWHERE"], "not a run directory"),
    (["eval", "NOWHERE"], "not a run directory"),
    (["compare", "NOWHERE"], "not an evaluated run directory"),
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "--env", "Hoper-v5", "steps=2"], "Hoper"),
    (["image", "sample", "NOWHERE"], "holds no pre-training run"),
])
def test_cli_errors_are_one_line_and_status_2(pendulum_data, tmp_path, capsys, argv, message):
    argv = [a.replace("RUN", str(tmp_path / "run")).replace("DID", pendulum_data.dataset_id)
            .replace("NOWHERE", str(tmp_path / "nowhere")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err  # a remote-id lookup may log its retries first
    tail = err[err.index("error: "):]
    assert message in tail and tail.count("\n") == 1
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv, message", [
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "device=cuda"], "sees no CUDA GPU"),
    (["train", "diffusion_bc", "RUN", "--dataset", "DID", "compile=bogus"], "inductor"),
    (["image", "pretrain", "RUN", "device=cuda:1"], "use device=cpu"),
    (["train", "diffusion_bc", "BUSY", "--dataset", "DID"], "in use by another process"),
])
def test_settings_and_busy_runs_are_refused_before_anything_is_written(pendulum_data, tmp_path, capsys, argv,
                                                                        message):
    import fcntl
    import os

    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)  # another trainer holds this run directory
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        argv = [a.replace("RUN", str(tmp_path / "run")).replace("BUSY", str(busy))
                .replace("DID", pendulum_data.dataset_id) for a in argv]
        assert main(argv) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and list(busy.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bad_device_under_torchrun_is_one_line_too(tmp_path, capsys, monkeypatch):
    """torchrun's environment makes the CLI pick this rank's GPU before training starts: the check
    comes first there as well (it used to be a traceback from torch.cuda.set_device)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["image", "pretrain", str(tmp_path / "run"), "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sees no CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_finetune_needs_the_matching_pretrained_agent(pendulum_data, tmp_path, capsys):
    assert main(["train", "gaussian_bc", str(tmp_path / "g"), "--dataset", pendulum_data.dataset_id, "steps=2",
                 "eval_every=2", "eval_episodes=1", "--no-progress"]) == 0
    assert main(["finetune", "dppo", str(tmp_path / "ft"), "--from", str(tmp_path / "g")]) == 2
    assert "dppo fine-tunes a trained diffusion_bc" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for argv in (["train"], ["finetune"], ["eval"], ["compare"], ["demo"], ["toy-demo"], ["dataset", "make"],
                 ["image", "pretrain"], ["image", "sample"], ["image", "distill"], ["image", "finetune"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0 and "usage: diffpolicy" in capsys.readouterr().out


def test_the_end_to_end_demo_on_smoke_budgets(pendulum_data, tmp_path, capsys):
    """`make demo`'s story with QUICK budgets on the session's Pendulum dataset."""
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for step in ("1/4 dataset", "2/4 offline", "3/4 online", "4/4 comparison"):
        assert step in printed
    rows = json.loads((tmp_path / "demo" / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["gaussian_bc", "diffusion_bc", "diffusion_ql", "fine-tuned dppo"]
    assert (tmp_path / "demo" / "compare.png").exists() and (tmp_path / "demo" / "dppo" / "tb").is_dir()



def test_eval_rescores_a_run_under_other_acting_settings_only(pendulum_data, tmp_path, capsys):
    run = tmp_path / "idql"
    assert main(["train", "idql", str(run), "--dataset", pendulum_data.dataset_id, "steps=10", "eval_every=10",
                 "eval_episodes=1", "hidden=16", "depth=1", "critic_hidden=16", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "selection=expectile", "candidates=8", "temperature=0.5", "--episodes", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {"candidates": 8, "selection": "expectile",
                                                               "sampler": "ddpm", "temperature": 0.5}
    assert json.loads((run / "config.json").read_text())["agent_config"]["selection"] == "argmax"  # run untouched
    assert main(["eval", str(run), "lr=0.1"]) == 2  # a training setting needs a new run
    assert "'lr' cannot change here: only candidates, selection, sampler, temperature can" in capsys.readouterr().err
    assert main(["eval", str(run), "selection=magic"]) == 2
    assert "unknown selection 'magic'" in capsys.readouterr().err

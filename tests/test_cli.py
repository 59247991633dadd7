"""The console script and the demo (main job) on a tiny budget."""
import json
import subprocess
import sys

import pytest

from diffpolicy.cli import main
from diffpolicy.demo import PLAN


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--train-steps", "40", "--ct-steps", "20", "--n-eval", "200",
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
        main(["demo", "--help"])
    assert e.value.code == 0 and "--train-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--train-steps", "many"])
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

"""Reliability: a run killed with SIGKILL resumes to the same weights as an uninterrupted one,
and a checkpoint crafted to run code on load runs nothing."""
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffpolicy.images import ImagePretrainConfig, pretrain_images
from diffpolicy.runlog import open_run

CFG = dict(family="ddpm_v", steps=120, batch_size=16, base_channels=8, log_every=10, checkpoint_every=10, lr=1e-3)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_mid_run_then_resume_matches_a_straight_run(tmp_path):
    run = tmp_path / "run"
    # the same thread count as this process: float sums must associate the same way for bit equality
    script = (f"import torch; torch.set_num_threads({torch.get_num_threads()})\n"
              "from diffpolicy.images import ImagePretrainConfig, pretrain_images\n"
              f"pretrain_images(ImagePretrainConfig(**{CFG!r}), run_dir={str(run)!r}, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpt, deadline = run / "checkpoint.pt", time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    if torch.load(ckpt, weights_only=True)["state"]["step"] >= 30:
                        break
                except Exception:  # being replaced right now: read it again
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["state"]["step"]  # the file on disk is whole
    assert 30 <= killed_at < CFG["steps"]
    resumed = pretrain_images(ImagePretrainConfig(**CFG), run_dir=run, progress=False)
    straight = pretrain_images(ImagePretrainConfig(**CFG), progress=False)
    for a, b in zip(resumed["model"].parameters(), straight["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(resumed["ema"].parameters(), straight["ema"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [int(line.split(",")[0]) for line in (run / "train.csv").read_text().splitlines()[1:]]
    assert steps == list(range(10, 121, 10))  # each log row once, none lost or repeated


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_checkpoint_crafted_to_run_code_runs_nothing(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        open_run(run, {"a": 1}, {"steps": 10})  # every training loop resumes through open_run
    with pytest.raises(pickle.UnpicklingError):
        pretrain_images(ImagePretrainConfig(**CFG), run_dir=run, progress=False)
    assert not _Payload.marker.exists()

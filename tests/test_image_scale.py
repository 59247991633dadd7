"""Image pre-training at scale on CPU: bf16 autocast trains, and two gloo DDP processes keep
identical replicas that differ from the initial weights."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffpolicy.images import ImagePretrainConfig, pretrain_images
from diffpolicy.checkpoint import load_checkpoint


def _cfg(**kw):
    return ImagePretrainConfig(**{"family": "ddpm_v", "steps": 30, "batch_size": 16, "base_channels": 8,
                                  "log_every": 10, "lr": 1e-3, **kw})


def test_bf16_autocast_trains_with_float32_weights():
    out = pretrain_images(_cfg(bf16=True, steps=60), progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in out["model"].parameters())


def _worker(rank, world, store, out_dir, run_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = pretrain_images(_cfg(checkpoint_every=10), run_dir=run_dir, progress=False)
        torch.save({k: v.clone() for k, v in out["model"].state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_keep_identical_replicas(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), str(tmp_path / "run")), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = pretrain_images(_cfg(steps=0), progress=False)["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())
    # rank 0 alone wrote the run: one log row per 10 steps, and its checkpoint holds the replicas' weights
    assert (tmp_path / "run" / "train.csv").read_text().count("\n") == 4
    saved = load_checkpoint(tmp_path / "run")["model"]
    for k in a:
        torch.testing.assert_close(saved[k], a[k], rtol=0, atol=0)


def test_the_cli_under_torchrun_trains_one_run_with_two_processes(tmp_path):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "diffpolicy.cli", "image",
                          "pretrain", str(run), "family=ddpm_v", "steps=20", "batch_size=16", "base_channels=8",
                          "log_every=10", "checkpoint_every=10", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("ddpm_v: 20 steps") == 1  # rank 0 reports, once
    assert (run / "train.csv").read_text().count("\n") == 3
    assert load_checkpoint(run)["state"]["step"] == 20

"""Data-parallel offline training: 2 CPU processes (gloo) keep identical replicas, rank 0 writes
the run, and a resumed DDP run equals an uninterrupted one."""
import json

import torch
import torch.multiprocessing as mp

from diffpolicy.checkpoint import load_checkpoint


def _worker(rank, world, store, dataset, run, steps, out):
    import torch.distributed as dist

    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline
    from diffpolicy.envs.datasets import OfflineData, load_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = OfflineData.from_minari(load_dataset(dataset, download=False))
        torch.manual_seed(100 + rank)  # different initial weights per rank: rank 0's must win
        agent = make_agent("diffusion_ql", data.obs_dim, data.act_dim, hidden=32, ema_start=5, ema_every=1)
        train_offline(agent, data, TrainConfig(steps=steps, batch_size=16, log_every=5), run_dir=run,
                      progress=False, evaluate=False)
        torch.save({k: v.clone() for k, v in agent.state_dict().items() if isinstance(v, torch.Tensor)},
                   f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, tag, dataset, run, steps):
    store = tmp_path / f"store_{tag}"
    mp.spawn(_worker, args=(2, str(store), dataset, str(run), steps, str(tmp_path / tag)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{tag}{r}.pt") for r in range(2)]


def test_two_process_offline_training_keeps_replicas_and_resumes_exactly(tmp_path, pendulum_data):
    did = pendulum_data.dataset_id
    a0, a1 = _spawn(tmp_path, "a", did, tmp_path / "run", 12)
    for k in a0:  # the gradients were averaged: each rank saw other batches, yet the weights agree
        torch.testing.assert_close(a0[k], a1[k], rtol=0, atol=0, msg=k)
    saved = load_checkpoint(tmp_path / "run")["agent"]
    weights = [k for k in a0 if k in saved and isinstance(saved[k], torch.Tensor)]
    assert len(weights) > 10
    for k in weights:  # rank 0 wrote the common weights
        torch.testing.assert_close(saved[k], a0[k], rtol=0, atol=0, msg=k)
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["world_size"] == 2 and conf["steps"] == 12
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10", "12"]  # one writer: each row once
    # resume to 20 steps == a straight 20-step run
    r0, _ = _spawn(tmp_path, "r", did, tmp_path / "run", 20)
    s0, _ = _spawn(tmp_path, "s", did, tmp_path / "straight", 20)
    for k in s0:
        torch.testing.assert_close(r0[k], s0[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a0[k], s0[k]) for k in s0 if a0[k].is_floating_point())  # it did train on


def _grad_worker(rank, world, store, out):
    import torch.distributed as dist

    from diffpolicy.agents.diffusion_bc import DiffusionBC
    from diffpolicy.agents.trainer import _join_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        agent = DiffusionBC(3, 1, hidden=8)
        _join_ranks(agent, rank, None, None, agent.load_state_dict)
        params = list(agent.actor.parameters())
        agent._optimizers["actor"] = torch.optim.SGD(params, lr=0.1)  # plain SGD: the step shows the gradient's scale
        g = torch.Generator().manual_seed(7 + rank)
        weights = [torch.randn(p.shape, generator=g) for p in params]  # this rank's gradient
        agent.step("actor", sum((w * p).sum() for w, p in zip(weights, params)))
        torch.save([p.detach().clone() for p in params], f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_step_uses_the_mean_of_the_ranks_gradients(tmp_path):
    """Rank r's loss ``sum(w_r * theta)`` has gradient ``w_r``; one SGD step must give
    ``theta_0 - lr (w_0 + w_1) / 2`` on both ranks, from rank 0's initial weights (not the sum, nor
    either rank's own gradient)."""
    from diffpolicy.agents.diffusion_bc import DiffusionBC

    mp.spawn(_grad_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "p")), nprocs=2, join=True)
    torch.manual_seed(100)
    start = [p.detach().clone() for p in DiffusionBC(3, 1, hidden=8).actor.parameters()]
    w = [[torch.randn(p.shape, generator=g) for p in start]
         for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))]
    expected = [p - 0.1 * (a + b) / 2 for p, a, b in zip(start, *w)]
    for rank in range(2):
        got = torch.load(tmp_path / f"p{rank}.pt")
        for e, x in zip(expected, got):
            torch.testing.assert_close(x, e, rtol=1e-6, atol=1e-7)


def test_diffpolicy_train_under_torchrun(tmp_path, pendulum_data):
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the Minari directory of this session travels in the env
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "diffpolicy.cli", "train",
                          "diffusion_bc", str(run), "--dataset", pendulum_data.dataset_id, "steps=6", "eval_every=6",
                          "eval_episodes=1", "log_every=3", "hidden=32", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("diffusion_bc: 6 steps, final score") == 1  # rank 0 reports, once
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "eval.csv").read_text().count("\n") == 2 and load_checkpoint(run)["state"]["step"] == 6

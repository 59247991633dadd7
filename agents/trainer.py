"""The one offline training loop every agent shares, and its run directory.

``train_offline(agent, data, config, run_dir=...)``: checks the dataset against the env,
samples batches from a TorchRL replay buffer, calls ``agent.update``, evaluates every
``eval_every`` steps with :func:`diffpolicy.envs.evaluate` (fixed seeds, normalised score),
logs to CSV and TensorBoard, checkpoints atomically and resumes from the last checkpoint.
A non-finite loss stops the run with the step and the loss term named; the last good
checkpoint is kept.

Under ``torchrun`` (an initialised process group, gloo on CPU or NCCL on CUDA) it is data
parallel: every rank samples its own ``batch_size`` batch (the effective batch is
``world x batch_size``; the world size is part of the run's identity), the agent's gradients are
averaged over the ranks before clipping and each optimiser step (as DistributedDataParallel
does), so the replicas stay identical; the RNG is reseeded from ``(seed, rank, step)`` every
step, so a resumed run continues exactly; rank 0 alone evaluates, logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import torch
from torch import Tensor

from diffpolicy.checkpoint import CHECKPOINT, load_state_checked, save_checkpoint
from diffpolicy.runlog import RunLogger as _Logger
from diffpolicy.runlog import check_compile_backend, check_device, open_run, process_group, release_run, with_config_defaults
from diffpolicy.runlog import rng_state as _rng_state
from diffpolicy.runlog import set_rng_state as _set_rng_state
from diffpolicy.runlog import set_seed as _set_seed

from .base import OfflineAgent

__all__ = ["TrainConfig", "train_offline", "evaluate_agent", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf."""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 256
    eval_every: int = 10_000
    eval_episodes: int = 10
    eval_seed: int = 1_000_000
    seed: int = 0
    log_every: int = 1_000
    # how, not what: not part of a run's identity (a run may resume on another device)
    device: str = "cpu"           # "cuda", "cuda:1", ...: networks, optimiser state and batches live there
    bf16: bool = False            # bfloat16 autocast around each update (the weights stay float32)
    compile: str = ""             # a torch.compile backend ("inductor", "aot_eager", ...) for every network; "" off


_HOW = ("steps", "device", "bf16", "compile")  # TrainConfig fields that do not change what a run computes


def evaluate_agent(agent: OfflineAgent, data, env_id: str | None = None, *, episodes: int = 10, seed: int = 0):
    """Evaluate ``agent.act`` on ``episodes`` episodes (fixed seeds); returns an ``EvalResult`` with scores."""
    from diffpolicy.envs.factory import evaluate

    was_training = agent.training
    agent.eval()
    device = next(agent.parameters()).device

    def act(obs):  # the env is on the CPU
        return agent.act(obs.to(device)).cpu()

    try:
        score_fn = data.normalized_score if data.ref_min_score is not None else None
        return evaluate(act if device.type != "cpu" else agent.act, env_id or data.env_id, episodes=episodes, seed=seed, obs_loc=data.obs_mean,
                        obs_scale=data.obs_std, score_fn=score_fn, reset=agent.reset)
    finally:
        agent.train(was_training)


def train_offline(agent: OfflineAgent, data, config: TrainConfig | None = None, *, env_id: str | None = None,
                  run_dir: str | os.PathLike | None = None, progress: bool = True, evaluate: bool = True) -> dict:
    """Train ``agent`` on ``data`` (an :class:`~diffpolicy.envs.datasets.OfflineData`).

    Returns ``{"history": [eval records], "train_seconds": s, "steps": n, "final": last record}``.
    With ``run_dir`` the run writes ``config.json``, ``train.csv``, ``eval.csv``, TensorBoard
    events and ``checkpoint.safetensors`` there, and a second call with the same ``run_dir`` resumes.
    """
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    device = check_device(cfg.device)
    check_compile_backend(cfg.compile)
    rank, world = process_group()
    env_id = env_id or data.env_id
    if evaluate:
        if env_id is None:
            raise ValueError("the dataset names no environment: pass env_id= (or evaluate=False)")
        data.check_env(env_id)
    elif env_id is not None:
        data.check_env(env_id)
    run_path = pathlib.Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT if run_path is not None and rank == 0 else None
    _set_seed(cfg.seed)
    agent.to(device)
    reward_scale = data.return_range_scale() if agent.reward_normalization == "return_range" else 1.0
    rb = data.replay_buffer(cfg.batch_size, sequences=agent.sequence_spec, reward_scale=reward_scale,
                            device=device if device.type != "cpu" else None)
    state = {"step": 0, "history": [], "train_seconds": 0.0}
    run_config = json.loads(json.dumps({
        "agent": agent.name, "agent_config": dataclasses.asdict(agent.config),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _HOW},
        "dataset": data.dataset_id, "env_id": env_id, "reward_scale": reward_scale,
        **({"drop_nonfinite": True} if getattr(data, "dropped_nonfinite", 0) else {}),  # how to open the data again
        **({"world_size": world} if world > 1 else {})}, default=str))
    def fill_old(old):  # settings added to the agent since the run started: at their defaults (or legacy values)
        acting = {k: run_config["agent_config"][k] for k in agent.acting_fields}  # acting-only: may change
        return with_config_defaults(old, agent.config, acting, getattr(type(agent), "legacy_settings", None))

    sizes = {"obs_dim": agent.obs_dim, "act_dim": agent.act_dim}  # for load_agent; not compared on resume
    def load(s):
        load_state_checked(agent, s["agent"], f"{agent.name} agent", run_path)

    saved, error = None, None
    if rank == 0:
        try:
            saved = open_run(run_path, run_config, {"steps": cfg.steps, **sizes}, fill_old=fill_old, load=load)
        except Exception as e:  # a config mismatch, a checkpoint that does not fit, an unwritable directory
            error = e
    if world > 1:
        saved = _join_ranks(agent, rank, saved, error, load)
    else:
        agent.grad_sync = None  # a DDP run's agent trained again in one process
        if error is not None:
            raise error
    if saved is not None:
        state = saved["state"]
        _set_rng_state(saved["rng"])
    logger = _Logger(run_path if rank == 0 else None, resume_step=state["step"])

    def checkpoint():
        if ckpt_path is not None:
            save_checkpoint({"agent": agent.state_dict(), "state": state, "rng": _rng_state()}, ckpt_path)

    def run_eval(step):
        with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
            res = evaluate_agent(agent, data, env_id, episodes=cfg.eval_episodes, seed=cfg.eval_seed)
        rec = {"step": step, "return_mean": res.return_mean, "return_std": res.return_std,
               "score_mean": res.score_mean, "score_std": res.score_std}
        state["history"].append(rec)
        logger.write("eval", step, {k: v for k, v in rec.items() if k != "step"})
        return rec

    pending: dict[str, list[tuple[int, Tensor]]] = {}  # metrics since the last flush, still on the device

    def flush(clear: bool = True) -> dict[str, float]:
        """Means of the pending metrics, read in one transfer (no per-step device sync); a non-finite
        value stops the run, naming its first step, before anything after it is logged or saved."""
        means, first_bad = {}, None
        for k, rows in pending.items():
            values = torch.stack([v for _, v in rows]).double().cpu()  # one conversion and transfer per row
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad) and first_bad is None:
                i = int(bad[0, 0])
                first_bad = f"{k} is {float(values[i])} at step {rows[i][0]}"
            means[k] = float(values.mean())
        if world > 1 and _any_rank(first_bad is not None) and first_bad is None:  # every rank stops together
            first_bad = f"a loss is not finite on another rank by step {step}"
        if first_bad is not None:
            raise NonFiniteLossError(
                f"{agent.name}: {first_bad}; stopped before saving, the last good checkpoint "
                f"({ckpt_path if ckpt_path is not None else 'none: no run_dir'}) is kept")
        if clear:
            pending.clear()
        return means

    if cfg.compile:
        compile_networks(agent, cfg.compile)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{agent.name}", disable=not progress or rank > 0,
               unit="step")
    agent.train()
    t0 = time.perf_counter()
    try:
        while state["step"] < cfg.steps:
            if world > 1:  # each rank its own batches and noise; a resumed run continues the same streams
                torch.manual_seed(((cfg.seed * 1_000_003 + rank) * 1_000_003 + state["step"]) % 2 ** 63)
            batch = rb.sample()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                metrics = agent.update(batch)
            state["step"] += 1
            step = state["step"]
            for k, v in metrics.items():
                pending.setdefault(k, []).append((step, v.detach().reshape(()) if isinstance(v, Tensor) else torch.tensor(v)))
            eval_now = evaluate and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = flush()
                logger.write("train", step, means)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:3]})
            elif eval_now:
                flush(clear=False)  # checked before the checkpoint, logged with the next row
            bar.update(1)
            if eval_now:  # every rank reaches here (the same flushes); rank 0 evaluates and saves
                state["train_seconds"] += time.perf_counter() - t0
                if rank == 0:
                    run_eval(step)
                checkpoint()
                t0 = time.perf_counter()
            elif not evaluate and step == cfg.steps:
                state["train_seconds"] += time.perf_counter() - t0
                checkpoint()
    finally:
        bar.close()
        logger.close()
        release_run(run_path)
        agent.grad_sync = None  # the process group may be gone after this call
    final = state["history"][-1] if state["history"] else None
    return {"history": state["history"], "train_seconds": state["train_seconds"], "steps": state["step"],
            "final": final}


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (all of them stop together)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _join_ranks(agent, rank: int, saved, error, load):
    """DDP start: every rank learns rank 0's verdict on the run directory, resumes from rank 0's
    checkpoint (sent, so the run directory need not be shared between nodes), starts from rank 0's
    weights, and averages its gradients with the others."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    dist = torch.distributed
    verdict = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        if error is not None:
            raise error
        raise ValueError(f"rank 0 stopped: {verdict[0]}")
    shared = [saved if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # rank 0's own objects, never a file's
    saved = shared[0]
    if rank and saved is not None:
        load(saved)
    for t in [*agent.parameters(), *agent.buffers()]:  # identical replicas, whatever each rank built
        dist.broadcast(t.data, src=0)
    world = dist.get_world_size()

    def average(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)

    agent.grad_sync = average
    return saved


def compile_networks(agent, backend: str = "inductor") -> int:
    """``torch.compile`` the agent's denoiser networks (``MLPDenoiser``, ``TemporalUnet1D``,
    ``Unet2D``: a chain runs them K times per action) and its twin critics, in place
    (``nn.Module.compile``: parameters, state-dict keys and checkpoints are unchanged); returns how
    many were compiled. Networks held inside TorchRL losses (TD3+BC, IQL, Gaussian BC) are left as
    they are."""
    from diffpolicy.nets import MLPDenoiser, TemporalUnet1D, Unet2D

    from .critics import TwinQ

    nets = [m for m in agent.modules() if isinstance(m, (MLPDenoiser, TemporalUnet1D, Unet2D, TwinQ))]
    for m in nets:
        m.compile(backend=backend)
    return len(nets)

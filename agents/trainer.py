"""The one offline training loop every agent shares, and its run directory.

``train_offline(agent, data, config, run_dir=...)``: checks the dataset against the env,
samples batches from a TorchRL replay buffer, calls ``agent.update``, evaluates every
``eval_every`` steps with :func:`diffpolicy.envs.evaluate` (fixed seeds, normalised score),
logs to CSV and TensorBoard, checkpoints atomically and resumes from the last checkpoint.
A non-finite loss stops the run with the step and the loss term named; the last good
checkpoint is kept.
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
from diffpolicy.runlog import open_run
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


def evaluate_agent(agent: OfflineAgent, data, env_id: str | None = None, *, episodes: int = 10, seed: int = 0):
    """Evaluate ``agent.act`` on ``episodes`` episodes (fixed seeds); returns an ``EvalResult`` with scores."""
    from diffpolicy.envs.factory import evaluate

    was_training = agent.training
    agent.eval()
    try:
        score_fn = data.normalized_score if data.ref_min_score is not None else None
        return evaluate(agent.act, env_id or data.env_id, episodes=episodes, seed=seed, obs_loc=data.obs_mean,
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
    env_id = env_id or data.env_id
    if evaluate:
        if env_id is None:
            raise ValueError("the dataset names no environment: pass env_id= (or evaluate=False)")
        data.check_env(env_id)
    elif env_id is not None:
        data.check_env(env_id)
    run_path = pathlib.Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT if run_path is not None else None
    _set_seed(cfg.seed)
    reward_scale = data.return_range_scale() if agent.reward_normalization == "return_range" else 1.0
    rb = data.replay_buffer(cfg.batch_size, sequences=agent.sequence_spec, reward_scale=reward_scale)
    state = {"step": 0, "history": [], "train_seconds": 0.0}
    run_config = json.loads(json.dumps({
        "agent": agent.name, "agent_config": dataclasses.asdict(agent.config),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"},
        "dataset": data.dataset_id, "env_id": env_id, "reward_scale": reward_scale}, default=str))
    def fill_old(old):  # settings added to the agent since the run started: at their defaults
        defaults = json.loads(json.dumps(dataclasses.asdict(type(agent.config)()), default=str))
        return {**old, "agent_config": {**defaults, **old.get("agent_config", {})}}

    saved = open_run(run_path, run_config, {"steps": cfg.steps}, fill_old=fill_old,
                     load=lambda s: load_state_checked(agent, s["agent"], f"{agent.name} agent", run_path))
    if saved is not None:
        state = saved["state"]
        _set_rng_state(saved["rng"])
    logger = _Logger(run_path, resume_step=state["step"])

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
        means = {}
        for k, rows in pending.items():
            values = torch.stack([v for _, v in rows]).double().cpu()  # one conversion and transfer per row
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                i = int(bad[0, 0])
                raise NonFiniteLossError(
                    f"{agent.name}: {k} is {float(values[i])} at step {rows[i][0]}; stopped before saving, the last "
                    f"good checkpoint ({ckpt_path if ckpt_path is not None else 'none: no run_dir'}) is kept")
            means[k] = float(values.mean())
        if clear:
            pending.clear()
        return means

    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{agent.name}", disable=not progress, unit="step")
    agent.train()
    t0 = time.perf_counter()
    try:
        while state["step"] < cfg.steps:
            batch = rb.sample()
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
            if eval_now:
                state["train_seconds"] += time.perf_counter() - t0
                run_eval(step)
                checkpoint()
                t0 = time.perf_counter()
            elif not evaluate and step == cfg.steps:
                state["train_seconds"] += time.perf_counter() - t0
                checkpoint()
    finally:
        bar.close()
        logger.close()
    final = state["history"][-1] if state["history"] else None
    return {"history": state["history"], "train_seconds": state["train_seconds"], "steps": state["step"],
            "final": final}

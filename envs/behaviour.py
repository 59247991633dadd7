"""Behaviour policies for dataset making: stable-baselines3 agents trained here and cached.

D4RL made its locomotion datasets from one SAC run per environment: ``expert`` is the
final policy, ``medium`` a policy saved part-way at roughly a third of the expert's return,
and ``medium-replay`` the replay buffer up to that point (Fu et al. 2020, sec. 5). We do the
same with stable-baselines3. A run evaluates and checkpoints every ``eval_every`` steps, so
the medium policy is simply the checkpoint whose return is closest to a third of the best
one, and the replay buffer (saved with the run) gives medium-replay.

Runs are cached under ``$DIFFPOLICY_HOME/behaviour/<env>/<algo>-seed<k>-<steps>/`` (default
``~/.diffpolicy``) and resume from their last checkpoint when interrupted.

Note: stable-baselines3 checkpoints are zip files that may contain pickled objects; load
only behaviour caches you made yourself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable

import numpy as np

__all__ = ["BehaviourRun", "Checkpoint", "diffpolicy_home", "default_eval_every", "train_behaviour_policy", "ALGOS"]

ALGOS = ("sac", "td3", "tqc")


def diffpolicy_home() -> pathlib.Path:
    """Root of diffpolicy's caches: ``$DIFFPOLICY_HOME`` or ``~/.diffpolicy``."""
    return pathlib.Path(os.environ.get("DIFFPOLICY_HOME", pathlib.Path.home() / ".diffpolicy"))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    step: int
    return_mean: float
    return_std: float
    path: str


@dataclasses.dataclass
class BehaviourRun:
    """A finished (cached) behaviour-policy training run."""

    env_id: str
    algo: str
    seed: int
    total_steps: int
    directory: pathlib.Path
    checkpoints: list[Checkpoint]

    @property
    def replay_path(self) -> pathlib.Path:
        return self.directory / "replay.npz"

    def best(self) -> Checkpoint:
        """The expert: the checkpoint with the highest evaluated return."""
        return max(self.checkpoints, key=lambda c: c.return_mean)

    def medium(self, fraction: float = 1.0 / 3.0, floor: float | None = None) -> Checkpoint:
        """The checkpoint whose return is closest to ``fraction`` of the expert's (D4RL's medium).

        Returns are measured from ``floor`` (the random policy's return; default: the worst
        checkpoint's), so environments with negative returns are handled too.
        """
        lo = min(c.return_mean for c in self.checkpoints) if floor is None else floor
        hi = self.best().return_mean
        target = lo + fraction * (hi - lo)
        earlier = [c for c in self.checkpoints if c.step <= self.best().step]
        return min(earlier, key=lambda c: abs(c.return_mean - target))

    def load_policy(self, checkpoint: Checkpoint, device: str = "cpu"):
        """The stable-baselines3 model of ``checkpoint``."""
        return _algo_class(self.algo).load(checkpoint.path, device=device)

    def replay(self, up_to_step: int | None = None) -> dict[str, np.ndarray]:
        """The training replay buffer (in env order) up to ``up_to_step`` environment steps."""
        with np.load(self.replay_path) as data:
            out = {k: data[k] for k in data.files}
        if up_to_step is not None:
            out = {k: v[:up_to_step] for k, v in out.items()}
        return out


def _algo_class(algo: str):
    algo = algo.lower()
    if algo == "sac":
        from stable_baselines3 import SAC

        return SAC
    if algo == "td3":
        from stable_baselines3 import TD3

        return TD3
    if algo == "tqc":
        try:
            from sb3_contrib import TQC
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("algo='tqc' needs sb3-contrib: pip install sb3-contrib") from e
        return TQC
    raise ValueError(f"unknown behaviour algorithm {algo!r}; choose one of {ALGOS}")


def evaluate_sb3(model, env_id: str, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the undiscounted return of ``model`` (deterministic actions)."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _export_replay(model, path: pathlib.Path) -> None:
    """Save the first ``n`` transitions of an SB3 replay buffer in env order (single env).

    Actions are stored in the env's own units (SB3 keeps them rescaled to [-1, 1]).
    ``terminated`` excludes time-limit truncations, which SB3 records as ``timeouts``.
    """
    buf = model.replay_buffer
    n = buf.buffer_size if buf.full else buf.pos
    if buf.full and buf.pos != 0:
        raise RuntimeError("the behaviour replay buffer wrapped around; give it total_steps capacity")
    actions = model.policy.unscale_action(buf.actions[:n, 0]) if hasattr(model.policy, "unscale_action") else buf.actions[:n, 0]
    dones = buf.dones[:n, 0].astype(bool)
    timeouts = buf.timeouts[:n, 0].astype(bool)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        observations=buf.observations[:n, 0],
        next_observations=buf.next_observations[:n, 0],
        actions=actions.astype(np.float32),
        rewards=buf.rewards[:n, 0],
        terminated=dones & ~timeouts,
        done=dones,
    )
    os.replace(tmp, path)


def default_eval_every(total_steps: int) -> int:
    """Checkpoint spacing of a behaviour run: about a 15th of it, within ``[1000, 10000]`` steps (and no more
    than the run), rounded down to a divisor of ``total_steps`` so the last step is checkpointed too."""
    every = min(total_steps, 10_000, max(1_000, total_steps // 15))
    while total_steps % every:
        every -= 1
    return every


def train_behaviour_policy(
    env_id: str,
    *,
    algo: str = "sac",
    total_steps: int = 150_000,
    eval_every: int | None = None,
    eval_episodes: int = 5,
    seed: int = 0,
    learning_starts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BehaviourRun:
    """Train (or load from cache, or resume) a stable-baselines3 behaviour policy.

    Every ``eval_every`` steps (default :func:`default_eval_every`; it must divide ``total_steps``)
    the policy is evaluated over ``eval_episodes`` deterministic episodes and saved; the replay
    buffer is saved with it so a killed run resumes from the last checkpoint. A cached run
    checkpointed at another spacing is an error (the medium policy is chosen among the
    checkpoints). ``learning_starts`` (random warm-up steps) defaults to
    ``min(5000, total_steps // 10)``. Returns the run with all its checkpoints.
    """
    if eval_every is None:
        eval_every = default_eval_every(total_steps)
    if total_steps < eval_every or total_steps % eval_every:
        raise ValueError(f"eval_every ({eval_every}) must divide total_steps ({total_steps}), so that the "
                         f"final policy is checkpointed; default_eval_every({total_steps}) = "
                         f"{default_eval_every(total_steps)}")
    algo = algo.lower()
    cls = _algo_class(algo)
    if learning_starts is None:
        learning_starts = min(5_000, total_steps // 10)
    root = pathlib.Path(cache_dir) if cache_dir is not None else diffpolicy_home() / "behaviour"
    directory = root / env_id / f"{algo}-seed{seed}-{total_steps}"
    directory.mkdir(parents=True, exist_ok=True)
    index = directory / "checkpoints.json"
    done_marker = directory / "done"
    checkpoints = [Checkpoint(**c) for c in json.loads(index.read_text())] if index.exists() else []
    if checkpoints and checkpoints[0].step != eval_every:
        raise ValueError(f"the cached behaviour run {directory} was checkpointed every {checkpoints[0].step} steps, "
                         f"not {eval_every}: pass eval_every={checkpoints[0].step} (behaviour_eval_every for "
                         "make_dataset, --behaviour-eval-every on the command line) or delete the directory")

    def run() -> BehaviourRun:
        return BehaviourRun(env_id, algo, seed, total_steps, directory, checkpoints)

    if done_marker.exists():
        return run()

    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback

    env = gym.make(env_id)
    model = None
    if checkpoints:
        last = checkpoints[-1]
        if (directory / "replay_buffer.pkl").exists():
            log(f"resuming {env_id} {algo} from step {last.step}")
            model = cls.load(last.path, env=env, device="cpu")
            model.load_replay_buffer(str(directory / "replay_buffer.pkl"))
        else:
            checkpoints = []
    if model is None:
        model = cls(
            "MlpPolicy", env, seed=seed, verbose=0, device="cpu",
            buffer_size=total_steps, learning_starts=learning_starts,
        )

    class _Checkpointer(BaseCallback):
        pending = None  # (step, mean, std) evaluated, not saved yet

        def _on_step(self) -> bool:
            step = self.num_timesteps
            if step % eval_every == 0 and (not checkpoints or step > checkpoints[-1].step):
                self.pending = (step, *evaluate_sb3(self.model, env_id, eval_episodes, seed=10_000 + seed))
            return True

        def _on_rollout_end(self) -> None:
            # SB3 calls on_step before it stores the step's transition; here the buffer holds it, so a
            # run resumed from this checkpoint has all ``step`` transitions.
            if self.pending is None:
                return
            (step, mean, std), self.pending = self.pending, None
            path = directory / f"policy_{step}.zip"
            self.model.save(str(path))
            buffer = directory / "replay_buffer.pkl"
            self.model.save_replay_buffer(str(directory / "replay_buffer.tmp.pkl"))
            os.replace(directory / "replay_buffer.tmp.pkl", buffer)  # a kill mid-write keeps the previous one
            checkpoints.append(Checkpoint(step, mean, std, str(path)))
            _atomic_write_text(index, json.dumps([dataclasses.asdict(c) for c in checkpoints], indent=1))
            log(f"{env_id} {algo} step {step}: return {mean:.1f} ± {std:.1f}")

    remaining = total_steps - (checkpoints[-1].step if checkpoints else 0)
    model.learn(
        remaining, callback=_Checkpointer(), reset_num_timesteps=not checkpoints, progress_bar=progress,
    )
    _export_replay(model, directory / "replay.npz")
    (directory / "replay_buffer.pkl").unlink(missing_ok=True)
    done_marker.write_text("ok\n")
    env.close()
    return run()

"""Gymnasium environments as (vectorised) TorchRL environments, and policy evaluation.

Policies in diffpolicy act in a normalised action box ``[-1, 1]^d`` and read observations
normalised by the dataset's statistics. :func:`make_env` builds exactly that view of a
gymnasium env: gymnasium's own ``RescaleAction`` / ``ClipAction`` wrappers map ``[-1, 1]``
to the env's bounds (clipping first), and TorchRL's ``ObservationNorm`` standardises the
observation. ``num_envs > 1`` gives a TorchRL ``SerialEnv`` (or ``ParallelEnv``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

__all__ = ["make_env", "make_gym_env", "evaluate", "EvalResult", "ActionChunk", "ENV_IDS"]

ENV_IDS = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Pendulum-v1")


class ActionChunk(gym.Wrapper):
    """Executes a chunk of ``n`` actions per step (DPPO's ``multi_step`` wrapper, ``act_steps``).

    The action space is the base box tiled ``n`` times and flattened, ``[n * act_dim]``;
    ``step`` runs the actions in order, sums their rewards and stops early when the episode
    terminates or is truncated. ``info["chunk_steps"]`` is the number of env steps taken.
    """

    def __init__(self, env, n: int):
        super().__init__(env)
        if n < 1:
            raise ValueError(f"action_chunk must be >= 1, got {n}")
        box = env.action_space
        self.n, self.act_dim = n, box.shape[0]
        self.action_space = gym.spaces.Box(np.tile(box.low, n), np.tile(box.high, n), dtype=box.dtype)

    def step(self, action):
        actions = np.asarray(action).reshape(self.n, self.act_dim)
        total, info = 0.0, {}
        for k in range(self.n):
            obs, reward, terminated, truncated, info = self.env.step(actions[k])
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "chunk_steps": np.int64(k + 1)}


def make_gym_env(env_id: str, normalized_actions: bool = True, action_chunk: int = 1):
    """A gymnasium env whose actions live in ``[-1, 1]`` (clipped, then rescaled to the env's box);
    with ``action_chunk > 1`` each step takes a flattened chunk of that many actions."""
    from gymnasium.wrappers import ClipAction, RescaleAction

    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise ValueError(f"unknown gymnasium environment {env_id!r} ({e}); try one of {', '.join(ENV_IDS)}") from e
    if normalized_actions and isinstance(env.action_space, gym.spaces.Box):
        ones = np.ones(env.action_space.shape, dtype=np.float32)
        env = ClipAction(RescaleAction(env, -ones, ones))
    if action_chunk != 1:
        env = ActionChunk(env, action_chunk)
    return env


def make_env(env_id: str, *, num_envs: int = 1, obs_loc: Tensor | np.ndarray | None = None,
             obs_scale: Tensor | np.ndarray | None = None, parallel: bool = False, device="cpu",
             action_chunk: int = 1):
    """A TorchRL env for ``env_id``: actions in ``[-1, 1]``, float32 observations standardised
    as ``(obs - obs_loc) / obs_scale`` when statistics are given, ``num_envs`` copies batched.
    With ``action_chunk > 1`` each step runs a chunk (:class:`ActionChunk`) and reports the env
    steps it took as ``("next", "chunk_steps")``.
    """
    from torchrl.envs import Compose, DoubleToFloat, GymWrapper, ObservationNorm, ParallelEnv, SerialEnv, TransformedEnv
    from torchrl.envs.libs.gym import default_info_dict_reader

    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")

    def single():
        env = GymWrapper(make_gym_env(env_id, action_chunk=action_chunk), device=device)
        if action_chunk != 1:  # ("next", "chunk_steps"): env steps a chunk took (fewer when the episode ended)
            env.set_info_dict_reader(default_info_dict_reader(["chunk_steps"]))
        return env

    if num_envs == 1:
        base = single()
    else:
        base = (ParallelEnv if parallel else SerialEnv)(num_envs, single)
    transforms = [DoubleToFloat()]
    if (obs_loc is None) != (obs_scale is None):
        raise ValueError("give both obs_loc and obs_scale (or neither)")
    if obs_loc is not None:
        loc = torch.as_tensor(np.asarray(obs_loc), dtype=torch.float32)
        scale = torch.as_tensor(np.asarray(obs_scale), dtype=torch.float32)
        shape = base.observation_spec["observation"].shape[-1:]
        if loc.shape != shape or scale.shape != shape:
            raise ValueError(f"observation statistics have shape {tuple(loc.shape)} / {tuple(scale.shape)} "
                             f"but {env_id} observations have shape {tuple(shape)}")
        transforms.append(ObservationNorm(loc=loc, scale=scale, in_keys=["observation"], standard_normal=True))
    return TransformedEnv(base, Compose(*transforms))


@dataclasses.dataclass
class EvalResult:
    """Undiscounted returns of ``episodes`` evaluation episodes, and their normalised scores
    (``lengths`` count policy decisions: env steps divided by the action chunk)."""

    returns: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray | None = None

    @property
    def return_mean(self) -> float:
        return float(self.returns.mean())

    @property
    def return_std(self) -> float:
        return float(self.returns.std())

    @property
    def score_mean(self) -> float:
        return float("nan") if self.scores is None else float(self.scores.mean())

    @property
    def score_std(self) -> float:
        return float("nan") if self.scores is None else float(self.scores.std())


@torch.no_grad()
def evaluate(policy: Callable[[Tensor], Tensor], env_id: str, *, episodes: int = 10, seed: int = 0,
             obs_loc=None, obs_scale=None, max_steps: int | None = None,
             score_fn: Callable[[np.ndarray], np.ndarray] | None = None, reset: Callable[[], None] | None = None,
             device="cpu", action_chunk: int = 1) -> EvalResult:
    """Run ``episodes`` episodes in parallel (one vectorised TorchRL env) with fixed seeds.

    ``policy(obs [N, obs_dim]) -> action [N, act_dim]`` in ``[-1, 1]`` sees normalised
    observations. Each env runs exactly one episode; the envs are seeded from ``seed`` by TorchRL's
    ``set_seed`` so the same ``seed`` gives the same episodes.
    Finished envs keep stepping harmlessly until all are done; their later rewards are ignored.
    ``reset`` is called once before the episodes (e.g. to clear an action-chunk queue).
    With ``action_chunk > 1`` the policy returns flattened chunks that the env executes whole.
    """
    from torchrl.envs.utils import step_mdp

    env = make_env(env_id, num_envs=episodes, obs_loc=obs_loc, obs_scale=obs_scale, device=device,
                   action_chunk=action_chunk)
    if max_steps is None:
        spec = gym.spec(env_id)
        max_steps = -(-(spec.max_episode_steps or 1000) // action_chunk)
    env.set_seed(seed)
    td = env.reset()
    if reset is not None:
        reset()
    returns = torch.zeros(episodes, dtype=torch.float64)
    lengths = torch.zeros(episodes, dtype=torch.int64)
    alive = torch.ones(episodes, dtype=torch.bool)
    for _ in range(max_steps):
        obs = td["observation"].reshape(episodes, -1)  # a single env has batch size []: give policies [1, obs_dim]
        td["action"] = policy(obs).to(torch.float32).reshape(env.action_spec.shape)
        td = env.step(td)
        nxt = td["next"]
        returns += torch.where(alive, nxt["reward"].reshape(-1).double(), 0.0)
        lengths += alive.long()
        alive &= ~nxt["done"].reshape(-1)
        if not bool(alive.any()):
            break
        td = step_mdp(td)
    env.close()
    r = returns.numpy()
    return EvalResult(r, lengths.numpy(), None if score_fn is None else score_fn(r))


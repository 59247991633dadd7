"""A one-step gymnasium task for the online agents' learning tests."""
import types

import gymnasium as gym
import numpy as np

from diffpolicy.envs.factory import evaluate


class TargetEnv(gym.Env):
    """One-step task: observe a target in [-0.8, 0.8], reward ``1 - |a - target|``."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = self.np_random.uniform(-0.8, 0.8, size=1).astype(np.float32)
        return self.target.copy(), {}

    def step(self, action):
        r = 1.0 - float(np.abs(np.asarray(action, dtype=np.float64) - self.target).sum())
        return self.target.copy(), r, True, False, {}


TARGET_ID = "DiffpolicyTestTarget-v0"
if TARGET_ID not in gym.registry:
    gym.register(id=TARGET_ID, entry_point=TargetEnv, max_episode_steps=1)
NO_DATA = types.SimpleNamespace(obs_mean=np.zeros(1, np.float32), obs_std=np.ones(1, np.float32),
                                ref_min_score=None, dataset_id=None)


class WalkEnv(gym.Env):
    """Three steps then a time-limit truncation; an action above 0.5 terminates early. Reward ``-|a - 0.2| + t``."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def reward(self, a: float) -> float:
        return -abs(a - 0.2) + self.t

    def step(self, action):
        a = float(np.asarray(action).reshape(-1)[0])
        self.t += 1
        return np.array([self.t], np.float32), self.reward(a), a > 0.5, False, {}


WALK_ID = "DiffpolicyTestWalk-v0"
if WALK_ID not in gym.registry:
    gym.register(id=WALK_ID, entry_point=WalkEnv, max_episode_steps=3)


class EdgeEnv(WalkEnv):
    """WalkEnv with reward ``1 + a``: greedy (``a = 1``) ends the episode at once and scores 2; staying in
    (``a`` just under 0.5) scores about 4.5, so the better policy needs credit carried over steps."""

    def reward(self, a: float) -> float:
        return 1.0 + a


EDGE_ID = "DiffpolicyTestEdge-v0"
if EDGE_ID not in gym.registry:
    gym.register(id=EDGE_ID, entry_point=EdgeEnv, max_episode_steps=3)


def mean_error(agent, episodes: int = 64) -> float:
    """``E|a - target|`` of the agent's deterministic action on fixed evaluation episodes."""
    res = evaluate(agent.act, TARGET_ID, episodes=episodes, seed=123, obs_loc=NO_DATA.obs_mean,
                   obs_scale=NO_DATA.obs_std)
    return 1.0 - res.return_mean

"""Advantages and weights for reward-driven diffusion: DPPO's two-layer MDP, DDPO, DRWR/DAWR.

Environment-level advantages come from TorchRL's estimators on a state-only critic
(:func:`env_gae`); :func:`spread_over_chain` carries them onto the ``K`` denoising steps of
each environment step with a denoising discount (Ren et al. 2024, DPPO §4.2 and App. C).
"""
from __future__ import annotations

import math
from collections import defaultdict, deque

import torch
from tensordict import TensorDictBase
from torch import Tensor

__all__ = ["env_gae", "spread_over_chain", "chain_advantage", "PerContextStandardizer", "RunningReturnScaler",
           "reward_weights"]


def env_gae(td: TensorDictBase, critic, *, gamma: float = 0.99, lmbda: float = 0.95) -> TensorDictBase:
    """GAE (Schulman et al. 2016 eq. 16) at environment level with TorchRL's estimator.

    ``td`` is an environment rollout ``[..., T]`` (time last) with ``observation``,
    ``("next", "observation" | "reward" | "done" | "terminated")``; ``critic`` a TorchRL
    ``TensorDictModule`` reading the *state only* (DPPO: the critic never sees the denoising
    chain). Writes ``advantage`` and ``value_target`` in place and returns ``td``.
    """
    from torchrl.objectives.value import GAE

    with torch.no_grad():
        return GAE(gamma=gamma, lmbda=lmbda, value_network=critic, average_gae=False)(td)


def spread_over_chain(advantage: Tensor, num_steps: int, denoising_discount: float = 1.0) -> Tensor:
    """Advantage of each of ``K`` denoising steps: ``A * gamma_d^(K - 1 - k)`` for step ``k``.

    ``advantage [...]`` (one per environment step, a trailing singleton dimension is dropped)
    -> ``[..., K]``. The last denoising step (the one that emits the action) keeps ``A``;
    earlier steps are discounted (DPPO App. C, ``gamma_denoising``).
    """
    if advantage.dim() > 1 and advantage.shape[-1] == 1:
        advantage = advantage.squeeze(-1)
    k = torch.arange(num_steps, device=advantage.device, dtype=advantage.dtype)
    return advantage.unsqueeze(-1) * denoising_discount ** (num_steps - 1 - k)


def chain_advantage(td: TensorDictBase, critic, *, gamma: float = 0.99, lmbda: float = 0.95,
                    denoising_discount: float = 0.99, chain_key: str = "chain") -> TensorDictBase:
    """DPPO's two-layer MDP: GAE over environment steps, spread over each step's denoising chain.

    ``td [..., T]`` is an environment rollout whose ``td[chain_key]`` is the nested chain
    ``[..., T, K]`` that produced each action. Writes ``advantage [..., T, 1]`` and
    ``value_target`` (environment level) and ``(chain_key, "advantage") [..., T, K]``.
    """
    env_gae(td, critic, gamma=gamma, lmbda=lmbda)
    K = td.get(chain_key).batch_size[-1]
    td.set((chain_key, "advantage"), spread_over_chain(td.get("advantage"), K, denoising_discount))
    return td


class PerContextStandardizer:
    """Per-context reward standardisation (DDPO, Black et al. 2024 App. A "per-prompt stat tracking").

    Each context (a prompt, a class, an observation id) keeps its last ``buffer_size`` rewards;
    a reward is standardised by its context's buffer once that holds ``min_count`` rewards,
    and by the whole batch before that. ``std`` gets ``eps`` added.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if min_count > buffer_size:
            raise ValueError(f"min_count ({min_count}) cannot exceed buffer_size ({buffer_size})")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def state_dict(self) -> dict:
        """The buffers (context ids and their recent rewards), for checkpoints."""
        return {"keys": list(self.buffers), "values": [list(b) for b in self.buffers.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for key, values in zip(state["keys"], state["values"]):
            self.buffers[key].extend(float(v) for v in values)

    def __call__(self, contexts, rewards: Tensor) -> Tensor:
        """``contexts``: a sequence or ``[B]`` tensor of hashable ids; ``rewards [B]`` -> advantages ``[B]``."""
        keys = contexts.tolist() if isinstance(contexts, Tensor) else list(contexts)
        if len(keys) != rewards.shape[0]:
            raise ValueError(f"{len(keys)} contexts for {rewards.shape[0]} rewards")
        r = rewards.detach().double().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False) + self.eps
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            buf = self.buffers[key]
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                b = torch.tensor(buf, dtype=torch.float64)
                mean, std = b.mean(), b.std(unbiased=False) + self.eps
            out[idx] = (r[idx] - mean) / std
        return out.to(rewards)


class RunningReturnScaler:
    """Rewards divided by the running std of the discounted return (Engstrom et al. 2020 §3, "reward scaling").

    Each parallel env keeps ``G <- gamma G (1 - done_prev) + r``; every ``G`` seen so far enters a
    running variance (Chan et al.'s parallel update), and ``r / sqrt(var + eps)`` is returned,
    as SB3's ``VecNormalize`` (reward part) and DPPO's ``RunningRewardScaler`` do. The mean of
    ``G`` is not subtracted from the rewards. State is a ``state_dict`` for checkpoints.
    """

    def __init__(self, num_envs: int, gamma: float = 0.99, eps: float = 1e-8):
        self.gamma, self.eps = gamma, eps
        self.ret = torch.zeros(num_envs, dtype=torch.float64)
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def __call__(self, reward: Tensor, done: Tensor) -> Tensor:
        """``reward, done [num_envs, T]`` (or with a trailing 1), time along dim 1 -> scaled rewards."""
        r = reward.reshape(reward.shape[0], -1).double().cpu()
        d = done.reshape(done.shape[0], -1).cpu()
        if r.shape[0] != self.ret.shape[0] or d.shape != r.shape:
            raise ValueError(f"reward {tuple(reward.shape)} and done {tuple(done.shape)} must be [num_envs="
                             f"{self.ret.shape[0]}, T]")
        returns = torch.empty_like(r)
        for k in range(r.shape[1]):
            self.ret = self.ret * self.gamma + r[:, k]
            returns[:, k] = self.ret
            self.ret = torch.where(d[:, k], 0.0, self.ret)
        n, m, v = returns.numel(), float(returns.mean()), float(returns.var(unbiased=False))
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        return self.scale(reward)

    def scale(self, reward: Tensor) -> Tensor:
        """``reward / sqrt(var + eps)`` with the statistics as they stand (nothing is updated): rewards
        stored earlier, rescaled consistently with the latest statistics (DAWR's replay)."""
        return (reward / math.sqrt(self.var + self.eps)).to(reward.dtype)

    def state_dict(self) -> dict:
        return {"ret": self.ret.clone(), "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        """Restore the return statistics; the running returns restart at 0 (a resumed run starts new episodes)."""
        self.ret = torch.zeros_like(state["ret"])
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


def reward_weights(values: Tensor, beta: float, max_weight: float | None = None) -> Tensor:
    """``exp(beta * values)``, clipped at ``max_weight`` (Peters & Schaal 2007; DPPO's DRWR/DAWR).

    ``values`` are returns (DRWR) or advantages (DAWR).
    """
    w = torch.exp(beta * values)
    return w if max_weight is None else w.clamp(max=max_weight)

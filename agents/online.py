"""Online fine-tuning of diffusion policies: the shared agent base and the training loop.

:class:`OnlineChainAgent` holds what DPPO, DRWR, DAWR and QSM share: the fine-tuned copy of a
pre-trained action denoiser (and a frozen copy for the steps that are not fine-tuned), the
exploring chain that collects (:func:`~diffpolicy.chain.rollout`: DDPM/DDIM steps with a
sampling-std floor, noise and x0 clipping), deterministic evaluation (the noise-free chain of
means from a random start; DPPO's code, with ``deterministic=True``, keeps the DDPM posterior
noise except at the last step, see :mod:`~diffpolicy.agents.dppo`), a state-value critic and checkpoints.

:func:`train_online` runs any agent with ``policy_module()`` (a TorchRL policy that writes ``action`` and whatever its
update needs), ``update(td [num_envs, T]) -> metrics``, ``act(obs)`` (deterministic evaluation),
``training_state()`` / ``load_training_state()`` and ``obs_dim`` / ``act_dim`` trains here
(:class:`~diffpolicy.agents.dppo.DPPO`). Observations are normalised with the statistics of the
dataset the policy was pre-trained on, scores use its reference returns.

With ``run_dir``: ``config.json``, ``train.csv`` (per iteration: the agent's metrics such as
clip fraction, approx-KL and explained variance, the mean return of the training episodes that
ended in the iteration (``episode_return``, ``episode_score``, ``episodes``: exploration noise
included), environment steps and seconds; with action chunks ``step`` counts every chunk whole,
the budget's count, and ``env_steps_taken`` the steps actually run, fewer where an episode
ended inside a chunk),
``eval.csv``, TensorBoard events under ``tb/`` and ``checkpoint.safetensors`` (every
``checkpoint_every`` iterations and at the end). A run directory with a checkpoint resumes:
the agent, its optimisers, the reward scaler, counters and RNGs are restored; the
environments start fresh episodes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffpolicy.chain import rollout
from diffpolicy.chain_losses import RewardWeightedLoss
from diffpolicy.checkpoint import CHECKPOINT, CheckpointError, save_checkpoint
from diffpolicy.denoiser import DenoiserBase
from diffpolicy.nets.activations import Mish
from diffpolicy.runlog import (RunLogger, open_run, release_run, rng_state, set_rng_state, set_seed,
                              with_config_defaults)
from diffpolicy.samplers import prior

from .base import EvalSubmodules, mlp
from .trainer import NonFiniteLossError

__all__ = ["OnlineChainConfig", "OnlineChainAgent", "OnlineCheckpoint", "OnlineConfig", "train_online", "check_policy_shapes",
           "explained_variance", "with_scaled_rewards", "epoch_batches", "replay_batches"]


@dataclasses.dataclass
class OnlineChainConfig:
    """Collection and chain settings shared by the online agents (DPPO's Gym values, App. D,
    with CPU-sized collection: their 40 envs x 500 steps)."""

    num_envs: int = 10                  # parallel environments (TorchRL SerialEnv)
    steps_per_iter: int = 250           # policy decisions per env per iteration (action_chunk env steps each)
    chain_steps: int | None = None      # K: the chain's steps (None: the pre-trained model's); fewer runs a
                                        # sub-grid of its timesteps (DPPO's ddim_steps), spaced by chain_spacing:
    chain_spacing: str = "trailing"     # "trailing" (Lin et al. 2024: the grid starts at the last timestep) or
                                        # "leading" (DPPO's code: k * (N // K), so it starts below the last)
    ft_steps: int | None = None         # K': fine-tuned last denoising steps (None: all K)
    eta: float = 1.0                    # 1: DDPM steps; < 1: DDIM(eta) steps
    min_sampling_std: float = 0.1       # exploration-noise floor of every step
    min_logprob_std: float = 0.1        # std floor in the log-probs (bounds PPO ratios)
    noise_clip: float | None = 3.0      # step noise clipped to +- noise_clip std
    clip_x0: float | None = 1.0         # x0 prediction clipped to [-1, 1]
    gamma: float = 0.99                 # environment discount
    gae_lambda: float = 0.95
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    max_grad_norm: float | None = 1.0   # actor and critic (DPPO's Gym configs clip neither; Adam makes it mild)
    critic_hidden: int = 256
    critic_depth: int = 3


def chain_grid(schedule, K: int, spacing: str) -> Tensor:
    """The ``K + 1`` times of a ``K``-step chain on a sub-grid of a discrete schedule's training timesteps."""
    if not hasattr(schedule, "num_train_timesteps"):
        if spacing != "trailing":
            raise ValueError(f"chain_spacing={spacing!r} needs a discrete schedule; {type(schedule).__name__} is "
                             "continuous (its K-step grid is uniform in t)")
        return schedule.timesteps(K)
    return schedule.timesteps(K, spacing=spacing)


def with_scaled_rewards(td, scaler, enabled: bool = True):
    """``(copy, raw_reward)``: a shallow copy of a collector batch whose rewards are divided by the
    running std of the discounted return (``scaler``, when ``enabled``), and the rewards as collected."""
    td = td.clone(False)
    reward = td["next", "reward"]
    if enabled:
        td["next", "reward"] = scaler(reward, td["next", "done"])
    return td, reward


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """``1 - Var[target - pred] / Var[target]`` (nan when the target is constant): how much of the value
    targets' variance the critic explains (DPPO, Gaussian PPO: its values on the collected batch before
    the update; DAWR: the trained critic's on its whole replay)."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    var = target.var()
    return float("nan") if float(var) == 0 else float(1 - (target - pred).var() / var)


class OnlineCheckpoint:
    """``training_state`` / ``load_training_state`` of an online agent with ``actor_opt``, ``critic_opt``
    and ``iterations``; subclasses add their own state (e.g. a reward scaler) with ``_extra_state``."""

    def _extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if hasattr(self, "scaler") else {}

    def _load_extra_state(self, state: dict) -> None:
        if hasattr(self, "scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def training_state(self) -> dict:
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "iterations": self.iterations, **self._extra_state()}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.iterations = state["iterations"]
        self._load_extra_state(state)


class OnlineChainAgent(OnlineCheckpoint, EvalSubmodules, nn.Module):
    """A pre-trained diffusion policy being fine-tuned online; subclasses define ``update``.

    ``actor`` is a state-conditioned action denoiser (``cond = observation``, actions in
    ``[-1, 1]``), e.g. a :class:`~diffpolicy.agents.diffusion_bc.DiffusionBC`'s EMA model
    (:meth:`from_diffusion_bc`); ``diffusion_steps`` is the number of steps it was trained for, and
    the ``K`` of the chain unless ``chain_steps`` asks for fewer (DPPO's DDIM fine-tuning: e.g. 5 of
    100, with ``eta < 1``; ``schedule.timesteps(K)``, a sub-grid of the training timesteps). The last
    ``ft_steps`` steps run the fine-tuned ``self.actor``, the earlier ones the frozen ``self.base``.
    With ``action_chunk = H`` the policy's action is a flattened chunk of ``H`` env actions, executed
    whole by the env (DPPO's ``act_steps``); rewards and discounting are per chunk, as in DPPO.
    """

    name = "online"
    config_class = OnlineChainConfig
    # the mode reaches the critic; the denoisers stay in eval (a BC trained with dropout, e.g. IDQL's, acts
    # and is scored without it), so collection, re-scored log-probs and evaluation run one network
    eval_submodules = ("actor", "base")

    def __init__(self, actor: DenoiserBase, obs_dim: int, act_dim: int, diffusion_steps: int, config=None, *,
                 action_chunk: int = 1, **overrides):
        super().__init__()
        if act_dim % action_chunk:
            raise ValueError(f"act_dim={act_dim} is not a whole number of chunks of {action_chunk} actions")
        self.action_chunk = action_chunk  # the env executes act_dim / action_chunk-d actions this many at a time
        c = dataclasses.replace(config or self.config_class(), **overrides)
        if c.chain_spacing not in ("trailing", "leading"):
            raise ValueError(f"chain_spacing must be 'trailing' or 'leading', got {c.chain_spacing!r}")
        K = diffusion_steps if c.chain_steps is None else c.chain_steps
        if not 1 <= K <= diffusion_steps:
            raise ValueError(f"chain_steps must be in [1, {diffusion_steps}] (the pre-trained model's steps), "
                             f"got {c.chain_steps}")
        ft = K if c.ft_steps is None else c.ft_steps
        if not 1 <= ft <= K:
            raise ValueError(f"ft_steps must be in [1, {K}] (the chain has {K} steps), got {c.ft_steps}")
        self.config, self.obs_dim, self.act_dim, self.K, self.ft = c, obs_dim, act_dim, K, ft
        self.actor = copy.deepcopy(actor).requires_grad_(True).eval()  # eval for good: eval_submodules
        self.base = copy.deepcopy(actor).requires_grad_(False).eval()
        grid = (actor.schedule.timesteps(K) if c.chain_steps is None
                else chain_grid(actor.schedule, K, c.chain_spacing))
        self.register_buffer("ts", torch.as_tensor(grid, dtype=torch.float64))
        self.critic = self.build_critic()
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.iterations = 0

    def build_critic(self) -> nn.Module:
        """A state-value critic ``V(s)`` (TorchRL ``ValueOperator``, Mish MLP); QSM overrides it with a ``Q(s, a)``."""
        from torchrl.modules import ValueOperator

        c = self.config
        return ValueOperator(mlp(self.obs_dim, 1, c.critic_hidden, c.critic_depth, Mish), in_keys=["observation"])

    @classmethod
    def from_diffusion_bc(cls, bc, config=None, **overrides):
        """Start from a trained :class:`~diffpolicy.agents.diffusion_bc.DiffusionBC` (its EMA weights);
        a chunking BC (``horizon = H``) gives an agent whose action is the flattened chunk of ``H``."""
        from . import describe_agent

        H = bc.config.horizon
        agent = cls(bc.ema.module, bc.obs_dim, bc.act_dim * H, bc.config.diffusion_steps, config, action_chunk=H,
                    **overrides)
        agent.base_policy = describe_agent(bc)  # train_online records it, so load_agent can rebuild the run
        return agent

    # ------------------------------------------------------------------ acting
    def _chain(self, obs: Tensor, *, deterministic: bool, generator=None) -> TensorDict:
        c = self.config
        x = prior(self.actor, (obs.shape[0], self.act_dim), generator=generator, device=obs.device)
        return rollout(self.actor, x, self.ts, cond=obs, eta=c.eta, min_std=0.0 if deterministic else c.min_sampling_std,
                       min_logprob_std=c.min_logprob_std,
                       noise_clip=0.0 if deterministic else c.noise_clip,  # zero noise: the chain of means
                       clip_x0=c.clip_x0, reduction=None if deterministic else "mean", train_steps=self.ft,
                       frozen=self.base, generator=generator)

    @torch.no_grad()
    def explore(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(action [B, A], chain_x [B, K'+1, A], chain_log_prob [B, K'])`` for collection."""
        td = self._chain(obs, deterministic=False)
        ft = self.ft
        chain_x = torch.cat([td["x"][:, -ft:], td["next", "x"][:, -1:]], 1)
        return chain_x[:, -1].clamp(-1.0, 1.0), chain_x, td["log_prob"][:, -ft:]

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Deterministic evaluation action (the noise-free chain), in ``[-1, 1]``."""
        return self._chain(obs, deterministic=True)["next", "x"][:, -1].clamp(-1.0, 1.0)

    def reset(self) -> None:  # no per-episode state: action chunks run whole inside the env
        pass

    def policy_module(self) -> TensorDictModule:
        """The collection policy for a TorchRL collector: ``observation -> action, chain_x, chain_log_prob``."""
        return TensorDictModule(_Explore(self), in_keys=["observation"],
                                out_keys=["action", "chain_x", "chain_log_prob"])

    # ------------------------------------------------------------------ learning helpers
    def update(self, td) -> dict[str, float]:
        raise NotImplementedError

    def _step(self, opt: torch.optim.Optimizer, loss: Tensor, params) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        opt.step()

    def critic_step(self, obs: Tensor, value_target: Tensor) -> Tensor:
        """One regression step of ``V(s)`` to ``value_target``: ``0.5 (V - target)^2``."""
        v = self.critic(TensorDict({"observation": obs}, batch_size=obs.shape[:1]))["state_value"]
        loss = 0.5 * (v - value_target.reshape(v.shape)).pow(2).mean()
        self._step(self.critic_opt, loss, self.critic.parameters())
        return loss.detach()

    def fit_weighted(self, obs: Tensor, actions: Tensor, weights: Tensor, batches) -> float:
        """Weighted diffusion regression of the actor on ``(obs, actions)`` (DRWR / DAWR's update), one
        optimiser step per index tensor of ``batches`` (:func:`epoch_batches` or :func:`replay_batches`).
        Returns the mean loss."""
        loss_fn = RewardWeightedLoss(self.actor)
        losses = []
        for idx in batches:
            td = TensorDict({"observation": obs[idx], "action": actions[idx], "weight": weights[idx]},
                            batch_size=[len(idx)])
            loss = loss_fn(td)["loss_diffusion"]
            self._step(self.actor_opt, loss, self.actor.parameters())
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)


def epoch_batches(n: int, batch_size: int, epochs: int):
    """``epochs`` shuffled passes over ``n`` rows in minibatches of ``batch_size``, the last partial one
    dropped (as DPPO's code does); one minibatch of all rows when ``n < batch_size``."""
    for _ in range(epochs):
        perm = torch.randperm(n)
        for b in range(max(1, n // batch_size)):
            yield perm[b * batch_size:(b + 1) * batch_size]


def replay_batches(n: int, batch_size: int, count: int):
    """``count`` minibatches of ``batch_size`` rows drawn uniformly with replacement from ``n`` (the
    replay-ratio updates of DPPO's AWR and QSM code, ``np.random.choice(n, batch_size)``)."""
    for _ in range(count):
        yield torch.randint(n, (batch_size,))


class _Explore(nn.Module):
    def __init__(self, agent: OnlineChainAgent):
        super().__init__()
        self.agent = [agent]  # not a submodule: the collector must not copy or move the agent

    def forward(self, obs: Tensor):
        batch, agent = obs.shape[:-1], self.agent[0]
        out = agent.explore(obs.reshape(-1, obs.shape[-1]).to(agent.ts.device, torch.float32))
        action, chain_x, lp = (v.to(obs.device) for v in out)  # the env may live on another device
        return (action.reshape(*batch, -1), chain_x.reshape(*batch, *chain_x.shape[1:]), lp.reshape(*batch, -1))


@dataclasses.dataclass
class OnlineConfig:
    env_steps: int = 500_000       # total environment steps (over all envs)
    eval_every: int = 10           # iterations between evaluations (and at the end)
    eval_episodes: int = 10
    eval_seed: int = 10_000        # evaluation episodes are seeded apart from training ones
    checkpoint_every: int = 5      # iterations between checkpoints
    seed: int = 0
    parallel_envs: bool = False    # how, not what (not part of the run's identity): collect with TorchRL's
                                   # ParallelEnv (one process per env) instead of SerialEnv


def check_policy_shapes(agent, env_id: str, action_chunk: int = 1) -> None:
    """A clear error, before any environment or training starts, when the policy's shapes are not ``env_id``'s."""
    from diffpolicy.envs.factory import make_gym_env

    env = make_gym_env(env_id, action_chunk=action_chunk)
    obs_shape, act_shape = tuple(env.observation_space.shape[-1:]), tuple(env.action_space.shape[-1:])
    env.close()
    if obs_shape != (agent.obs_dim,) or act_shape != (agent.act_dim,):
        raise ValueError(f"the policy is for observations of shape ({agent.obs_dim},) and actions of shape "
                         f"({agent.act_dim},), but {env_id} has observations {obs_shape} and actions {act_shape}: "
                         f"use a checkpoint trained on {env_id} data")


def train_online(agent, env_id: str, data, cfg: OnlineConfig | None = None, *, run_dir=None,
                 progress: bool = True, pretrained: dict | None = None) -> dict:
    """Train ``agent`` on ``env_id`` for ``cfg.env_steps`` environment steps; returns the eval history.

    ``data``: the dataset the policy was pre-trained on (its observation statistics normalise the
    env's observations, its reference returns give scores), or None for a policy that knows no
    dataset (from scratch): raw observations, returns only.

    ``pretrained``: where the agent started from (``{"run": dir, **describe_agent(bc)}``, as
    ``diffpolicy finetune`` passes; default: the BC's architecture, which ``from_diffusion_bc`` /
    ``from_gaussian_bc`` keep as ``agent.base_policy``), recorded in ``config.json`` (not compared
    on resume, so a moved run still resumes) for :func:`~diffpolicy.agents.load_agent`. An agent that
    :func:`~diffpolicy.agents.make_online_agent` built from scratch records its untrained policy
    itself (``"run": None``), and that record is part of the run's configuration.
    """
    from torchrl.collectors import Collector
    from torchrl.envs import RewardSum

    from diffpolicy.envs.factory import evaluate, make_env

    cfg = cfg or OnlineConfig()
    a = agent.config
    if pretrained is None:  # the agent describes where it started: an untrained policy (from scratch, "run": None)
        pretrained = getattr(agent, "scratch_policy", None) or getattr(agent, "base_policy", None)  # or a trained BC
    scratch = pretrained is not None and "run" in pretrained and pretrained["run"] is None
    chunk = getattr(agent, "action_chunk", 1)
    check_policy_shapes(agent, env_id, chunk)  # before the run directory is touched
    obs_loc, obs_scale = (None, None) if data is None else (data.obs_mean, data.obs_std)
    run_path = pathlib.Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT if run_path is not None else None
    frames = a.num_envs * a.steps_per_iter  # decisions per iteration (env steps / action_chunk)
    iterations = -(-cfg.env_steps // (frames * getattr(agent, "action_chunk", 1)))
    set_seed(cfg.seed)
    run_config = json.loads(json.dumps({"agent": agent.name, "agent_config": dataclasses.asdict(a),
                                        "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                  if k not in ("env_steps", "parallel_envs")},
                                        "dataset": getattr(data, "dataset_id", None), "env_id": env_id,
                                        # from scratch, the policy's settings are part of what the run is
                                        **({"scratch_policy": pretrained} if scratch else {}),
                                        **({"drop_nonfinite": True} if getattr(data, "dropped_nonfinite", 0) else {})},
                                       default=str))
    state = {"iteration": 0, "env_steps": 0, "env_steps_taken": 0, "history": [], "train_seconds": 0.0}
    def load(saved):
        try:
            agent.load_training_state(saved["agent"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"the checkpoint in {run_path} does not fit this {agent.name} agent: {e}. It was "
                                  "written with other settings (or code); use them or a new run directory") from None

    recorded = {"env_steps": cfg.env_steps, **({"pretrained": pretrained} if pretrained else {})}
    saved = open_run(run_path, run_config, json.loads(json.dumps(recorded, default=str)), load=load,
                     # settings added since the run started: at their defaults (or the agent's legacy values)
                     fill_old=lambda old: with_config_defaults(old, a, legacy=getattr(type(agent), "legacy_settings", None)))
    if saved is not None:
        state = saved["state"]
        state.setdefault("env_steps_taken", state["env_steps"])  # a run from before it was counted: the upper bound
        set_rng_state(saved["rng"])

    env = make_env(env_id, num_envs=a.num_envs, obs_loc=obs_loc, obs_scale=obs_scale, action_chunk=chunk,
                   parallel=cfg.parallel_envs and a.num_envs > 1)
    env.append_transform(RewardSum())  # ("next", "episode_reward"): the training episodes' returns
    env.set_seed(cfg.seed + 1000 * state["iteration"])
    collector = Collector(env, agent.policy_module(), frames_per_batch=frames, total_frames=-1,
                          auto_register_policy_transforms=False)
    logger = RunLogger(run_path, resume_step=state["env_steps"])
    score_fn = data.normalized_score if getattr(data, "ref_min_score", None) is not None else None

    def episodes(td) -> dict[str, float]:  # the training episodes that ended in this batch
        done = td["next", "done"]
        returns = td["next", "episode_reward"][done].double()
        rec = {"episodes": int(returns.numel()), "episode_return": float(returns.mean()) if returns.numel() else float("nan")}
        if score_fn is not None:
            rec["episode_score"] = float(score_fn(rec["episode_return"])) if returns.numel() else float("nan")
        return rec

    def run_eval():
        with torch.random.fork_rng():  # the same starting noises at every evaluation; training RNG untouched
            torch.manual_seed(cfg.eval_seed)
            res = evaluate(agent.act, env_id, episodes=cfg.eval_episodes, seed=cfg.eval_seed, obs_loc=obs_loc,
                           obs_scale=obs_scale, score_fn=score_fn, reset=agent.reset, action_chunk=chunk)
        rec = {"iteration": state["iteration"], "env_steps": state["env_steps"],
               "env_steps_taken": state["env_steps_taken"], "return_mean": res.return_mean,
               "return_std": res.return_std, "score_mean": res.score_mean, "score_std": res.score_std}
        state["history"].append(rec)
        logger.write("eval", state["env_steps"], {k: v for k, v in rec.items() if k != "env_steps"})
        return rec

    def checkpoint():
        if ckpt_path is not None:
            save_checkpoint({"agent": agent.training_state(), "state": state, "rng": rng_state()}, ckpt_path)

    bar = tqdm(total=iterations, initial=state["iteration"], desc=agent.name, unit="iter", disable=not progress)
    try:
        if state["iteration"] == 0 and not state["history"]:
            run_eval()  # the starting policy's score
        it = iter(collector)
        while state["iteration"] < iterations:
            t0 = time.perf_counter()
            td = next(it)
            if td.ndim == 1:  # one env is unbatched: give every agent [num_envs, T]
                td = td.unsqueeze(0)
            t_collect = time.perf_counter() - t0
            metrics = agent.update(td)
            # losses must be finite; diagnostics such as explained variance may be nan by definition
            bad = [k for k, v in metrics.items() if k.startswith("loss") and not torch.isfinite(torch.tensor(float(v)))]
            if bad:
                raise NonFiniteLossError(f"{agent.name}: {', '.join(bad)} non-finite at iteration "
                                         f"{state['iteration'] + 1}; the last checkpoint ({ckpt_path}) is kept")
            collector.update_policy_weights_()
            seconds = time.perf_counter() - t0
            state["iteration"] += 1
            state["env_steps"] += td.numel() * chunk  # the budget's count: a chunk cut short by an episode end counts whole
            taken = int(td["next", "chunk_steps"].sum()) if chunk > 1 else td.numel()
            state["env_steps_taken"] += taken
            state["train_seconds"] += seconds
            ep = episodes(td)
            logger.write("train", state["env_steps"], {**metrics, **ep, "iteration": state["iteration"],
                                                       "env_steps_taken": state["env_steps_taken"],
                                                       "seconds_per_iter": seconds, "collect_seconds": t_collect})
            bar.update(1)
            bar.set_postfix(episode_return=f"{ep['episode_return']:.4g}",
                            kl=f"{metrics.get('approx_kl', float('nan')):.2g}", refresh=False)
            last = state["iteration"] == iterations
            if state["iteration"] % cfg.eval_every == 0 or last:
                rec = run_eval()
                bar.set_postfix(score=f"{rec['score_mean']:.1f}", return_=f"{rec['return_mean']:.0f}")
            if state["iteration"] % cfg.checkpoint_every == 0 or last:
                checkpoint()
    finally:
        bar.close()
        logger.close()
        collector.shutdown()
        release_run(run_path)
    return {"history": state["history"], "env_steps": state["env_steps"], "iterations": state["iteration"],
            "train_seconds": state["train_seconds"]}

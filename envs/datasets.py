"""Minari datasets: making D4RL-style ones locally, loading by id, and feeding them to agents.

* :func:`make_dataset` ``(env_id, quality)`` writes a normal Minari dataset (``minari.load_dataset``
  opens it) for ``quality`` in ``random / medium / expert / medium-replay / medium-expert``,
  following D4RL (Fu et al. 2020, sec. 5): *expert* is a fully trained SAC policy, *medium* a
  policy stopped at about a third of the expert's return (measured from the random policy's),
  *medium-replay* the replay buffer of training up to that point, *medium-expert* half medium
  and half expert data, *random* uniformly random actions (D4RL used a randomly initialised
  SAC policy; uniform actions are the policy-free version of the same floor). Behaviour policies are stable-baselines3 agents trained here
  (:mod:`diffpolicy.envs.behaviour`). ``ref_min_score`` / ``ref_max_score`` are the random
  and expert policies' mean returns over ``ref_episodes`` episodes, stored in the metadata.
* :func:`load_dataset` opens a dataset from the local Minari directory, downloads it when
  it is remote and the network allows, and otherwise says what is local and how to make one.
* :class:`OfflineData` holds a dataset as tensors (normalised observations and actions),
  checks it for non-finite values, and serves transitions or fixed-length sequences
  (observation history + action chunk) through TorchRL replay buffers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor

from .behaviour import BehaviourRun, evaluate_sb3, train_behaviour_policy

__all__ = [
    "QUALITIES", "DatasetCorruptError", "DatasetNotFoundError", "NonFiniteDataError", "OfflineData", "dataset_id", "load_dataset",
    "make_dataset", "normalized_score", "check_spaces", "local_datasets",
]

QUALITIES = ("random", "medium", "expert", "medium-replay", "medium-expert")
NAMESPACE = "diffpolicy"


class DatasetNotFoundError(KeyError):
    """The dataset id is neither local nor downloadable."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


class NonFiniteDataError(ValueError):
    """The dataset holds NaN or inf values."""


# What h5py and Minari raise on a damaged file: OSError (truncated), RuntimeError (damaged heap),
# MemoryError (a damaged shape claiming petabytes), AssertionError / TypeError (Minari's own checks
# of the group structure), ValueError / KeyError (damaged names and attributes).
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, MemoryError, AssertionError, TypeError)


class DatasetCorruptError(ValueError):
    """A local dataset whose files cannot be read (truncated, half-copied, edited)."""


def _corrupt(dataset_id: str, error: Exception) -> DatasetCorruptError:
    first = str(error).splitlines()[0] if str(error) else ""
    return DatasetCorruptError(
        f"the local Minari dataset {dataset_id!r} ({_minari_root() / dataset_id}) cannot be read: "
        f"{type(error).__name__}: {first}. Nothing was changed. Remake it (for a dataset made here: "
        f"`diffpolicy dataset make ENV QUALITY --overwrite`) or delete that directory.")


def dataset_id(env_id: str, quality: str, version: int = 0) -> str:
    """Our Minari id for ``(env_id, quality)``: ``diffpolicy/<env>/<quality>-v<k>`` (e.g. ``diffpolicy/hopper/medium-v0``)."""
    if quality not in QUALITIES:
        raise ValueError(f"unknown dataset quality {quality!r}; valid: {', '.join(QUALITIES)}")
    env_name = env_id.split("-v")[0].lower()
    return f"{NAMESPACE}/{env_name}/{quality}-v{version}"


def normalized_score(returns, ref_min_score: float, ref_max_score: float):
    """D4RL's normalised score ``100 (R - R_random) / (R_expert - R_random)`` (Fu et al. 2020, sec. 6)."""
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min_score) / (ref_max_score - ref_min_score)


def local_datasets() -> list[str]:
    import minari

    return sorted(minari.list_local_datasets())


def _how_to_make() -> str:
    return ("make a local one with `diffpolicy dataset make Hopper-v5 medium` or "
            f"diffpolicy.envs.make_dataset('Hopper-v5', 'medium') (qualities: {', '.join(QUALITIES)})")


def load_dataset(dataset_id: str, *, download: bool = True):
    """Open a Minari dataset by id: local first, then (``download``) from Minari's remote, except
    for our own ``diffpolicy/...`` ids, which only exist where they were made.

    Raises :class:`DatasetNotFoundError` listing the local datasets and how to make one when
    the id is not local and cannot be downloaded (unknown remotely, or no network).
    """
    import minari

    local = local_datasets()
    if dataset_id in local:
        try:
            return minari.load_dataset(dataset_id)
        except _READ_ERRORS as e:
            raise _corrupt(dataset_id, e) from None
    if (_minari_root() / dataset_id).is_dir():  # present, but Minari cannot list it
        raise _corrupt(dataset_id, ValueError("its data/metadata.json is missing or not valid JSON"))
    reason = "download=False"
    if download and dataset_id.startswith(f"{NAMESPACE}/"):  # ours are made locally, never served remotely
        reason = f"{NAMESPACE}/ datasets are made locally, not downloaded"
    elif download:
        try:
            return minari.load_dataset(dataset_id, download=True)
        except Exception as e:  # network errors come in many types (requests, google-cloud, OSError)
            reason = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise DatasetNotFoundError(
        f"Minari dataset {dataset_id!r} is not in the local Minari directory ({_minari_root()}) and "
        f"could not be fetched ({reason}). Local datasets: {', '.join(local) if local else 'none'}. "
        f"To use your own data, {_how_to_make()}."
    )


def _minari_root():
    from minari.storage import get_dataset_path

    return get_dataset_path()


# ---------------------------------------------------------------------------------------
# Making datasets
# ---------------------------------------------------------------------------------------


def _collect(env_id: str, act: Callable[[np.ndarray], np.ndarray], n_transitions: int, seed: int,
             n_envs: int = 8, progress: bool = True, desc: str = "") -> list[dict]:
    """Roll ``act`` (batched, env action units) in ``n_envs`` lockstep envs for ``n_transitions`` steps.

    Returns Minari episode buffers; episodes still running when the budget is reached are
    closed as truncated (as D4RL does at its size limit).
    """
    import gymnasium as gym
    from tqdm.auto import tqdm

    envs = [gym.make(env_id) for _ in range(n_envs)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    for i, e in enumerate(envs):
        e.action_space.seed(seed + i)
    running = [dict(observations=[o], actions=[], rewards=[], terminations=[], truncations=[]) for o in obs]
    episodes, count, next_seed = [], 0, seed + n_envs
    bar = tqdm(total=n_transitions, desc=desc or f"collect {env_id}", disable=not progress, unit="step")
    while count < n_transitions:
        actions = act(obs)
        for i, e in enumerate(envs):
            if count >= n_transitions:
                break
            o, r, term, trunc, _ = e.step(actions[i])
            ep = running[i]
            ep["actions"].append(actions[i]), ep["rewards"].append(r), ep["observations"].append(o)
            ep["terminations"].append(term), ep["truncations"].append(trunc)
            count += 1
            if term or trunc:
                episodes.append(ep)
                o, _ = e.reset(seed=next_seed)
                next_seed += 1
                running[i] = dict(observations=[o], actions=[], rewards=[], terminations=[], truncations=[])
            obs[i] = o
        bar.update(min(n_envs, n_transitions - bar.n))
    bar.close()
    for ep in running:
        if ep["actions"]:
            ep["truncations"][-1] = True
            episodes.append(ep)
    for e in envs:
        e.close()
    return [_as_arrays(ep) for ep in episodes]


def _as_arrays(ep: dict) -> dict:
    return dict(
        observations=np.asarray(ep["observations"], dtype=np.float32),
        actions=np.asarray(ep["actions"], dtype=np.float32),
        rewards=np.asarray(ep["rewards"], dtype=np.float64),
        terminations=np.asarray(ep["terminations"], dtype=bool),
        truncations=np.asarray(ep["truncations"], dtype=bool),
    )


def _episodes_from_replay(replay: dict[str, np.ndarray]) -> list[dict]:
    """Split an SB3 replay buffer (single env, env order) into Minari episode buffers.

    Episodes end at ``done``, at the buffer's end, and wherever the next observation does not
    continue the chain (e.g. an env reset when a behaviour run resumed): those ends are
    truncations.
    """
    done = replay["done"].astype(bool).copy()
    if len(done):
        broken = np.any(replay["next_observations"][:-1] != replay["observations"][1:], axis=-1)
        done[:-1] |= broken
        done[-1] = True  # close the running episode at the cut
    ends = np.flatnonzero(done)
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        term = replay["terminated"][sl].astype(bool)
        episodes.append(dict(
            observations=np.concatenate([replay["observations"][sl], replay["next_observations"][end:end + 1]]).astype(np.float32),
            actions=replay["actions"][sl].astype(np.float32),
            rewards=replay["rewards"][sl].astype(np.float64),
            terminations=term,
            truncations=~term & (np.arange(sl.start, sl.stop) == end),
        ))
        start = end + 1
    return episodes


def _reference_scores(run: BehaviourRun, episodes: int, seed: int) -> tuple[float, float]:
    """Random and expert mean returns over ``episodes`` episodes, cached beside the behaviour run."""
    path = run.directory / f"reference_scores_{episodes}.json"
    if path.exists():
        ref = json.loads(path.read_text())
        return ref["ref_min_score"], ref["ref_max_score"]
    import gymnasium as gym

    env = gym.make(run.env_id)
    env.action_space.seed(seed)
    rand = []
    for i in range(episodes):
        env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            total, done = total + float(r), term or trunc
        rand.append(total)
    expert, _ = evaluate_sb3(run.load_policy(run.best()), run.env_id, episodes, seed=seed)
    ref = dict(ref_min_score=float(np.mean(rand)), ref_max_score=float(expert), episodes=episodes)
    path.write_text(json.dumps(ref, indent=1))
    return ref["ref_min_score"], ref["ref_max_score"]


def make_dataset(env_id: str, quality: str, *, n_transitions: int = 1_000_000, seed: int = 0,
                 behaviour_algo: str = "sac", behaviour_steps: int = 150_000, behaviour_eval_every: int | None = None,
                 ref_episodes: int = 50, overwrite: bool = False, progress: bool = True, version: int = 0):
    """Make (or reuse) the local Minari dataset ``diffpolicy/<env>/<quality>-v<version>``.

    ``n_transitions`` applies to random / medium / expert (D4RL: 1M) and is split half and
    half for medium-expert; medium-replay holds the behaviour run's replay buffer up to the
    medium checkpoint. The behaviour run is checkpointed every ``behaviour_eval_every`` steps
    (default: :func:`~diffpolicy.envs.behaviour.default_eval_every`). Returns the ``MinariDataset``.
    """
    import minari

    did = dataset_id(env_id, quality, version)
    if did in local_datasets():
        if not overwrite:
            return minari.load_dataset(did)
        minari.delete_dataset(did)
    run = train_behaviour_policy(env_id, algo=behaviour_algo, total_steps=behaviour_steps,
                                 eval_every=behaviour_eval_every, seed=seed, progress=progress)
    ref_min, ref_max = _reference_scores(run, ref_episodes, seed=20_000 + seed)

    def policy_act(checkpoint):
        model = run.load_policy(checkpoint)
        return lambda obs: model.predict(obs, deterministic=False)[0]

    if quality == "random":
        import gymnasium as gym

        space = gym.make(env_id).action_space
        rng = np.random.default_rng(seed)
        episodes = _collect(env_id, lambda obs: rng.uniform(space.low, space.high, (len(obs),) + space.shape),
                            n_transitions, seed, progress=progress, desc=f"{did}")
        source = "uniformly random actions"
    elif quality in ("medium", "expert"):
        ckpt = run.medium(floor=ref_min) if quality == "medium" else run.best()
        episodes = _collect(env_id, policy_act(ckpt), n_transitions, seed, progress=progress, desc=did)
        source = f"SB3 {behaviour_algo.upper()} policy at step {ckpt.step} (eval return {ckpt.return_mean:.1f}), stochastic"
    elif quality == "medium-replay":
        med = run.medium(floor=ref_min)
        episodes = _episodes_from_replay(run.replay(up_to_step=med.step))
        source = f"SB3 {behaviour_algo.upper()} replay buffer up to step {med.step} (the medium policy)"
    else:  # medium-expert
        med, best = run.medium(floor=ref_min), run.best()
        half = n_transitions // 2
        episodes = (_collect(env_id, policy_act(med), half, seed, progress=progress, desc=f"{did} (medium half)")
                    + _collect(env_id, policy_act(best), n_transitions - half, seed + 100_000, progress=progress,
                               desc=f"{did} (expert half)"))
        source = f"half SB3 {behaviour_algo.upper()} medium (step {med.step}), half expert (step {best.step})"

    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                             terminations=ep["terminations"], truncations=ep["truncations"]) for ep in episodes]
    import gymnasium as gym

    return minari.create_dataset_from_buffers(
        dataset_id=did, buffer=buffers, env=gym.make(env_id).spec, algorithm_name=f"diffpolicy {quality}: {source}",
        author="diffpolicy", code_permalink="https://github.com/diffpolicy/diffpolicy",
        ref_min_score=ref_min, ref_max_score=ref_max, num_episodes_average_score=ref_episodes,
        description=(f"D4RL-style {quality} data for {env_id}: {source}. Reference scores: random policy "
                     f"and the expert (best) SB3 checkpoint, mean return over {ref_episodes} episodes."),
    )


# ---------------------------------------------------------------------------------------
# Using datasets
# ---------------------------------------------------------------------------------------


def check_spaces(obs_dim: int, act_dim: int, env_id: str, *, dataset: str = "the dataset") -> None:
    """Raise a ``ValueError`` naming both shapes when ``env_id``'s spaces differ from the data's."""
    import gymnasium as gym

    env = gym.make(env_id)
    env_obs, env_act = env.observation_space.shape, env.action_space.shape
    env.close()
    if env_obs != (obs_dim,) or env_act != (act_dim,):
        raise ValueError(f"{dataset} has observations of shape ({obs_dim},) and actions of shape ({act_dim},), but "
                         f"{env_id} has observations {env_obs} and actions {env_act}: use the env the data came from")


@dataclasses.dataclass
class OfflineData:
    """A dataset as flat transition tensors, with normalisation and episode boundaries.

    ``observations`` and ``next_observations`` are raw; :meth:`transitions` normalises them by
    ``obs_mean`` / ``obs_std`` (dataset statistics). ``actions`` are mapped from the action box to
    ``[-1, 1]``. ``terminals`` mark true terminations (bootstrapping stops), ``timeouts`` time-limit
    truncations; ``episode_ids`` number the episodes.
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    next_observations: Tensor
    terminals: Tensor
    timeouts: Tensor
    episode_ids: Tensor
    action_low: Tensor
    action_high: Tensor
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    env_id: str | None = None
    dataset_id: str | None = None
    dropped_nonfinite: int = 0  # transitions dropped for NaN / inf (``from_minari(..., drop_nonfinite=True)``)

    def __post_init__(self):
        _check_finite({k: getattr(self, k).detach().cpu().numpy() for k in ("observations", "actions", "rewards", "next_observations")},
                      self.dataset_id or "the data", drop=False, how="drop them before building OfflineData, or "
                      "load it with OfflineData.from_minari(..., drop_nonfinite=True)")
        self.obs_mean = self.observations.mean(0)
        self.obs_std = self.observations.std(0) + 1e-3

    # --------------------------------------------------------------- construction
    @classmethod
    def from_minari(cls, dataset, *, drop_nonfinite: bool = False) -> "OfflineData":
        """Flatten a ``MinariDataset`` (or an id, opened with :func:`load_dataset`)."""
        if isinstance(dataset, str):
            dataset = load_dataset(dataset)
        obs, act, rew, nxt, term, trunc, eid = [], [], [], [], [], [], []
        _check_sizes(dataset)
        try:
            episodes = list(dataset.iterate_episodes())
        except _READ_ERRORS as e:  # damaged after it was opened
            raise _corrupt(dataset.spec.dataset_id, e) from None
        for k, ep in enumerate(episodes):
            o = np.asarray(ep.observations, dtype=np.float32)
            if o.ndim != 2:
                raise ValueError(f"{dataset.spec.dataset_id}: only flat Box observations are supported, got shape {o.shape[1:]}")
            n = len(ep.actions)
            lengths = dict(observations=len(o) - 1, rewards=len(ep.rewards), terminations=len(ep.terminations),
                           truncations=len(ep.truncations))
            if any(v != n for v in lengths.values()):  # a damaged header can change one array's length
                raise _corrupt(dataset.spec.dataset_id, ValueError(
                    f"episode {k} has {n} actions but " + ", ".join(f"{v} {f}" for f, v in lengths.items())
                    + " (observations counted less the final one)"))
            obs.append(o[:n]), nxt.append(o[1:n + 1]), act.append(np.asarray(ep.actions, dtype=np.float32).reshape(n, -1))
            rew.append(np.asarray(ep.rewards, dtype=np.float32)), term.append(np.asarray(ep.terminations, dtype=bool))
            trunc.append(np.asarray(ep.truncations, dtype=bool)), eid.append(np.full(n, k))
        if not obs:
            raise ValueError(f"{dataset.spec.dataset_id} holds no episodes")
        space = dataset.spec.action_space
        md = dataset.storage.metadata
        data = dict(
            observations=np.concatenate(obs), actions=np.concatenate(act), rewards=np.concatenate(rew),
            next_observations=np.concatenate(nxt), terminals=np.concatenate(term), timeouts=np.concatenate(trunc),
            episode_ids=np.concatenate(eid),
        )
        n_all = len(data["actions"])
        data = _check_finite(data, dataset.spec.dataset_id, drop_nonfinite)
        return cls(
            **{k: torch.as_tensor(v) for k, v in data.items()},
            action_low=torch.as_tensor(np.asarray(space.low, dtype=np.float32)),
            action_high=torch.as_tensor(np.asarray(space.high, dtype=np.float32)),
            ref_min_score=md.get("ref_min_score"), ref_max_score=md.get("ref_max_score"),
            env_id=_env_id(dataset), dataset_id=dataset.spec.dataset_id, dropped_nonfinite=n_all - len(data["actions"]),
        )

    # --------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self.observations.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def normalize_obs(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def normalize_action(self, action: Tensor) -> Tensor:
        """Env units -> ``[-1, 1]`` (the inverse of gymnasium's ``RescaleAction``)."""
        return 2 * (action - self.action_low) / (self.action_high - self.action_low) - 1

    def episode_returns(self) -> Tensor:
        """Undiscounted return of every episode in the data."""
        return torch.zeros(int(self.episode_ids.max()) + 1, dtype=torch.float64).index_add_(
            0, self.episode_ids.long(), self.rewards.double())

    def return_range_scale(self) -> float:
        """``1000 / (max - min episode return)``: IQL's MuJoCo reward scaling (Kostrikov et al. 2022, experimental details)."""
        r = self.episode_returns()
        span = float(r.max() - r.min())
        return 1000.0 / span if span > 0 else 1.0

    def normalized_score(self, returns):
        if self.ref_min_score is None or self.ref_max_score is None:
            raise ValueError(f"{self.dataset_id} has no ref_min_score / ref_max_score in its metadata")
        return normalized_score(returns, self.ref_min_score, self.ref_max_score)

    def check_env(self, env_id: str | None = None) -> None:
        check_spaces(self.obs_dim, self.act_dim, env_id or self.env_id, dataset=self.dataset_id or "the dataset")

    # --------------------------------------------------------------- batches
    def transitions(self, normalize: bool = True, reward_scale: float = 1.0) -> TensorDict:
        """All transitions in TorchRL's layout (``observation``, ``action``, ``("next", ...)``);
        rewards multiplied by ``reward_scale``."""
        obs, nxt = self.observations, self.next_observations
        if normalize:
            obs, nxt = self.normalize_obs(obs), self.normalize_obs(nxt)
        n = len(self)
        term = self.terminals.reshape(n, 1)
        return TensorDict({
            "observation": obs,
            "action": self.normalize_action(self.actions).clamp(-1, 1),
            "next": {"observation": nxt, "reward": reward_scale * self.rewards.reshape(n, 1), "terminated": term,
                     "done": term | self.timeouts.reshape(n, 1), "truncated": self.timeouts.reshape(n, 1)},
        }, batch_size=[n])

    def sequences(self, obs_horizon: int = 2, action_horizon: int = 8, normalize: bool = True) -> TensorDict:
        """Diffusion Policy windows (Chi et al. 2023): ``observation [M, To, obs]`` and ``action [M, Ta, act]``.

        Window ``i`` starts at transition ``i``: the observations ``o_{i-To+1} .. o_i`` and the
        actions ``a_i .. a_{i+Ta-1}``; indices outside the episode are padded with its first
        observation / last action, as Diffusion Policy does. ``valid`` marks action steps inside
        the episode.
        """
        obs = self.normalize_obs(self.observations) if normalize else self.observations
        act = self.normalize_action(self.actions).clamp(-1, 1)
        eid = self.episode_ids
        n = len(self)
        idx = torch.arange(n)
        change = torch.ones(n, dtype=torch.bool)
        change[1:] = eid[1:] != eid[:-1]
        first = torch.nonzero(change).flatten()
        last = torch.cat([first[1:] - 1, torch.tensor([n - 1])])
        counts = last - first + 1
        starts = torch.repeat_interleave(first, counts)
        ends = torch.repeat_interleave(last, counts)
        o_idx = (idx[:, None] + torch.arange(-obs_horizon + 1, 1)[None]).maximum(starts[:, None])
        a_raw = idx[:, None] + torch.arange(action_horizon)[None]
        a_idx = a_raw.minimum(ends[:, None])
        return TensorDict({"observation": obs[o_idx], "action": act[a_idx], "valid": a_raw <= ends[:, None]},
                          batch_size=[n])

    def replay_buffer(self, batch_size: int, *, sequences: dict | None = None, normalize: bool = True, device=None,
                      reward_scale: float = 1.0):
        """A TorchRL ``ReplayBuffer`` sampling ``batch_size`` transitions (or ``sequences(**sequences)``)."""
        from torchrl.data import ReplayBuffer, TensorStorage
        from torchrl.data.replay_buffers.samplers import RandomSampler

        td = (self.sequences(**sequences, normalize=normalize) if sequences is not None
              else self.transitions(normalize, reward_scale))
        if device is not None:
            td = td.to(device)
        return ReplayBuffer(storage=TensorStorage(td), sampler=RandomSampler(), batch_size=batch_size)


def _check_sizes(dataset) -> None:
    """Before any data is read: every array of an HDF5 dataset holds at most ``total_steps + 1``
    rows. A damaged header can claim billions of rows, which h5py would allocate and fill for
    minutes; such a file is a :class:`DatasetCorruptError` at once. (Other storages: nothing to do.)"""
    path = getattr(dataset.storage, "_file_path", None)
    if path is None or not str(path).endswith((".hdf5", ".h5")):
        return
    import h5py

    did, bad = dataset.spec.dataset_id, []
    try:
        limit = int(dataset.storage.total_steps) + 1  # the whole file's steps (a filtered dataset sees fewer)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0] > limit:
                bad.append(f"{name} has {obj.shape[0]} rows")

        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except _READ_ERRORS as e:
        raise _corrupt(did, e) from None
    if bad:
        raise _corrupt(did, ValueError(f"{bad[0]}, more than the dataset's {limit - 1} steps"))


def _env_id(dataset) -> str | None:
    spec = dataset.spec.env_spec
    return getattr(spec, "id", None) if spec is not None else None


def _check_finite(data: dict[str, np.ndarray], name: str, drop: bool,
                  how: str = "pass drop_nonfinite=True (`diffpolicy train --drop-nonfinite`) to drop those transitions",
                  ) -> dict[str, np.ndarray]:
    """Count NaN / inf per field; refuse them, or drop the transitions that hold them."""
    bad_rows = np.zeros(len(data["actions"]), dtype=bool)
    counts = {}
    for k in ("observations", "actions", "rewards", "next_observations"):  # episode_ids / flags are integers
        bad = ~np.isfinite(data[k])
        counts[k] = int(bad.sum())
        bad_rows |= bad.reshape(len(bad), -1).any(1)
    if not bad_rows.any():
        return data
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items() if v)
    if not drop:
        raise NonFiniteDataError(
            f"{name} holds non-finite values ({detail}) in {int(bad_rows.sum())} of {len(bad_rows)} transitions; {how}")
    import warnings

    warnings.warn(f"{name}: dropped {int(bad_rows.sum())} of {len(bad_rows)} transitions with non-finite values ({detail})")
    # A dropped row splits its episode: the row before the gap becomes a truncation and the rows
    # after it a new episode, so sequences never join steps across the gap.
    keep = np.flatnonzero(~bad_rows)
    out = {k: v[keep] for k, v in data.items()}
    gap = np.zeros(len(keep), dtype=bool)
    gap[1:] = (np.diff(keep) > 1) | (out["episode_ids"][1:] != out["episode_ids"][:-1])
    out["episode_ids"] = np.cumsum(gap)
    before_gap = np.zeros(len(keep), dtype=bool)
    before_gap[:-1] = np.diff(keep) > 1
    out["timeouts"] = out["timeouts"] | (before_gap & ~out["terminals"])
    return out

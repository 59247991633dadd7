"""Datasets: making, loading, normalised scores, transitions and sequences, bad input; the env factory."""
import json

import minari
import numpy as np
import pytest
import torch

from diffpolicy.envs.behaviour import train_behaviour_policy
from diffpolicy.envs.datasets import (
    DatasetNotFoundError, NonFiniteDataError, OfflineData, _episodes_from_replay, check_spaces, dataset_id,
    load_dataset, normalized_score,
)
from diffpolicy.envs.factory import evaluate, make_env


def test_dataset_round_trip_through_minari(pendulum_data, offline_home):
    did = dataset_id("Pendulum-v1", "medium")
    assert did == "diffpolicy/pendulum/medium-v0" and pendulum_data.dataset_id == did
    ds = minari.load_dataset(did)  # a normal Minari dataset
    assert ds.total_steps == 2000 == len(pendulum_data)
    assert ds.spec.env_spec.id == "Pendulum-v1" and pendulum_data.env_id == "Pendulum-v1"
    md = ds.storage.metadata
    ref = json.loads(next((offline_home / "home").rglob("reference_scores_2.json")).read_text())
    assert md["ref_min_score"] == pytest.approx(ref["ref_min_score"]) == pendulum_data.ref_min_score
    assert md["ref_max_score"] == pytest.approx(ref["ref_max_score"]) == pendulum_data.ref_max_score
    assert pendulum_data.observations.shape == (2000, 3) and pendulum_data.actions.shape == (2000, 1)
    # Episode structure: next_observation of step i is the observation of step i + 1 inside an episode.
    same = pendulum_data.episode_ids[1:] == pendulum_data.episode_ids[:-1]
    torch.testing.assert_close(pendulum_data.next_observations[:-1][same], pendulum_data.observations[1:][same])
    ep0 = next(iter(ds.iterate_episodes()))
    np.testing.assert_allclose(ep0.observations[: len(ep0.actions)], pendulum_data.observations[: len(ep0.actions)])


def test_normalized_score_against_hand_values_and_minari(pendulum_data):
    assert normalized_score([50.0], 0.0, 200.0) == pytest.approx([25.0])
    assert normalized_score([-20.0, 3234.3], -20.0, 3234.3) == pytest.approx([0.0, 100.0])
    ds = minari.load_dataset(pendulum_data.dataset_id)
    returns = np.array([-1500.0, -900.0, -150.0])
    np.testing.assert_allclose(pendulum_data.normalized_score(returns), 100 * minari.get_normalized_score(ds, returns))


def test_transitions_layout_and_action_normalisation(pendulum_data):
    td = pendulum_data.transitions()
    assert set(td.keys(include_nested=True, leaves_only=True)) >= {
        "observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated"), ("next", "done")}
    # Pendulum's torque box is [-2, 2]: normalised actions are the raw ones halved.
    torch.testing.assert_close(td["action"], (pendulum_data.actions / 2).clamp(-1, 1))
    obs = td["observation"]
    torch.testing.assert_close(obs.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    assert torch.all((obs.std(0) - 1).abs() < 0.01)
    batch = pendulum_data.replay_buffer(64).sample()
    assert batch["observation"].shape == (64, 3) and batch["next", "reward"].shape == (64, 1)


def test_sequences_pad_inside_episodes(pendulum_data):
    To, Ta = 3, 4
    seq = pendulum_data.sequences(To, Ta, normalize=False)
    obs, act = pendulum_data.observations, pendulum_data.normalize_action(pendulum_data.actions).clamp(-1, 1)
    eid = pendulum_data.episode_ids
    start = int(torch.nonzero(eid == 1)[0])  # first step of the second episode
    # At an episode start the history repeats the first observation.
    torch.testing.assert_close(seq["observation"][start], obs[start].expand(To, 3))
    # In the middle: o_{i-2}, o_{i-1}, o_i and a_i .. a_{i+3}.
    i = start + 10
    torch.testing.assert_close(seq["observation"][i], obs[i - 2:i + 1])
    torch.testing.assert_close(seq["action"][i], act[i:i + 4])
    assert bool(seq["valid"][i].all())
    # At an episode end the chunk repeats the last action and is marked invalid past the end.
    end = start - 1
    torch.testing.assert_close(seq["action"][end], act[end].expand(Ta, 1))
    assert seq["valid"][end].tolist() == [True, False, False, False]


def test_replay_buffer_split_into_episodes():
    n = 7
    replay = {"observations": np.arange(n, dtype=np.float32)[:, None], "next_observations": np.arange(1, n + 1,
              dtype=np.float32)[:, None], "actions": np.zeros((n, 1), np.float32), "rewards": np.ones(n, np.float32),
              "done": np.array([0, 0, 1, 0, 1, 0, 0], bool), "terminated": np.array([0, 0, 1, 0, 0, 0, 0], bool)}
    eps = _episodes_from_replay(replay)
    assert [len(e["actions"]) for e in eps] == [3, 2, 2]
    # A reset without a done flag (a resumed behaviour run) also ends the episode, as a truncation.
    broken = {k: v.copy() for k, v in replay.items()}
    broken["observations"][6, 0] = 100.0  # step 6 does not continue from next_observation of step 5
    eps2 = _episodes_from_replay(broken)
    assert [len(e["actions"]) for e in eps2] == [3, 2, 1, 1] and eps2[2]["truncations"].tolist() == [True]
    assert eps[0]["terminations"].tolist() == [False, False, True] and not eps[0]["truncations"].any()
    assert eps[1]["truncations"].tolist() == [False, True]  # a time-limit end
    assert eps[2]["truncations"].tolist() == [False, True]  # cut by the buffer's end
    np.testing.assert_array_equal(eps[1]["observations"][:, 0], [3, 4, 5])


def test_unknown_dataset_lists_local_ones_and_how_to_make_one(pendulum_data, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("diffpolicy/nothing/medium-v0", download=False)
    msg = str(e.value)
    assert pendulum_data.dataset_id in msg and "make_dataset" in msg
    import minari

    def no_network(*a, **k):
        raise AssertionError("our own ids are never looked up remotely")

    monkeypatch.setattr(minari, "load_dataset", no_network)  # a typo in our namespace answers at once
    with pytest.raises(DatasetNotFoundError, match="made locally"):
        load_dataset("diffpolicy/hoper/medium-v0")
    with pytest.raises(ValueError, match="quality"):
        dataset_id("Hopper-v5", "excellent")


def test_mismatched_spaces_name_both_shapes(pendulum_data):
    with pytest.raises(ValueError, match=r"\(3,\).*\(1,\).*Hopper-v5.*\(11,\).*\(3,\)"):
        pendulum_data.check_env("Hopper-v5")
    check_spaces(3, 1, "Pendulum-v1")


def test_non_finite_values_are_counted_refused_or_dropped(pendulum_data, tmp_path, monkeypatch):
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs = np.random.default_rng(0).normal(size=(11, 3)).astype(np.float32)
    obs[4, 1] = np.nan
    act = np.zeros((10, 1), np.float32)
    act[7, 0] = np.inf
    ep = EpisodeBuffer(observations=obs, actions=act, rewards=np.zeros(10), terminations=np.zeros(10, bool),
                       truncations=np.eye(10, dtype=bool)[-1])
    import gymnasium as gym

    ds = minari.create_dataset_from_buffers("test/bad/nan-v0", [ep], env=gym.make("Pendulum-v1").spec)
    with pytest.raises(NonFiniteDataError, match=r"observations: 1, actions: 1, next_observations: 1\) in 3 of 10 transitions.*drop_nonfinite"):
        OfflineData.from_minari(ds)
    with pytest.warns(UserWarning, match="dropped 3 of 10"):
        data = OfflineData.from_minari(ds, drop_nonfinite=True)
    assert len(data) == 7 and torch.isfinite(data.observations).all()
    # Rows 3, 4 and 7 are gone: the episode is split at each gap, the row before a gap truncated.
    assert data.episode_ids.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.timeouts.tolist() == [False, False, True, False, True, False, True]
    assert not bool(data.sequences(2, 3)["valid"][2, 1:].any())


def test_offline_data_built_from_tensors_refuses_non_finite_values():
    obs = torch.zeros(5, 2)
    obs[3, 1] = float("inf")
    no = torch.zeros(5, dtype=torch.bool)
    with pytest.raises(NonFiniteDataError, match=r"observations: 1\) in 1 of 5 transitions; drop them before"):
        OfflineData(obs, torch.zeros(5, 1), torch.zeros(5), torch.zeros(5, 2), no, no, torch.zeros(5), -torch.ones(1),
                    torch.ones(1))


def test_return_range_reward_scale(pendulum_data):
    r = pendulum_data.episode_returns()
    assert len(r) == int(pendulum_data.episode_ids.max()) + 1
    torch.testing.assert_close(r.sum(), pendulum_data.rewards.double().sum())
    assert pendulum_data.return_range_scale() == pytest.approx(1000 / float(r.max() - r.min()))
    td = pendulum_data.transitions(reward_scale=2.0)
    torch.testing.assert_close(td["next", "reward"].squeeze(1), 2 * pendulum_data.rewards)


@pytest.mark.parametrize("algo", ["sac", "td3"])
def test_behaviour_run_resumes_and_picks_medium(tmp_path, algo):
    class Killed(Exception):
        pass

    def kill_at_300(msg):
        if "step 300" in msg:
            raise Killed(msg)

    kw = dict(algo=algo, total_steps=600, eval_every=300, learning_starts=1000, eval_episodes=1, cache_dir=tmp_path,
              progress=False)
    with pytest.raises(Killed):  # killed right after its first checkpoint
        train_behaviour_policy("Pendulum-v1", **kw, log=kill_at_300)
    directory = next((tmp_path / "Pendulum-v1").iterdir())
    assert directory.name == f"{algo}-seed0-600" and not (directory / "done").exists()
    first = (directory / "policy_300.zip").stat().st_mtime_ns
    logs = []
    run = train_behaviour_policy("Pendulum-v1", **kw, log=logs.append)  # resumes from step 300
    assert logs[0] == f"resuming Pendulum-v1 {algo} from step 300" and len(logs) == 2
    assert [c.step for c in run.checkpoints] == [300, 600] and (directory / "policy_300.zip").stat().st_mtime_ns == first
    replay = run.replay()
    assert replay["observations"].shape == (600, 3)  # every transition, also the one of the checkpointed step
    again = train_behaviour_policy("Pendulum-v1", **kw, log=logs.append)  # finished: cached, no retraining
    assert again.checkpoints == run.checkpoints and len(logs) == 2
    assert run.best().return_mean == max(c.return_mean for c in run.checkpoints)
    with pytest.raises(ValueError, match="checkpointed every 300 steps, not 200"):  # its medium comes from those
        train_behaviour_policy("Pendulum-v1", **{**kw, "eval_every": 200}, log=logs.append)
    with pytest.raises(ValueError, match=r"eval_every \(250\) must divide total_steps \(600\)"):
        train_behaviour_policy("Pendulum-v1", **{**kw, "eval_every": 250}, log=logs.append)


def test_default_behaviour_checkpoint_spacing_divides_the_run():
    from diffpolicy.envs.behaviour import default_eval_every

    assert default_eval_every(150_000) == 10_000 and default_eval_every(6_000) == 1_000  # the benchmarks' runs
    assert default_eval_every(600) == 600 and default_eval_every(100_000) == 6_250  # 100000 // 15 = 6666 does not
    assert all(n % default_eval_every(n) == 0 for n in range(1, 20_000, 37))


def test_env_factory_normalises_observations_and_rescales_actions():
    loc, scale = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0])
    raw, norm = make_env("Pendulum-v1"), make_env("Pendulum-v1", obs_loc=loc, obs_scale=scale)
    raw.set_seed(3), norm.set_seed(3)
    torch.testing.assert_close(norm.reset()["observation"], (raw.reset()["observation"].float() - loc) / scale)
    env = make_env("Pendulum-v1", num_envs=3)
    assert env.batch_size == (3,) and env.action_spec.shape == (3, 1)
    with pytest.raises(ValueError, match="unknown gymnasium environment"):
        make_env("NoSuchEnv-v0")
    # Actions in [-1, 1] map to Pendulum's [-2, 2] torque; beyond the box they are clipped.
    res = [evaluate(lambda o, a=a: torch.full((o.shape[0], 1), a), "Pendulum-v1", episodes=2, seed=0).returns
           for a in (1.0, 5.0)]
    np.testing.assert_allclose(res[0], res[1])


def test_evaluation_is_reproducible_and_counts_each_episode_once():
    pol = lambda o: torch.zeros(o.shape[0], 3)
    a = evaluate(pol, "Hopper-v5", episodes=3, seed=5)
    b = evaluate(pol, "Hopper-v5", episodes=3, seed=5)
    np.testing.assert_array_equal(a.returns, b.returns)
    assert (a.lengths < 1000).all()  # a zero-torque hopper falls; later steps of finished envs are not counted
    one = evaluate(pol, "Hopper-v5", episodes=1, seed=5)
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    env.reset(seed=5)  # TorchRL's set_seed on a single gym env resets it with the seed ...
    env.reset()  # ... and the evaluation then starts from the next reset
    total, done = 0.0, False
    while not done:
        _, r, term, trunc, _ = env.step(np.zeros(3))
        total, done = total + r, term or trunc
    assert one.returns[0] == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("quality", ["random", "expert", "medium-expert", "medium-replay"])
def test_every_quality_makes_a_loadable_dataset(pendulum_data, quality):
    from diffpolicy.envs.datasets import make_dataset

    ds = make_dataset("Pendulum-v1", quality, n_transitions=400, behaviour_steps=1000, behaviour_eval_every=500,
                      ref_episodes=2, progress=False)  # the fixture's behaviour run and reference scores, cached
    data = OfflineData.from_minari(minari.load_dataset(dataset_id("Pendulum-v1", quality)))
    expected = {"random": 400, "expert": 400, "medium-expert": 400}.get(quality)
    if expected is not None:
        assert ds.total_steps == expected == len(data)
    else:  # the replay buffer up to the medium checkpoint of the 1000-step behaviour run
        assert len(data) == ds.total_steps > 0
    assert (data.ref_min_score, data.ref_max_score) == (pendulum_data.ref_min_score, pendulum_data.ref_max_score)
    assert quality in ds.storage.metadata["algorithm_name"]


def test_action_chunks_run_whole_sum_rewards_and_stop_at_the_episode_end():
    from diffpolicy.envs.factory import make_gym_env

    plain, chunked = make_gym_env("Hopper-v5"), make_gym_env("Hopper-v5", action_chunk=4)
    assert chunked.action_space.shape == (12,)
    plain.reset(seed=1), chunked.reset(seed=1)
    gen = np.random.default_rng(0)
    for _ in range(3):
        chunk = gen.uniform(-1, 1, size=(4, 3)).astype(np.float32)
        total = 0.0
        for a in chunk:
            obs_p, r, term, trunc, _ = plain.step(a)
            total += r
            if term or trunc:
                break
        obs_c, r_c, term_c, trunc_c, info = chunked.step(chunk.reshape(-1))
        np.testing.assert_allclose(obs_c, obs_p)
        assert r_c == pytest.approx(total) and (term_c, trunc_c) == (term, trunc)
    # a falling hopper: the chunk that ends the episode stops there
    env = make_gym_env("Hopper-v5", action_chunk=50)
    env.reset(seed=0)
    _, _, term, _, info = env.step(np.ones(150, dtype=np.float32))
    assert term and info["chunk_steps"] < 50
    # evaluation of a chunking policy: the same returns as the plain env with the same actions
    a = evaluate(lambda o: torch.zeros(o.shape[0], 12), "Hopper-v5", episodes=2, seed=5, action_chunk=4)
    b = evaluate(lambda o: torch.zeros(o.shape[0], 3), "Hopper-v5", episodes=2, seed=5)
    np.testing.assert_allclose(a.returns, b.returns, rtol=1e-6)


def test_mujoco_warnings_become_python_warnings_not_a_log_file(tmp_path, monkeypatch):
    """A model with ``settotalmass`` (as HalfCheetah-v5's) makes MuJoCo warn; the warning must
    reach Python's warnings, not a MUJOCO_LOG.TXT in the user's working directory."""
    import warnings

    import mujoco

    import diffpolicy.envs  # noqa: F401  (installs the handler)

    monkeypatch.chdir(tmp_path)
    xml = ('<mujoco><compiler settotalmass="2"/><worldbody><body><freejoint/><geom size="0.1"/></body>'
           '</worldbody></mujoco>')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mujoco.MjModel.from_xml_string(xml)
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert any("MuJoCo: " in str(w.message) and "settotalmass" in str(w.message) for w in caught)


def test_mujoco_warnings_made_errors_do_not_abort_the_process(tmp_path):
    """Under ``-W error`` the handler's warning is an exception inside MuJoCo's C code, which would
    abort the interpreter; it is printed instead, and the process goes on."""
    import subprocess
    import sys

    code = ("import diffpolicy.envs, mujoco; mujoco.MjModel.from_xml_string('<mujoco><compiler settotalmass=\"2\"/>"
            "<worldbody><body><freejoint/><geom size=\"0.1\"/></body></worldbody></mujoco>'); print('alive')")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and "alive" in r.stdout, (r.returncode, r.stderr[-500:])
    assert "MuJoCo warning: compiler attribute 'settotalmass'" in r.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()

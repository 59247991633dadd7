"""Diffusion BC and Diffusion-QL on tiny data, and the shared offline training loop."""
import dataclasses
import math

import pytest
import torch
from tensordict import TensorDict

from diffpolicy.agents import agent_class, make_agent
from diffpolicy.agents.base import OfflineAgent
from diffpolicy.agents.critics import select_by_q
from diffpolicy.agents.trainer import NonFiniteLossError, TrainConfig, train_offline
from diffpolicy.checkpoint import load_checkpoint

SMALL = dict(hidden=64, depth=2, time_dim=8)


def _losses(agent, data, steps, key, batch=128):
    rb = data.replay_buffer(batch)
    return [float(agent.update(rb.sample())[key]) for _ in range(steps)]


def _mean(v):
    return sum(v) / len(v)


def test_update_counts_itself_once_even_through_parent_updates():
    agent = make_agent("idql", 3, 1, hidden=16, depth=1, time_dim=4, critic_hidden=16)  # IDQL.update calls DiffusionBC's
    td = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 1) * 2 - 1,
                     "next": {"observation": torch.randn(8, 3), "reward": torch.zeros(8, 1),
                              "done": torch.zeros(8, 1, dtype=torch.bool), "terminated": torch.zeros(8, 1, dtype=torch.bool)}},
                    [8])
    agent.update(td), agent.update(td)
    assert agent.num_updates == 2


def test_registry_and_settings_errors():
    with pytest.raises(ValueError, match="did you mean 'diffusion_ql'"):
        agent_class("diffusion_qll")
    with pytest.raises(TypeError, match="no setting.*hiden"):
        make_agent("diffusion_bc", 3, 1, hiden=64)


def test_diffusion_bc_loss_falls_and_acts_in_the_box(pendulum_data):
    torch.manual_seed(0)
    agent = make_agent("diffusion_bc", 3, 1, ema_start=50, **SMALL)
    losses = _losses(agent, pendulum_data, 300, "loss_bc")
    assert _mean(losses[-30:]) < 0.6 * _mean(losses[:30])
    a = agent.act(torch.randn(7, 3))
    assert a.shape == (7, 1) and bool((a.abs() <= 1).all())


def test_diffusion_bc_reproduces_both_modes_where_gaussian_bc_averages_them():
    """Same state, actions at -0.7 or +0.7: diffusion BC keeps both modes, Gaussian BC lands between them."""
    torch.manual_seed(0)
    n = 2048
    act = (torch.where(torch.rand(n, 1) < 0.5, -0.7, 0.7) + 0.05 * torch.randn(n, 1)).clamp(-1, 1)
    td = TensorDict({"observation": torch.zeros(n, 1), "action": act}, [n])
    diffusion = make_agent("diffusion_bc", 1, 1, ema_start=10**9, lr=3e-3, **SMALL)  # ema = actor copy
    gaussian = make_agent("gaussian_bc", 1, 1, hidden=64, lr=3e-3)
    for _ in range(2500):
        batch = td[torch.randint(n, (128,))]
        diffusion.update(batch)
    for _ in range(500):
        gaussian.update(td[torch.randint(n, (128,))])
    near = lambda a, m: float(((a - m).abs() < 0.2).float().mean())
    a = diffusion.act(torch.zeros(2000, 1)).squeeze(1)
    assert near(a, -0.7) > 0.2 and near(a, 0.7) > 0.2 and near(a, 0.0) < 0.2, (near(a, -0.7), near(a, 0.7))
    g = gaussian.act(torch.zeros(5, 1)).squeeze(1)
    assert bool((g.abs() < 0.3).all()), g  # the mode-averaging action


def test_select_by_q_picks_high_q_candidates():
    torch.manual_seed(0)
    obs = torch.zeros(64, 2)
    sampler = lambda o: torch.rand(o.shape[0], 1) * 2 - 1
    q = lambda o, a: 20 * a.squeeze(-1)  # prefers a -> +1
    cand = sampler(obs.repeat_interleave(50, 0)).reshape(64, 50, 1)
    greedy = select_by_q(obs, cand, q, temperature=0)
    soft = select_by_q(obs, cand, q)
    assert greedy.shape == (64, 1) and float(greedy.mean()) > 0.9
    assert float(soft.mean()) > 0.8 and float(sampler(obs).mean()) < 0.3


def test_diffusion_ql_learns_its_critic_and_its_q_term_reaches_the_actor(pendulum_data):
    kw = dict(ema_start=20, critic_hidden=64, critic_depth=2, **SMALL)
    torch.manual_seed(0)
    agent = make_agent("diffusion_ql", 3, 1, **kw)
    rb = pendulum_data.replay_buffer(128)
    out = [agent.update(rb.sample()) for _ in range(150)]
    critic = [float(o["loss_critic"]) for o in out]
    assert all(math.isfinite(c) for c in critic)
    assert _mean(critic[-20:]) < 0.75 * _mean(critic[:20])  # TD error falls from its random-init level
    bc = [float(o["loss_bc"]) for o in out]
    assert _mean(bc[-20:]) < 0.5 * _mean(bc[:20])  # the actor's denoising loss (about 0.96 -> 0.18)
    # With eta = 0 the actor step is plain BC; with eta = 1 the Q gradient changes it.
    batch = rb.sample()
    moved = {}
    for eta in (0.0, 1.0):
        torch.manual_seed(0)
        ag = make_agent("diffusion_ql", 3, 1, eta=eta, **kw)
        before = [p.clone() for p in ag.actor.parameters()]
        torch.manual_seed(1)
        ag.update(batch)
        moved[eta] = [p.detach() - b for p, b in zip(ag.actor.parameters(), before)]
    assert max(float((a - b).abs().max()) for a, b in zip(moved[0.0], moved[1.0])) > 1e-6
    a = agent.act(pendulum_data.transitions()["observation"][:5])
    assert a.shape == (5, 1) and bool((a.abs() <= 1).all())


def test_diffusion_ql_q_term_moves_actions_up_the_critic():
    """Data at -0.5 and +0.5, Q peaking at +0.8: with eta = 1 the actor's samples climb to Q's peak,
    with eta = 0 (plain BC) they keep both modes, mean about 0 (measured: mean action 0.83 vs 0.00)."""
    from known_q import KnownQ, two_mode_batch

    results = {}
    for eta in (0.0, 1.0):
        torch.manual_seed(0)
        agent = make_agent("diffusion_ql", 1, 1, hidden=64, depth=2, time_dim=8, critic_hidden=8, critic_depth=1,
                           eta=eta, lr=1e-3, ema_start=10**9)
        agent.critic, agent.critic_target = KnownQ(), KnownQ()
        agent.add_optimizer("critic", agent.critic.parameters())
        for _ in range(60):
            agent.update(two_mode_batch(128))
        with torch.no_grad():
            obs = torch.rand(1000, 1) * 2 - 1
            a = agent.sample_actions(obs, ema=False)
            results[eta] = (float(KnownQ().q_min(obs, a).mean()), float(a.mean()))
    (q_bc, mean_bc), (q_ql, mean_ql) = results[0.0], results[1.0]
    assert q_ql > q_bc + 0.3, (q_bc, q_ql)
    assert mean_ql > 0.6 and mean_ql > mean_bc + 0.4, (mean_bc, mean_ql)  # towards +0.8, not away from it


class _Counting(OfflineAgent):
    """A linear-regression agent: deterministic given the RNG, cheap, with one parameter vector."""

    name = "counting"

    def __init__(self, obs_dim, act_dim, nan_at=None):
        super().__init__(obs_dim, act_dim)
        self.lin = torch.nn.Linear(obs_dim, act_dim)
        self.add_optimizer("lin", self.lin.parameters(), lr=1e-2)
        self.nan_at = nan_at

    def update(self, batch):
        loss = ((self.lin(batch["observation"]) - batch["action"]) ** 2).mean()
        if self.nan_at is not None and self.num_updates + 1 >= self.nan_at:
            loss = loss * float("nan")
        else:
            self.step("lin", loss)
        return {"loss_mse": loss.detach()}

    @torch.no_grad()
    def act(self, obs):
        return self.lin(obs).clamp(-1, 1)


def test_training_resumes_on_the_same_curve(pendulum_data, tmp_path):
    torch.manual_seed(1)
    straight = _Counting(3, 1)
    train_offline(straight, pendulum_data, TrainConfig(steps=60, eval_every=30, eval_episodes=1, log_every=10),
                  run_dir=tmp_path / "a", progress=False)
    torch.manual_seed(1)
    resumed = _Counting(3, 1)
    train_offline(resumed, pendulum_data, TrainConfig(steps=30, eval_every=30, eval_episodes=1, log_every=10),
                  run_dir=tmp_path / "b", progress=False)
    fresh = _Counting(3, 1)  # a new process would build a new agent and find the checkpoint
    out = train_offline(fresh, pendulum_data, TrainConfig(steps=60, eval_every=30, eval_episodes=1, log_every=10),
                        run_dir=tmp_path / "b", progress=False)
    assert out["steps"] == 60 and [h["step"] for h in out["history"]] == [30, 60]
    torch.testing.assert_close(fresh.lin.weight, straight.lin.weight, rtol=0, atol=0)
    for f in ("train.csv", "eval.csv", "config.json", "checkpoint.safetensors"):
        assert (tmp_path / "b" / f).exists()
    assert (tmp_path / "b" / "tb").is_dir()
    # The logs of the resumed run equal the straight run's: no row written twice.
    for f in ("train.csv", "eval.csv"):
        assert (tmp_path / "b" / f).read_text().splitlines()[0] == (tmp_path / "a" / f).read_text().splitlines()[0]
        steps_b = [line.split(",")[0] for line in (tmp_path / "b" / f).read_text().splitlines()[1:]]
        steps_a = [line.split(",")[0] for line in (tmp_path / "a" / f).read_text().splitlines()[1:]]
        assert steps_b == steps_a
    # A run directory of another configuration is refused, not silently resumed.
    with pytest.raises(ValueError, match="different configuration.*train"):
        train_offline(_Counting(3, 1), pendulum_data, TrainConfig(steps=90, batch_size=64, eval_every=30,
                                                                   eval_episodes=1), run_dir=tmp_path / "b", progress=False)


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(pendulum_data, tmp_path):
    cfg = TrainConfig(steps=40, eval_every=20, eval_episodes=1, log_every=10)
    with pytest.raises(NonFiniteLossError):  # dies at step 35: train.csv has a row at 30 past the checkpoint (20)
        train_offline(_Counting(3, 1, nan_at=35), pendulum_data, cfg, run_dir=tmp_path, progress=False)
    train_offline(_Counting(3, 1), pendulum_data, cfg, run_dir=tmp_path, progress=False)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "train.csv").read_text().splitlines()[1:]]
    assert steps == [10, 20, 30, 40]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(pendulum_data, tmp_path):
    cfg = TrainConfig(steps=40, eval_every=20, eval_episodes=1, log_every=10)
    agent = _Counting(3, 1, nan_at=25)
    with pytest.raises(NonFiniteLossError, match="loss_mse is nan at step 25"):
        train_offline(agent, pendulum_data, cfg, run_dir=tmp_path, progress=False)
    saved = load_checkpoint(tmp_path)
    assert saved["state"]["step"] == 20 and torch.isfinite(saved["agent"]["lin.weight"]).all()


def test_dataset_env_mismatch_fails_before_training(pendulum_data):
    agent = _Counting(3, 1)
    with pytest.raises(ValueError, match="Hopper-v5"):
        train_offline(agent, pendulum_data, TrainConfig(steps=5), env_id="Hopper-v5", progress=False)
    assert agent.num_updates == 0


def test_idql_weights_are_the_derivative_ratio_of_the_value_loss():
    """IDQL: w(u) = f'(u) / (2 u) for f(u) = |tau - 1(u<0)| u^2 (expectile), f'(u) / u for |tau - 1(u<0)| |u|."""
    from diffpolicy.agents.idql import expectile_weights, quantile_weights

    q, v = torch.tensor([2.0, 0.5, 1.25]), torch.tensor([1.0, 1.0, 1.0])
    u = (q - v).requires_grad_(True)
    f = ((0.7 - (u < 0).float()).abs() * u**2).sum()
    (grad,) = torch.autograd.grad(f, u)
    torch.testing.assert_close(expectile_weights(q, v, 0.7), grad / (2 * u.detach()))
    torch.testing.assert_close(expectile_weights(q, v, 0.7), torch.tensor([0.7, 0.3, 0.7]))
    torch.testing.assert_close(quantile_weights(q, v, 0.7), torch.tensor([0.7 / 1.0, 0.3 / 0.5, 0.7 / 0.25]))


def test_idql_critic_learns_and_selection_prefers_high_q(pendulum_data):
    torch.manual_seed(0)
    agent = make_agent("idql", 3, 1, ema_start=20, critic_hidden=64, hidden=64, depth=2, time_dim=8)
    rb = pendulum_data.replay_buffer(128)
    out = [agent.update(rb.sample()) for _ in range(150)]
    q_losses = [float(o["loss_qvalue"]) for o in out]
    assert _mean(q_losses[-20:]) < 0.5 * _mean(q_losses[:20])
    assert _mean([float(o["loss_bc"]) for o in out][-20:]) < _mean([float(o["loss_bc"]) for o in out][:20])
    assert agent.act(torch.zeros(4, 3)).shape == (4, 1)


def test_idql_builds_the_actor_of_its_code_and_older_runs_load_theirs():
    """Their MLPResNet (3 blocks of 256 with 1024-wide inner layers, dropout 0.1, swish); runs recorded
    before those settings existed rebuild the narrower network they were trained with."""
    import dataclasses

    from diffpolicy.agents import _json_settings
    from diffpolicy.agents.idql import IDQL, IDQLConfig
    from diffpolicy.nets.mlp import ResidualBlock

    agent = IDQL(11, 3)
    blocks = [m for m in agent.actor.net.body if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 and blocks[0].net[2].out_features == 1024 and blocks[0].net[0].p == 0.1
    assert type(blocks[0].net[3]).__name__ == "SiLU"
    recorded = dataclasses.asdict(IDQLConfig(layer_norm=True, activation="mish", time_dim=16))
    old = {k: v for k, v in recorded.items() if k not in ("expansion", "dropout")}
    settings = _json_settings(IDQL, old)
    assert (settings["expansion"], settings["dropout"]) == (1, 0.0)
    narrow = IDQL(11, 3, **settings)
    layout = [type(m).__name__ for m in narrow.actor.net.body[1].net]
    assert layout == ["LayerNorm", "Sequential", "Mish", "Linear"]  # no dropout, 256 -> 256 (+ LayerNorm) blocks
    assert narrow.actor.net.body[1].net[1][0].out_features == 256
    assert _json_settings(IDQL, recorded)["expansion"] == 4  # a run that records the setting keeps it


def test_acting_never_drops_out():
    torch.manual_seed(0)
    agent = make_agent("idql", 3, 2, hidden=16, depth=1, temperature=0.0, sampler="ddim", dropout=0.5)
    assert agent.training  # a fresh agent, in training mode
    obs = torch.randn(6, 3)
    torch.testing.assert_close(agent.act(obs), agent.act(obs))
    assert agent.training and agent.ema.module.training  # the mode is restored after acting


def test_an_old_idql_run_resumes_with_the_network_it_was_built_with(pendulum_data, tmp_path):
    """A run recorded before ``expansion`` / ``dropout`` existed was built narrow (legacy_settings): it
    resumes with those values, not the later defaults, and loads for acting."""
    import json

    from diffpolicy.agents import load_agent

    old = dict(hidden=16, depth=1, critic_hidden=16, time_dim=4, expansion=1, dropout=0.0)
    cfg = TrainConfig(steps=10, eval_every=10, eval_episodes=1, log_every=10)
    train_offline(make_agent("idql", 3, 1, **old), pendulum_data, cfg, run_dir=tmp_path, progress=False)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["agent_config"]["expansion"], conf["agent_config"]["dropout"]  # written before they existed
    (tmp_path / "config.json").write_text(json.dumps(conf))
    out = train_offline(make_agent("idql", 3, 1, **old), pendulum_data, dataclasses.replace(cfg, steps=20),
                        run_dir=tmp_path, progress=False)
    assert out["steps"] == 20 and load_agent(tmp_path).config.expansion == 1


def test_a_teacher_or_a_fine_tuned_policy_never_drops_out():
    """Dropout is for fitting a BC: a distillation teacher and an online agent's chain run without it."""
    from diffpolicy.agents.dppo import DPPO

    torch.manual_seed(0)
    bc = make_agent("diffusion_bc", 3, 2, hidden=16, depth=1, residual=True, dropout=0.5)
    student = make_agent("consistency_bc_cd", 3, 2, hidden=16, depth=1, teacher=bc)
    online = DPPO.from_diffusion_bc(bc, num_envs=2, steps_per_iter=4)
    for agent in (student, online):
        agent.train()
    assert not student.teacher.training and not online.actor.training and not online.base.training
    assert online.critic.training  # the mode still reaches the rest
    obs = torch.randn(5, 3)
    torch.manual_seed(1)
    a = online.explore(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(online.explore(obs), a)  # the same noise gives the same chain: no dropout


def test_idql_resampling_prefers_high_q(monkeypatch):
    """Uniform behaviour candidates and a critic preferring a -> +1 (V = 0): the picks move right."""
    import diffpolicy.agents.idql as idql

    agent = make_agent("idql", 2, 1, hidden=32, depth=1, time_dim=4, critic_hidden=32)
    monkeypatch.setattr(agent, "sample_actions", lambda o: torch.rand(o.shape[0], 1) * 2 - 1)
    monkeypatch.setattr(idql, "q_and_v", lambda loss, o, a: (a.squeeze(-1), torch.zeros(a.shape[0])))
    obs = torch.zeros(500, 2)
    agent.config.selection = "argmax"
    assert float(agent.act(obs).mean()) > 0.95
    agent.config.selection = "expectile"  # w = 0.7 on a > 0, 0.3 on a < 0: 70% of picks have a > 0
    picks = agent.act(obs).squeeze(1)
    assert 0.6 < float((picks > 0).float().mean()) < 0.8


def test_chunking_diffusion_bc_learns_windows_and_executes_its_chunks(pendulum_data):
    torch.manual_seed(0)
    agent = make_agent("diffusion_bc", 3, 1, horizon=3, hidden=64, depth=2, ema_start=10)
    assert agent.sequence_spec == {"obs_horizon": 1, "action_horizon": 3}
    rb = pendulum_data.replay_buffer(128, sequences=agent.sequence_spec)
    batch = rb.sample()
    assert batch["action"].shape == (128, 3, 1) and batch["observation"].shape == (128, 1, 3)
    # all steps valid: the masked loss is the plain loss on the flattened chunk
    gen_state = torch.get_rng_state()
    full = agent.bc_loss(batch["observation"], batch["action"], torch.ones(128, 3, dtype=torch.bool))
    torch.set_rng_state(gen_state)
    plain = agent.bc_loss(batch["observation"], batch["action"])
    torch.testing.assert_close(full, plain)
    losses = [float(agent.update(rb.sample())["loss_bc"]) for _ in range(300)]
    assert sum(losses[-30:]) < 0.6 * sum(losses[:30])
    # acting: one action per call, a new chunk every 3 calls (and after reset)
    calls = []
    agent.sample_actions = (lambda f: (lambda obs, **kw: calls.append(1) or f(obs, **kw)))(agent.sample_actions)
    obs = torch.randn(4, 3)
    acts = [agent.act(obs) for _ in range(7)]
    assert all(a.shape == (4, 1) for a in acts) and len(calls) == 3
    agent.reset()
    agent.act(obs)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="horizon=2 is for diffusion_bc only"):
        make_agent("diffusion_ql", 3, 1, horizon=2)


def test_a_run_dir_from_before_a_setting_existed_still_resumes(pendulum_data, tmp_path):
    import json

    cfg = TrainConfig(steps=20, eval_every=20, eval_episodes=1, log_every=10)
    train_offline(make_agent("diffusion_bc", 3, 1, hidden=16, depth=1), pendulum_data, cfg, run_dir=tmp_path,
                  progress=False)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["agent_config"]["horizon"]  # written by an older version
    (tmp_path / "config.json").write_text(json.dumps(conf))
    out = train_offline(make_agent("diffusion_bc", 3, 1, hidden=16, depth=1), pendulum_data,
                        TrainConfig(steps=40, eval_every=20, eval_episodes=1, log_every=10), run_dir=tmp_path,
                        progress=False)
    assert out["steps"] == 40
    with pytest.raises(ValueError, match="different configuration"):  # a changed setting is still refused
        train_offline(make_agent("diffusion_bc", 3, 1, hidden=16, depth=1, horizon=2), pendulum_data,
                      TrainConfig(steps=60, eval_every=20, eval_episodes=1, log_every=10), run_dir=tmp_path,
                      progress=False)


def test_acting_only_settings_may_change_when_a_run_resumes(pendulum_data, tmp_path):
    """IDQL's candidates and selection never touch an update: a run resumes under new ones (and
    records them); a training setting still refuses."""
    import json

    small = dict(hidden=16, depth=1, critic_hidden=16, time_dim=4)
    cfg = TrainConfig(steps=10, eval_every=10, eval_episodes=1, log_every=10)
    train_offline(make_agent("idql", 3, 1, selection="expectile", **small), pendulum_data, cfg, run_dir=tmp_path,
                  progress=False)
    out = train_offline(make_agent("idql", 3, 1, selection="argmax", candidates=8, **small), pendulum_data,
                        dataclasses.replace(cfg, steps=20), run_dir=tmp_path, progress=False)
    assert out["steps"] == 20
    conf = json.loads((tmp_path / "config.json").read_text())["agent_config"]
    assert conf["selection"] == "argmax" and conf["candidates"] == 8
    with pytest.raises(ValueError, match="different configuration"):
        train_offline(make_agent("idql", 3, 1, expectile=0.9, **small), pendulum_data,
                      dataclasses.replace(cfg, steps=30), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown selection 'magic'"):
        make_agent("idql", 3, 1, selection="magic")


def test_temperature_zero_acts_by_the_noise_free_path():
    torch.manual_seed(0)
    obs = torch.randn(6, 3)
    for name in ("diffusion_bc", "idql", "consistency_bc"):
        sampler = {} if name == "consistency_bc" else {"sampler": "ddim"}
        cold = make_agent(name, 3, 2, hidden=16, depth=1, temperature=0.0, **sampler)
        torch.testing.assert_close(cold.act(obs), cold.act(obs))  # IDQL: equal candidates, equal picks
        warm = make_agent(name, 3, 2, hidden=16, depth=1, **sampler)
        assert not torch.equal(warm.act(obs), warm.act(obs))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        make_agent("diffusion_bc", 3, 2, temperature=-0.5)

"""benchmarks/idql_critic_budget.py: a finished IDQL run's critic trained on alone, its actor fixed."""
import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def idql_run(pendulum_data, tmp_path_factory):
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline

    run = tmp_path_factory.mktemp("idql") / "seed0"
    agent = make_agent("idql", pendulum_data.obs_dim, pendulum_data.act_dim, candidates=4, hidden=32)
    train_offline(agent, pendulum_data, TrainConfig(steps=20, batch_size=32, eval_every=20, eval_episodes=1),
                  run_dir=run, progress=False)
    return run


def test_the_critic_trains_on_from_the_run_and_the_actor_stays_as_trained(idql_run, pendulum_data, tmp_path,
                                                                           load_benchmark):
    from diffpolicy.agents import load_agent
    from diffpolicy.agents.trainer import TrainConfig, evaluate_agent
    from diffpolicy.checkpoint import load_checkpoint

    bench = load_benchmark("idql_critic_budget")
    source = (idql_run / "checkpoint.safetensors").read_bytes()
    work, out = tmp_path / "work", tmp_path / "out" / "budget"
    argv = ["--run", str(idql_run), "--work", str(work), "--critic-steps", "40", "--eval-every", "10",
            "--episodes", "2", "--out", str(out), "--no-progress"]
    rep = bench.main(argv)
    hist = rep["runs"][0]["history"]
    assert [h["critic_steps"] for h in hist] == [20, 30, 40] and rep["runs"][0]["start_step"] == 20

    trained = load_agent(idql_run)  # the first point is the run as trained, scored as the offline table scores it
    torch.manual_seed(0)
    r = evaluate_agent(trained, pendulum_data, "Pendulum-v1", episodes=2, seed=TrainConfig.eval_seed)
    assert hist[0]["score_mean"] == pytest.approx(r.score_mean, abs=1e-9)

    after = load_checkpoint(work)["agent"]
    before = trained.state_dict()
    actor = [k for k in before if k.startswith("actor.")]
    critic = [k for k in before if k.startswith("critic_loss.") and "qvalue_network_params" in k]
    assert actor and critic
    assert all(torch.equal(after[k], before[k]) for k in actor)
    assert any(not torch.equal(after[k], before[k]) for k in critic)
    assert (idql_run / "checkpoint.safetensors").read_bytes() == source  # the run itself is only read

    rep = bench.main(argv[:5] + ["50"] + argv[6:])  # a longer budget resumes from the work checkpoint
    assert [h["critic_steps"] for h in rep["runs"][0]["history"]] == [20, 30, 40, 50]
    assert rep["runs"][0]["history"][:3] == hist
    rows = (work / "train.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "loss_value", "loss_qvalue"]
    assert json.loads(out.with_suffix(".json").read_text())["runs"][0]["critic_steps"] == 50
    assert "| seed 0 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").exists()
    spread = rep["runs"][0]["spread"]
    assert set(spread) == {"as_trained", "final"}
    for sp in spread.values():
        assert sp["candidates"] == 4 and sp["q_std_across_candidates"] > 0 and sp["argmax_minus_mean"] > 0
        assert math.isfinite(sp["argmax_minus_v"]) and math.isfinite(sp["q_std_across_states"])
    # the trained run's own loss_qvalue, and the work directory's last one
    head, *_, last = (idql_run / "train.csv").read_text().splitlines()
    assert spread["as_trained"]["loss_qvalue"] == pytest.approx(float(last.split(",")[head.split(",").index(
        "loss_qvalue")]))
    assert spread["final"]["loss_qvalue"] == pytest.approx(float(rows[-1].split(",")[2]))
    assert spread["final"]["td_rms_per_q_net"] == pytest.approx(math.sqrt(spread["final"]["loss_qvalue"] / 2))
    assert "| argmax - mean |" in out.with_suffix(".md").read_text()


def test_candidate_spread_of_one_candidate_is_zero(idql_run, pendulum_data, load_benchmark):
    import dataclasses

    from diffpolicy.agents import load_agent

    bench = load_benchmark("idql_critic_budget")
    agent = load_agent(idql_run)
    sp = bench.candidate_spread(agent, pendulum_data, states=16, seed=3)
    assert sp["states"] == 16 and sp["q_std_across_states"] > 0 and sp["argmax_minus_mean"] > 0
    assert sp == bench.candidate_spread(agent, pendulum_data, states=16, seed=3)  # seeded: the same draw
    agent.config = dataclasses.replace(agent.config, candidates=1)  # one candidate: nothing to choose between
    one = bench.candidate_spread(agent, pendulum_data, states=16, seed=3)
    assert one["argmax_minus_mean"] == 0.0 and one["q_std_across_candidates"] == 0.0


def test_a_run_that_is_not_idql_or_a_budget_below_the_runs_own_is_refused(idql_run, pendulum_data, tmp_path,
                                                                          load_benchmark):
    from diffpolicy.agents import make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline

    bench = load_benchmark("idql_critic_budget")
    with pytest.raises(ValueError, match="below the 20 steps"):
        bench.critic_budget(idql_run, tmp_path / "w1", 10, 5, 1, progress=False)
    bc = tmp_path / "bc"
    train_offline(make_agent("gaussian_bc", pendulum_data.obs_dim, pendulum_data.act_dim), pendulum_data,
                  TrainConfig(steps=2, batch_size=8), run_dir=bc, progress=False, evaluate=False)
    with pytest.raises(ValueError, match="'gaussian_bc' run"):
        bench.critic_budget(bc, tmp_path / "w2", 10, 5, 1, progress=False)
    with pytest.raises(SystemExit):
        bench.main(["--run", str(idql_run), str(bc), "--work", str(tmp_path / "w3")])


def test_a_fresh_critic_at_another_expectile_trains_from_zero_beside_the_runs_actor(idql_run, tmp_path,
                                                                                     load_benchmark):
    from diffpolicy.agents import load_agent
    from diffpolicy.checkpoint import load_checkpoint

    bench = load_benchmark("idql_critic_budget")
    trained = load_agent(idql_run)
    fresh = bench.with_fresh_critic(trained, 0.9)
    assert fresh.config.expectile == 0.9 and fresh.critic_loss.expectile == 0.9
    assert fresh.num_updates == trained.num_updates == 20  # the behaviour model's count (its EMA schedule) is kept
    assert trained.config.expectile == 0.7  # the run's own agent is untouched
    a, b = trained.state_dict(), fresh.state_dict()
    kept = [k for k in a if k.startswith(("actor.", "ema."))]
    new = [k for k in a if k.startswith("critic_loss.") and k.endswith("weight")]  # V, Q and target Q nets
    assert kept and new and all(torch.equal(a[k], b[k]) for k in kept)
    assert all(not torch.equal(a[k], b[k]) for k in new), "the critic must be a new one, not the run's"
    sa, sb = trained.optimizers()["actor"].state, fresh.optimizers()["actor"].state  # the actor's Adam: copied
    assert sa and len(sa) == len(sb)
    for pa, pb in zip(sa.values(), sb.values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and pa["exp_avg"].data_ptr() != pb["exp_avg"].data_ptr()
    assert not fresh.optimizers()["critic"].state and not fresh.optimizers()["value"].state

    work = tmp_path / "work"
    rep = bench.critic_budget(idql_run, work, 20, 10, 1, progress=False, expectile=0.9)
    assert [h["critic_steps"] for h in rep["history"]] == [0, 10, 20] and rep["start_step"] == 0
    assert rep["fresh_critic_expectile"] == 0.9 and rep["source_steps"] == 20
    before, after = trained.state_dict(), load_checkpoint(work)["agent"]
    actor = [k for k in before if k.startswith("actor.")]
    critic = [k for k in before if k.startswith("critic_loss.") and "qvalue_network_params" in k]
    assert actor and critic
    assert all(torch.equal(after[k], before[k]) for k in actor)
    assert all(not torch.equal(after[k], before[k]) for k in critic)  # not the run's critic: a new one

    with pytest.raises(ValueError, match="fresh_critic_expectile"):  # a work directory answers one question
        bench.critic_budget(idql_run, work, 30, 10, 1, progress=False)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\)"):
        bench.critic_budget(idql_run, tmp_path / "w2", 30, 10, 1, progress=False, expectile=1.5)
    bench.write_outputs({"runs": [rep], "reference": None}, tmp_path / "out")
    assert "| seed 0, fresh critic at expectile 0.9 |" in (tmp_path / "out.md").read_text()

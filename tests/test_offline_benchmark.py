"""The offline benchmark's table is assembled from per-run result files (resumable sweeps)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("offline_bench", Path(__file__).parents[1] / "benchmarks" / "offline.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _result(root, q, agent, seed, score, latency, train_seconds=3.0):
    p = root / q / agent / f"seed{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    hist = [{"step": 5, "score_mean": score / 2}, {"step": 10, "score_mean": score}]
    p.write_text(json.dumps({"seed": seed, "score": score, "train_seconds": train_seconds, "latency_ms": latency,
                             "steps": 10, "history": hist}))


def test_assemble_reads_whatever_runs_exist_and_writes_the_table(tmp_path):
    root = tmp_path / "runs"
    _result(root, "medium", "diffusion_bc", 0, 40.0, 2.0)
    _result(root, "medium", "diffusion_bc", 1, 60.0, 2.0)
    _result(root, "medium", "consistency_bc", 0, 45.0, 0.5)
    rep = bench.assemble(root, "Hopper-v5", ["medium", "medium-replay"], ["diffusion_bc", "consistency_bc", "iql"])
    r = rep["results"]["medium"]
    assert set(rep["results"]) == {"medium"} and set(r) == {"diffusion_bc", "consistency_bc"}
    assert r["diffusion_bc"]["score_mean"] == 50.0 and r["diffusion_bc"]["score_std"] == 10.0
    assert r["diffusion_bc"]["seeds"] == [0, 1]
    assert rep["curves"]["medium"]["diffusion_bc"] == [[5, 10], [25.0, 50.0]]
    bench.write_outputs({**rep, "budget": "test budget"}, tmp_path / "out" / "offline")
    md = (tmp_path / "out" / "offline.md").read_text()
    assert "| diffusion_bc | 50.0 ± 10.0 (2) |" in md and "test budget" in md
    assert "| consistency_bc | 45.0 (1) |" in md  # one seed: its spread is unknown, not zero
    # timings are per agent over all its runs, not whichever dataset comes first
    _result(root, "medium-replay", "consistency_bc", 0, 20.0, 0.7, train_seconds=9.0)
    _result(root, "medium-replay", "consistency_bc", 1, 22.0, 0.7, train_seconds=9.0)
    rep = bench.assemble(root, "Hopper-v5", ["medium-replay", "medium"], ["consistency_bc"])
    bench.write_outputs(rep, tmp_path / "out" / "both")
    row = next(line for line in (tmp_path / "out" / "both.md").read_text().splitlines() if "consistency_bc" in line)
    assert row.endswith("| 7 | 0.63 |"), row  # (9 + 9 + 3) / 3 s and (0.7 + 0.7 + 0.5) / 3 ms
    assert json.loads((tmp_path / "out" / "offline.json").read_text())["results"]["medium"]["consistency_bc"]
    assert (tmp_path / "out" / "offline.png").exists()


def test_a_finished_run_is_scored_on_its_final_checkpoint_and_rescored_when_acting_defaults_change(
        pendulum_data, tmp_path, monkeypatch):
    """The table's score is the final checkpoint on ``final_episodes`` episodes; IDQL's selection
    rule only shapes acting, so a run finished under an old rule is evaluated again, not trained."""
    import argparse

    args = argparse.Namespace(steps=10, batch=32, eval_every=10, eval_episodes=1, final_episodes=3, quick=False,
                              no_progress=True, compile="")
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = bench.run_one("Pendulum-v1", "q", pendulum_data, "idql", 0, args, runs, results)
    acting = {"candidates": 64, "selection": "argmax", "sampler": "ddpm", "temperature": 1.0}
    assert first["final_eval"] == {"episodes": 3, "acting": acting, "trained_with": acting}
    assert first["curve_score"] == first["history"][-1]["score_mean"] and math.isfinite(first["score"])
    with monkeypatch.context() as m:  # done once: a second call neither trains nor evaluates
        m.setattr(bench, "final_evaluation", lambda *a: pytest.fail("evaluated again"))
        m.setattr("diffpolicy.agents.trainer.train_offline", lambda *a, **k: pytest.fail("trained again"))
        assert bench.run_one("Pendulum-v1", "q", pendulum_data, "idql", 0, args, runs, results) == first
    # a run written before the default changed: trained (and scored) with expectile selection
    conf_path, res_path = runs / "q" / "idql" / "seed0" / "config.json", results / "q" / "idql" / "seed0.json"
    conf = json.loads(conf_path.read_text())
    conf["agent_config"]["selection"] = "expectile"
    conf_path.write_text(json.dumps(conf))
    old = {k: v for k, v in first.items() if k not in ("final_eval", "curve_score")}
    res_path.write_text(json.dumps({**old, "score": -1.0}))
    again = bench.run_one("Pendulum-v1", "q", pendulum_data, "idql", 0, args, runs, results)
    assert again["final_eval"]["trained_with"] == {**acting, "selection": "expectile"}
    assert again["final_eval"]["acting"] == acting and again["curve_score"] == first["curve_score"]
    assert again["score"] == first["score"]  # same weights, same episodes, same policy noise
    assert again["history"] == first["history"] and again["steps"] == 10  # the curve measured in training


def test_compile_flag_reaches_the_training_loop(pendulum_data, tmp_path, monkeypatch):
    """``--compile`` only changes speed: it is handed to ``TrainConfig`` and noted in the result."""
    seen = {}

    def fake_train(agent, data, cfg, **kw):
        seen["compile"] = cfg.compile
        return {"steps": cfg.steps, "final": {"score_mean": 1.0, "return_mean": 1.0}, "train_seconds": 0.1,
                "history": []}

    monkeypatch.setattr("diffpolicy.agents.trainer.train_offline", fake_train)
    monkeypatch.setattr(bench, "final_evaluation", lambda res, *a: res)
    import argparse

    args = argparse.Namespace(
        steps=10, batch=32, eval_every=10, eval_episodes=1, final_episodes=2, quick=False, no_progress=True,
        compile="inductor")
    res = bench.run_one("Pendulum-v1", "q", pendulum_data, "gaussian_bc", 0, args, tmp_path / "r", tmp_path / "s")
    assert seen == {"compile": "inductor"} and res["compile"] == "inductor"


def test_an_acting_variant_row_is_scored_from_its_base_agents_runs(pendulum_data, tmp_path):
    import argparse

    args = argparse.Namespace(steps=10, batch=32, eval_every=10, eval_episodes=1, final_episodes=2, quick=False,
                              no_progress=True, compile="")
    runs, results = tmp_path / "runs", tmp_path / "results"
    args.rescore = True  # nothing trained yet: a rescoring pass skips the row
    assert bench.run_one("Pendulum-v1", "q", pendulum_data, "diffusion_bc_t0", 0, args, runs, results) is None
    args.rescore = False
    row = bench.run_one("Pendulum-v1", "q", pendulum_data, "diffusion_bc_t0", 0, args, runs, results)
    base = json.loads((results / "q" / "diffusion_bc" / "seed0.json").read_text())  # trained on the way
    assert row["variant_of"] == "diffusion_bc" and row["history"] == [] and not (runs / "q" / "diffusion_bc_t0").exists()
    assert row["final_eval"]["acting"] == {"sampler": "ddim", "temperature": 0.0}
    assert base["final_eval"]["acting"] == {"sampler": "ddpm", "temperature": 1.0}
    assert row["steps"] == base["steps"] == 10 and math.isfinite(row["score"]) and row["curve_score"] is None
    rep = bench.assemble(results, "Pendulum-v1", ["q"], ["diffusion_bc", "diffusion_bc_t0"])
    assert set(rep["results"]["q"]) == {"diffusion_bc", "diffusion_bc_t0"} and set(rep["curves"]["q"]) == {"diffusion_bc"}


def test_latency_table_covers_variants_and_the_one_step_consistency_sampler():
    lat = bench.latency_table(3, 1, ["diffusion_bc", "diffusion_bc_t0", "consistency_bc"], 1000, rounds=2)
    assert set(lat) == {"diffusion_bc", "diffusion_bc_t0", "consistency_bc", "consistency_bc_1step"}
    assert all(v > 0 for v in lat.values())
    assert lat["consistency_bc_1step"] < lat["diffusion_bc"]  # 1 network call against 5


def test_a_table_rewritten_without_measuring_keeps_the_measured_figures(tmp_path):
    out = tmp_path / "offline"
    assert bench.measured_before(out, bench.MEASURED) == {}
    lat = {"diffusion_bc": 0.6, "consistency_bc": 0.3, "consistency_bc_1step": 0.15}
    out.with_suffix(".json").write_text(json.dumps({"results": {}, "throughput_ratio_vs_bare": 0.9,
                                                    "throughput": {"ratio": 0.9, "ours_steps_per_s": 9.0, "bare_steps_per_s": 10.0},
                                                    "latency_ms": lat, "other": 1}))
    kept = bench.measured_before(out, bench.MEASURED)
    assert set(kept) == {"throughput_ratio_vs_bare", "throughput", "latency_ms"} and kept["latency_ms"] == lat
    rep = bench.with_latency_ratios({"env": "Hopper-v5", "results": {}, "curves": {}, "budget": "b", **kept})
    assert rep["latency_ratio_consistency_vs_diffusion"] == pytest.approx(0.5)
    bench.write_outputs(rep, out)
    assert bench.measured_before(out, bench.MEASURED) == kept  # the per-run rewrite during a sweep loses nothing


def test_a_sweep_can_write_its_runs_into_another_store_and_leave_the_timings_alone(tmp_path):
    store, out = tmp_path / "store", tmp_path / "table" / "offline"
    _result(store / "Hopper-v5", "medium", "diffusion_bc", 0, 40.0, 2.0)
    out.parent.mkdir()
    lat = {"diffusion_bc": 0.6, "consistency_bc": 0.3, "consistency_bc_1step": 0.15}
    out.with_suffix(".json").write_text(json.dumps({"results": {}, "latency_ms": lat}))
    rep = bench.main(["--assemble", "--measure", "--no-throughput", "--no-latency", "--steps", "10", "--out", str(out),
                      "--results", str(store)])
    assert rep["results"]["medium"]["diffusion_bc"]["score_mean"] == 40.0
    assert rep["latency_ms"] == lat and json.loads(out.with_suffix(".json").read_text())["latency_ms"] == lat
    assert not (tmp_path / "table" / "offline_runs").exists()


def test_a_distilled_run_trains_its_teacher_again_when_only_the_teachers_result_is_left(pendulum_data, tmp_path):
    """A sweep continued on another machine has the teacher's result file but not its run directory."""
    import argparse
    import shutil

    args = argparse.Namespace(steps=10, batch=32, eval_every=10, eval_episodes=1, final_episodes=1, quick=False,
                              no_progress=True, compile="")
    runs, results = tmp_path / "runs", tmp_path / "results"
    teacher = bench.run_one("Pendulum-v1", "q", pendulum_data, "diffusion_bc", 0, args, runs, results)
    shutil.rmtree(runs / "q" / "diffusion_bc")
    row = bench.run_one("Pendulum-v1", "q", pendulum_data, "consistency_bc_cd", 0, args, runs, results)
    assert math.isfinite(row["score"]) and (runs / "q" / "diffusion_bc" / "seed0" / "checkpoint.safetensors").is_file()
    assert json.loads((results / "q" / "diffusion_bc" / "seed0.json").read_text()) == teacher  # its result untouched


def test_a_small_sweep_trains_scores_and_tabulates_every_requested_run(pendulum_data, tmp_path):
    """The whole path a full run takes (dataset made or reused, training, final scoring, the table and
    the throughput ratio), at a toy budget on the session's Pendulum data."""
    out = tmp_path / "table" / "offline"
    argv = ["--env", "Pendulum-v1", "--qualities", "medium", "--agents", "gaussian_bc", "diffusion_bc", "diffusion_bc_t0",
            "--seeds", "0", "1", "--steps", "20", "--batch", "32", "--eval-every", "10", "--eval-episodes", "1",
            "--final-episodes", "2", "--transitions", "2000", "--behaviour-steps", "1000", "--no-latency",
            "--no-progress", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    rep = bench.main(argv)
    cells = rep["results"]["medium"]
    assert set(cells) == {"gaussian_bc", "diffusion_bc", "diffusion_bc_t0"}
    assert all(c["seeds"] == [0, 1] and math.isfinite(c["score_mean"]) and c["score_std"] >= 0 for c in cells.values())
    runs = [json.loads((tmp_path / "table" / "offline_runs" / "Pendulum-v1" / "medium" / a / f"seed{s}.json").read_text())
            for a in ("gaussian_bc", "diffusion_bc") for s in (0, 1)]
    assert all(r["steps"] == 20 and [h["step"] for h in r["history"]] == [10, 20] for r in runs)
    assert runs[0]["score"] != runs[1]["score"] or runs[0]["history"] != runs[1]["history"]  # two seeds, two runs
    assert 0 < rep["throughput_ratio_vs_bare"] < 2
    assert "| diffusion_bc |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 5_000
    assert bench.main([*argv, "--no-throughput"])["results"] == rep["results"]  # nothing trains again: all finished


def test_a_sweep_refuses_a_dataset_remade_differently_before_training_anything(pendulum_data, tmp_path):
    """A dataset rebuilt on another machine can differ (its SB3 behaviour run depends on the BLAS
    kernels), so runs on it would not be comparable with the stored ones: the reference returns
    tell the two apart, recorded in new result files and solved from older files' (score, return)."""
    import argparse
    import dataclasses

    args = argparse.Namespace(steps=10, batch=32, eval_every=5, eval_episodes=1, final_episodes=1, quick=False,
                              no_progress=True, compile="")
    store = tmp_path / "store"
    res = bench.run_one("Pendulum-v1", "medium", pendulum_data, "gaussian_bc", 0, args, tmp_path / "runs",
                        store / "Pendulum-v1")
    refs = (pendulum_data.ref_min_score, pendulum_data.ref_max_score)
    assert res["ref_scores"] == list(refs)
    older = {k: v for k, v in res.items() if k != "ref_scores"}
    assert bench.data_references(older) == pytest.approx(refs, rel=1e-9)
    assert bench.data_references({**older, "history": []}) is None  # one pair: an acting variant's file
    bench.check_same_data(store / "Pendulum-v1", "medium", pendulum_data)  # the same data: silent
    remade = dataclasses.replace(pendulum_data, ref_max_score=refs[1] + 50.0)
    with pytest.raises(SystemExit, match=r"expert .*differ.*--results"):
        bench.check_same_data(store / "Pendulum-v1", "medium", remade)

    # the sweep itself stops before any training when the store's runs came from other data
    p = store / "Pendulum-v1" / "medium" / "gaussian_bc" / "seed0.json"
    p.write_text(json.dumps({**res, "ref_scores": [refs[0], refs[1] + 50.0]}))
    runs = tmp_path / "runs2"
    with pytest.raises(SystemExit, match="not be comparable"):
        bench.main(["--env", "Pendulum-v1", "--qualities", "medium", "--agents", "diffusion_bc", "--seeds", "0",
                    "--steps", "10", "--transitions", "2000", "--behaviour-steps", "1000", "--no-latency",
                    "--no-throughput", "--no-progress", "--runs", str(runs), "--results", str(store),
                    "--out", str(tmp_path / "table" / "offline")])
    assert not runs.exists() and json.loads(p.read_text())["ref_scores"][1] == refs[1] + 50.0  # nothing touched

"""benchmarks/image_reward.py end to end on tiny budgets: the issue's JSON, differentiable
methods skipped on non-differentiable rewards, KL copies, and finished runs reused."""
import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("image_reward")


def test_tiny_run_writes_the_issue_json_and_resumes(bench, tmp_path):
    args = ["--quick", "--rewards", "digit0", "compressibility", "--methods", "ddpo_is", "draft", "--kl-weights", "1",
            "--samples", "32", "--batch-size", "16", "--sampling-steps", "3", "--eval-every", "1",
            "--pretrain-steps", "20", "--pretrained-run", str(tmp_path / "pre"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "res" / "image_reward"), "--no-progress"]
    bench.main(args)
    saved = json.loads((tmp_path / "res" / "image_reward.json").read_text())
    assert set(saved["results"]["digit0"]) == {"ddpo_is", "draft", "ddpo_is+kl1", "draft+kl1"}
    assert set(saved["results"]["compressibility"]) == {"ddpo_is", "ddpo_is+kl1"}  # DRaFT needs gradients
    for r in saved["results"]["digit0"].values():  # unconditional samples steered toward zeros
        assert 0 <= r["target_fraction_before"] <= 1 and 0 <= r["target_fraction_after"] <= 1
        assert r["reward_before"] < -1  # a 0 is one digit in ten: far from the reward's ceiling of 0
    assert "target_fraction_before" not in saved["results"]["compressibility"]["ddpo_is"]
    for runs in saved["results"].values():
        for r in runs.values():
            assert {"reward_before", "reward_after", "fid_before", "fid_after", "samples", "seconds"} <= set(r)
            assert r["samples"] == 32 and r["fid_before"] > 0 and r["curve"][0]["samples"] == 0
            assert 0 <= r["precision_before"] <= 1 and 0 <= r["precision_after"] <= 1
    assert "draft+kl1_fid_drift" in saved["targets"]["digit0"]
    best = saved["targets"]["digit0"]["kl_best"]
    assert best["method"] in ("ddpo_is+kl1", "draft+kl1") and best["met"] == (best["fid_drift"] <= 1.5
                                                                             and best["margin_in_std"] >= 2)
    files = sorted((tmp_path / "res" / "image_reward_runs").rglob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    bench.main(args)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 6
    # a result written before precision was recorded gets it from its run's final checkpoint
    old = json.loads(files[0].read_text())
    for k in ("precision_before", "precision_after"):
        old.pop(k)
    files[0].write_text(json.dumps(old))
    bench.main(args)
    again = json.loads(files[0].read_text())
    first = json.loads(json.dumps(saved["results"]))[again["reward"]][again["method"]]
    assert again["precision_after"] == first["precision_after"]  # the final weights, not a retrained model
    assert again["precision_before"] == first["precision_before"]


def test_run_names_carry_method_batch_and_kl(bench):
    assert bench.base_method("draft@b8+kl1") == "draft" and bench.base_method("ddpo_is+kl0.1") == "ddpo_is"
    assert bench.batch_size("draft@b8+kl1", 32) == 8 and bench.batch_size("draft+kl1", 32) == 32
    assert bench.kl_weight("draft@b8+kl1") == 1.0 and bench.batch_variant("refl=4") == "refl@b4"
    with pytest.raises(SystemExit, match="METHOD=BATCH"):
        bench.batch_variant("draft")


def test_batch_variant_runs_its_own_batch_on_the_same_sample_budget(bench, tmp_path):
    args = ["--quick", "--rewards", "brightness", "--methods", "ddpo_sf", "draft", "--batch-variants", "draft=8",
            "--kl-weights", "--samples", "32", "--batch-size", "16", "--sampling-steps", "3", "--eval-every", "1",
            "--pretrain-steps", "20", "--pretrained-run", str(tmp_path / "pre"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "res" / "image_reward"), "--no-progress"]
    saved = bench.main(args)
    runs = saved["results"]["brightness"]
    assert set(runs) == {"ddpo_sf", "draft", "draft@b8"}
    assert runs["draft@b8"]["batch_size"] == 8 and runs["draft@b8"]["iterations"] == 4
    assert runs["draft@b8"]["samples"] == runs["draft"]["samples"] == 32
    # curve points at the same sample counts whatever the batch
    assert [c["samples"] for c in runs["draft@b8"]["curve"]] == [c["samples"] for c in runs["ddpo_sf"]["curve"]]
    t = saved["targets"]["brightness"]
    assert t["ddpo_final"]["method"] == "ddpo_sf"
    for m in ("draft", "draft@b8"):
        hit = next((c["samples"] for c in runs[m]["curve"] if c["reward"] >= t["ddpo_final"]["reward"]), None)
        assert t[f"{m}_samples_to_ddpo_final_fraction"] == (None if hit is None else hit / 32)
    start, final = runs["ddpo_sf"]["curve"][0]["reward"], runs["ddpo_sf"]["curve"][-1]["reward"]
    assert t["samples_to_levels"]["levels"] == pytest.approx([start + f * (final - start) for f in (0.25, 0.5, 0.75)])
    assert t["samples_to_levels"]["ddpo_sf"][-1] in (16, 32)  # its own curve reaches 3/4 of its final gain
    assert bench.samples_to([{"samples": 0, "reward": 0.0}, {"samples": 8, "reward": 2.0}], 1.0) == 8
    assert bench.samples_to([{"samples": 0, "reward": 0.0}], 1.0) is None


def test_reward_frontier_rows_on_a_tiny_model(load_benchmark, tmp_path):
    frontier = load_benchmark("reward_frontier")
    out = tmp_path / "frontier_b0.01"  # a dotted stem keeps its tail: frontier_b0.01.json, not frontier_b0.json
    report = frontier.main(["--betas", "1000", "0.01", "--pool", "64", "--sampling-steps", "3", "--pretrain-steps", "20",
                            "--base-channels", "8", "--pretrained-run", str(tmp_path / "pre"), "--out", str(out)])
    rep = report["rewards"]["brightness"]
    assert sorted(p.name for p in tmp_path.glob("frontier*")) == ["frontier_b0.01.json", "frontier_b0.01.md"]
    assert json.loads((tmp_path / "frontier_b0.01.json").read_text()) == report
    assert "| gamma | 0.8 |" in (tmp_path / "frontier_b0.01.md").read_text()
    rows = {(r["how"], r["value"]): r for r in rep["rows"]}
    flat = rows[("kl_optimum", 1000.0)]  # beta -> infinity: the pre-trained distribution, every sample equally likely
    assert flat["ess"] == pytest.approx(64, rel=1e-3) and abs(flat["margin_in_std"]) < 1.0
    assert rows[("kl_optimum", 0.01)]["margin_in_std"] > flat["margin_in_std"]  # tilted toward brighter samples
    gains = [rows[("gamma", g)]["margin_in_std"] for g in (0.9, 0.8, 0.7, 0.6)]
    assert 0 < gains[0] < gains[1] < gains[2] < gains[3]  # a smaller exponent brightens more
    assert all(r["fid_drift"] > 0 and 0 <= r["precision"] <= 1 for r in rep["rows"])

"""benchmarks/image_reward.py end to end on tiny budgets: the issue's JSON, differentiable
methods skipped on non-differentiable rewards, KL copies, and finished runs reused."""
import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("image_reward")


def test_tiny_run_writes_the_issue_json_and_resumes(bench, tmp_path):
    args = ["--quick", "--rewards", "brightness", "compressibility", "--methods", "ddpo_is", "draft",
            "--samples", "32", "--batch-size", "16", "--sampling-steps", "3", "--eval-every", "1",
            "--pretrain-steps", "20", "--pretrained-run", str(tmp_path / "pre"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "res" / "image_reward"), "--no-progress"]
    bench.main(args)
    saved = json.loads((tmp_path / "res" / "image_reward.json").read_text())
    assert set(saved["results"]["brightness"]) == {"ddpo_is", "draft", "ddpo_is+kl", "draft+kl"}
    assert set(saved["results"]["compressibility"]) == {"ddpo_is", "ddpo_is+kl"}  # DRaFT needs gradients
    for runs in saved["results"].values():
        for r in runs.values():
            assert {"reward_before", "reward_after", "fid_before", "fid_after", "samples", "seconds"} <= set(r)
            assert r["samples"] == 32 and r["fid_before"] > 0 and r["curve"][0]["samples"] == 0
    assert "draft+kl_fid_drift" in saved["targets"]["brightness"]
    files = sorted((tmp_path / "res" / "image_reward_runs").rglob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    bench.main(args)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 6

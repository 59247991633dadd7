"""benchmarks/chain_bandit.py --quick: every chain method improves the bandit policy, memory scales with K'."""
import json


def test_quick_chain_bandit_improves_every_method_and_writes_its_report(tmp_path, load_benchmark):
    bench = load_benchmark("chain_bandit")
    out = tmp_path / "cb.json"
    bench.main(["--quick", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"ddpo_sf", "ddpo_is", "drwr", "qsm"} and res["samples_per_method"] == 8 * 256
    for name, m in res["methods"].items():  # 8 iterations already move each one a good way towards the optimum 0
        assert m["reward_after"] > m["reward_before"] and m["gap_closed"] > 0.15, (name, m)
    # autograd keeps the tensors of the fine-tuned steps only: 10 of 20 steps hold 5x what 2 of 20 hold
    ratio = res["saved_bytes_train_last_10_of_20"] / res["saved_bytes_train_last_2_of_20"]
    assert 4.5 < ratio < 5.5
    assert res["rollout_ratio_vs_bare"] > 0
    assert "| ddpo_is |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

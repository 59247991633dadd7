"""The speed scripts run end to end on CPU and write what their docstrings promise (the figures
themselves come from the scripts, not from tests)."""
import copy
import json

import pytest


def test_train_step_benchmark_writes_ratios(load_benchmark, tmp_path):
    bench = load_benchmark("train_step")
    out = tmp_path / "ts.json"
    res = bench.main(["--json", str(out), "--rounds", "2", "--warmup", "1", "--variants", "fp32", "bf16",
                      "--jobs", "diffusion_bc", "image_ddpm_v"])
    assert json.loads(out.read_text()) == res
    for job in ("diffusion_bc", "image_ddpm_v"):
        ms = res["ms_per_step"][job]
        assert set(ms) == {"fp32", "bf16"} and all(v > 0 for v in ms.values())
        assert abs(res["ratio_vs_fp32"][job]["bf16"] - ms["bf16"] / ms["fp32"]) < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "| diffusion_bc |" in md and "bf16/fp32" in md


def test_train_step_nn_mish_variant_swaps_every_mish_and_keeps_outputs(load_benchmark):
    import torch

    from diffpolicy.agents import make_agent
    from diffpolicy.nets.activations import Mish

    bench = load_benchmark("train_step")
    agent = make_agent("diffusion_ql", 11, 3)
    swapped = bench.with_torch_mish(copy.deepcopy(agent))
    kinds = lambda m: {type(c) for c in m.modules()}  # noqa: E731
    assert Mish in kinds(agent) and Mish not in kinds(swapped) and torch.nn.Mish in kinds(swapped)
    obs, act = torch.randn(5, 11), torch.rand(5, 3) * 2 - 1
    for a, b in zip(agent.critic(obs, act), swapped.critic(obs, act)):
        torch.testing.assert_close(a, b)


def test_sampler_speed_benchmark_cpu(load_benchmark, tmp_path):
    bench = load_benchmark("sampler_speed")
    res = bench.main(["--json", str(tmp_path / "s.json"), "--repeats", "12"])
    assert res["device"] == "cpu" and "graphed" not in res["batch1_ms"]  # the script asserts ours == diffusers
    for name, t in res["targets"].items():  # each verdict is its own ratio against its goal
        assert t["value"] == res[name] and t["met"] == (t["value"] <= t["target"]), name
    assert res["batch1_ratio_vs_bare"] == pytest.approx(res["batch1_ms"]["ours"] / res["batch1_ms"]["bare"], rel=1e-2)

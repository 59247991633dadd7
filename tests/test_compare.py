"""compare_runs: seeds of one method grouped, mean ± population std of final and best scores."""
import json
import math
import warnings

import pytest

from diffpolicy.compare import compare_runs


def _run(path, agent, seed, steps, scores, returns=None, lr=1e-4):
    path.mkdir(parents=True)
    path.joinpath("config.json").write_text(json.dumps({"agent": agent, "dataset": "toy/medium-v0", "env_id": "Toy-v0",
                                                         "agent_config": {"lr": lr}, "train": {"seed": seed}}))
    returns = returns or [10 * s for s in scores]
    rows = ["step,return_mean,return_std,score_mean,score_std"]
    rows += [f"{st},{r},0,{'' if s is None else s},0" for st, s, r in zip(steps, scores, returns)]
    path.joinpath("eval.csv").write_text("\n".join(rows) + "\n")
    return path


def test_seeds_are_grouped_and_summarised_by_hand(tmp_path):
    steps = [0, 1000, 2000]
    dppo = [_run(tmp_path / f"dppo{k}", "dppo", k, steps, s)
            for k, s in enumerate([[30, 50, 40], [30, 60, 70], [30, 45, 55]])]
    bc = [_run(tmp_path / "bc0", "diffusion_bc", 0, steps, [10, 20, 25])]
    rep = compare_runs(dppo + bc, out=tmp_path / "cmp")
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"fine-tuned dppo", "diffusion_bc"} and rep["metric"] == "normalised score"
    ft = rows["fine-tuned dppo"]
    finals, bests = [40, 70, 55], [50, 70, 55]
    mean = sum(finals) / 3
    assert ft["final"] == pytest.approx(mean)
    assert ft["final_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in finals) / 3))  # population std
    assert ft["best"] == pytest.approx(sum(bests) / 3) and ft["runs"] == 3 and ft["online"]
    assert rows["diffusion_bc"]["final_std"] == 0.0 and not rows["diffusion_bc"]["online"]
    md = (tmp_path / "cmp.md").read_text()
    assert "| fine-tuned dppo | 55.0 ± 12.2 | 58.3 |" in md
    assert "| diffusion_bc | 25.0 | 25.0 |" in md  # one run: no spread to show, not a zero one
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_returns_are_compared_where_a_run_has_no_reference_scores(tmp_path):
    a = _run(tmp_path / "a", "diffusion_bc", 0, [0, 10], [None, None], returns=[1.0, 3.0])
    b = _run(tmp_path / "b", "diffusion_bc", 1, [0, 10], [5.0, 6.0], returns=[2.0, 5.0])
    rep = compare_runs([a, b], labels=["bc", "bc"])
    (row,) = rep["rows"]
    assert rep["metric"] == "return" and row["final"] == pytest.approx(4.0) and row["final_std"] == pytest.approx(1.0)


def test_runs_of_one_label_that_differ_in_settings_or_budget_are_flagged(tmp_path):
    a = _run(tmp_path / "a", "dppo", 0, [0, 10], [1.0, 2.0])
    b = _run(tmp_path / "b", "dppo", 1, [0, 10], [1.0, 3.0])
    c = _run(tmp_path / "c", "dppo", 2, [0, 10, 20], [1.0, 3.0, 4.0], lr=3e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_runs([a, b])  # seeds of one setting: no warning
    with pytest.warns(UserWarning, match=r"3 runs labelled 'fine-tuned dppo' differ in agent.lr, final step"):
        compare_runs([a, b, c])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(compare_runs([a, b, c], labels=["x", "x", "y"])["rows"]) == 2

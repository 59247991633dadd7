"""benchmarks/images.py end to end on tiny budgets: the JSON the issue specifies, per-run result
files that a second call reuses, and the targets computed from them."""
import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("images")


TINY = ["--quick", "--families", "ddpm_v", "rf", "--pretrain-steps", "40", "--student-steps", "4", "--samples", "60",
        "--max-nfe", "2", "--pairs", "32", "--pair-steps", "2", "--pd-start", "4", "--no-progress"]


def test_tiny_run_writes_the_issue_json_and_resumes(bench, tmp_path):
    args = TINY + ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res" / "images")]
    report = bench.main(args)
    saved = json.loads((tmp_path / "res" / "images.json").read_text())
    assert saved["floor_fid"] == pytest.approx(report["floor_fid"]) and saved["floor_fid"] > 0
    assert set(saved["teachers"]) == {"ddpm_v/ddim", "ddpm_v/dpmpp_2m", "rf/rf_euler"}
    assert saved["teachers"]["rf/rf_euler"]["nfe"] == [1, 2]
    assert set(saved["students"]) == set(bench.STUDENTS)
    for name, s in saved["students"].items():
        assert s["teacher"] == bench.STUDENTS[name] and len(s["fid"]) == len(s["nfe"]) >= 1
        assert all(f > 0 for f in s["fid"])
    assert saved["students"]["pd"]["nfe"] == [2, 1]  # its rounds 4 -> 2 -> 1
    t = saved["targets"]
    assert t["best_1_step_student"]["ratio"] == pytest.approx(t["best_1_step_student"]["fid"]
                                                             / t["best_1_step_student"]["teacher_best_fid"])
    for kind in ("md", "png"):
        assert (tmp_path / "res" / f"images.{kind}").stat().st_size > 0
    # a second call reuses every finished run: the result files are untouched
    files = sorted((tmp_path / "res" / "images_runs").rglob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    bench.main(args)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 2 + len(bench.STUDENTS)


def test_a_student_can_take_another_teacher(bench, tmp_path):
    args = TINY + ["--families", "rf", "--students", "pd", "--teacher", "pd=rf", "--runs", str(tmp_path / "runs"),
                   "--out", str(tmp_path / "res" / "images")]
    saved = bench.main(args)
    assert saved["students"]["pd_rf"]["teacher"] == "rf"  # its target ratio is taken against rf's best FID
    assert saved["students"]["pd_rf"]["student_steps_trained"] == 4
    assert saved["targets"]["best_1_step_student"]["teacher_best_fid"] == min(saved["teachers"]["rf/rf_euler"]["fid"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--teacher", "pd=nope"])

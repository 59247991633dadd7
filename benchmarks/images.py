"""Image diffusion on the digits: FID against NFE for every pre-trained family and sampler, and
for distilled students at 1, 2 and 4 steps beside their teachers.

What is measured (``python benchmarks/images.py``; ``--quick`` is a smoke run of a few minutes):

* **Teachers**: every family of :mod:`diffpolicy.images.pretrain` (DDPM eps / x0 / v, rectified
  flow, consistency training, TrigFlow), class-conditional, ``--pretrain-steps`` steps on the
  8x8 digits; each sampled with its samplers at the NFE grid (conditional, no CFG: one network
  evaluation per step).
* **Students** (``diffpolicy.distill``, trained with :func:`~diffpolicy.distill.train.train_student`):
  progressive distillation of the v-teacher from 32 steps down to 1 (``pd``), consistency
  distillation of the v-teacher (``cd``), reflow of the RF teacher (``reflow``) and InstaFlow's
  one-step student of that 2-RF (``instaflow``), and DMD's one-step generator from the v-teacher
  (``dmd``: distribution matching with an online fake score plus the regression loss), and
  adversarial diffusion distillation of the v-teacher into a 4-step student (``add``).
* **Metrics**: FID in the 64-d features of the digit classifier trained here, of ``--samples``
  generated images against the held-out digits; the floor is the same number of real train
  images against the held-out ones. Wall time to train and per sampling call.

Each teacher and student writes its own result file under ``results/images_runs/`` and resumes
from its run directory, so a stopped sweep continues; the table is assembled from whatever
exists (``--assemble``). Outputs: ``results/images.{json,md,png}`` and ``images_samples.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffpolicy.distill.students import STUDENT_SAMPLER  # how each student samples
from diffpolicy.plotting import png_figure, report_file

ROOT = Path(__file__).resolve().parent
NFES = [1, 2, 4, 8, 16, 32, 50]
TEACHER_SAMPLERS = {  # family -> [(sampler, nfe grid)], one network evaluation per step; the students' first
    "ddpm_v": [("ddim", NFES), ("dpmpp_2m", [4, 8, 16, 32])],
    "rf": [("rf_euler", NFES)],
    "ddpm_eps": [("ddim", NFES), ("dpmpp_2m", [4, 8, 16, 32])],
    "ddpm_x0": [("ddim", NFES)],
    "ct": [("consistency", [1, 2, 4])],
    "trigflow": [("ddim", NFES), ("trigflow", [1, 2])],
}
STUDENTS = {"pd": "ddpm_v", "cd": "ddpm_v", "reflow": "rf", "instaflow": "rf", "dmd": "ddpm_v", "add": "ddpm_v"}


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def evaluate(model, metrics, sampler: str, nfes, n: int, size: int, seed: int = 0) -> dict:
    """FID (and class accuracy) of ``n`` conditional samples at each NFE, with sampling times."""
    from diffpolicy.images import sample_images

    fid, acc, secs = [], [], []
    for nfe in nfes:
        t0 = time.perf_counter()
        x = sample_images(model, n, size, nfe, sampler, labels=_labels(n), generator=torch.Generator().manual_seed(seed))
        secs.append(time.perf_counter() - t0)
        m = metrics.evaluate(x, _labels(n))
        fid.append(m["fid"])
        acc.append(m["class_accuracy"])
    return {"sampler": sampler, "nfe": list(nfes), "fid": fid, "class_accuracy": acc, "sample_seconds": secs}


def teacher_cfg(family: str, args):
    from diffpolicy.images import ImagePretrainConfig

    return ImagePretrainConfig(family=family, size=args.size, steps=args.pretrain_steps, batch_size=args.batch_size,
                               base_channels=args.base_channels, lr=args.lr, seed=args.seed,
                               checkpoint_every=max(1, min(2000, args.pretrain_steps)))


def run_teacher(family: str, args, metrics, run_root: Path, result_root: Path) -> dict:
    """Pre-train ``family`` (resuming its run) and evaluate it with each of its samplers."""
    from diffpolicy.images import pretrain_images

    path = result_root / "teachers" / f"{family}.json"
    if path.exists() and (old := json.loads(path.read_text()))["steps"] >= args.pretrain_steps:
        return old
    out = pretrain_images(teacher_cfg(family, args), run_dir=run_root / "teachers" / family, progress=args.progress)
    train_seconds = out["seconds"]
    evals = {s: evaluate(out["ema"], metrics, s, _nfes(g, args), args.samples, args.size)
             for s, g in TEACHER_SAMPLERS[family]}
    result = {"family": family, "steps": out["steps"], "train_seconds": train_seconds, "samplers": evals}
    _write(path, result)
    return result


def _nfes(grid, args):
    return [n for n in grid if n <= args.max_nfe]


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def load_teacher(family: str, args, run_root: Path):
    from diffpolicy.images import pretrain_images

    return pretrain_images(teacher_cfg(family, args), run_dir=run_root / "teachers" / family, progress=False)["ema"]


def _data(args):
    from diffpolicy.images import load_digits

    return load_digits(args.size, "train")


def train_students(method: str, teacher, args, run_dir: Path) -> list[tuple[dict, object]]:
    """Distil ``method`` from ``teacher`` with the benchmark's settings (the library's ``distill_images``)."""
    from diffpolicy.distill.students import DistillConfig, distill_images

    cfg = DistillConfig(method=method, student_steps=args.student_steps, batch_size=args.batch_size,
                        lr=args.student_lr, pd_start=args.pd_start, cd_scales=args.cd_scales, pairs=args.pairs,
                        pair_steps=args.pair_steps, dmd_fake_updates=args.dmd_fake_updates,
                        dmd_regression=args.dmd_regression, seed=args.seed)
    reflow_name = student_name("reflow", args.teacher_of[method]) if method == "instaflow" else "reflow"
    return distill_images(method, teacher, _data(args), cfg, run_dir=run_dir, progress=args.progress,
                          reflow_dir=run_dir.parent / reflow_name)  # InstaFlow's reflow: its own teacher's


def student_name(method: str, family: str) -> str:
    """A student's name in the results: the method, or ``<method>_<teacher>`` for a non-default teacher."""
    return method if family == STUDENTS[method] else f"{method}_{family}"


def run_student(method: str, args, metrics, run_root: Path, result_root: Path) -> dict:
    name = student_name(method, args.teacher_of[method])
    path = result_root / "students" / f"{name}.json"
    if path.exists() and (old := json.loads(path.read_text()))["student_steps_trained"] >= args.student_steps:
        return old
    teacher = load_teacher(args.teacher_of[method], args, run_root)
    for p in teacher.parameters():
        p.requires_grad_(False)
    trained = train_students(method, teacher, args, run_root / "students" / name)
    sampler = STUDENT_SAMPLER[method]
    if method == "pd":  # each round's student at its own step count
        nfe, fid, acc, secs = [], [], [], []
        for info, student in trained:
            if info["student_steps"] in (1, 2, 4):
                r = evaluate(student, metrics, sampler, [info["student_steps"]], args.samples, args.size)
                nfe += r["nfe"]
                fid += r["fid"]
                acc += r["class_accuracy"]
                secs += r["sample_seconds"]
        ev = {"sampler": sampler, "nfe": nfe, "fid": fid, "class_accuracy": acc, "sample_seconds": secs}
        train_seconds = sum(info["train_seconds"] for info, _ in trained)
    else:
        ev = evaluate(trained[0][1], metrics, sampler, [1, 2, 4] if method != "dmd" else [1], args.samples, args.size)
        if method == "dmd":
            ev["sampler"] = "one_step"
        train_seconds = trained[0][0]["train_seconds"]
    result = {"method": name, "teacher": args.teacher_of[method], "student_steps_trained": args.student_steps,
              "train_seconds": train_seconds, **ev}
    _write(path, result)
    return result


def assemble(result_root: Path, floor: dict, ceiling: dict, budget: str) -> dict:
    teachers, students = {}, {}
    for p in sorted((result_root / "teachers").glob("*.json")):
        r = json.loads(p.read_text())
        for s, ev in r["samplers"].items():
            teachers[f"{r['family']}/{s}"] = {**ev, "family": r["family"], "train_seconds": r["train_seconds"]}
    for p in sorted((result_root / "students").glob("*.json")):
        r = json.loads(p.read_text())
        students[r["method"]] = {k: r[k] for k in ("teacher", "sampler", "nfe", "fid", "class_accuracy",
                                                     "sample_seconds", "train_seconds", "student_steps_trained")}
    report = {"floor_fid": floor["fid"], "ceiling_fid": ceiling["fid"], "teachers": teachers, "students": students,
              "budget": budget}
    report["targets"] = targets(report)
    return report


def targets(report: dict) -> dict:
    floor = report["floor_fid"]
    best_teacher = min((f for t in report["teachers"].values() for n, f in zip(t["nfe"], t["fid"]) if n <= 50),
                       default=None)
    out = {"best_teacher_fid_le_50_nfe": best_teacher,
           "teacher_within_3x_floor": None if best_teacher is None else best_teacher <= 3 * floor}

    def best_student(nfe):
        vals = []
        for name, s in report["students"].items():
            fam_best = min((f for t in report["teachers"].values() if t["family"] == s["teacher"] for f in t["fid"]),
                           default=None)
            for n, f in zip(s["nfe"], s["fid"]):
                if n == nfe and fam_best is not None:
                    vals.append((f / fam_best, name, f, fam_best))
        return min(vals) if vals else None

    for nfe, bound in ((1, 2.0), (4, 1.3)):
        b = best_student(nfe)
        out[f"best_{nfe}_step_student"] = None if b is None else {"method": b[1], "fid": b[2], "teacher_best_fid": b[3],
                                                                   "ratio": b[0], "target": bound, "met": b[0] <= bound}
    return out


def write_outputs(report: dict, out: Path, grids: dict | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    lines = ["# Image diffusion on the 8x8 digits: FID (digit-classifier features) against NFE", "",
             f"Floor (real train vs held-out, same sample size): {report['floor_fid']:.2f}; "
             f"ceiling (uniform noise): {report['ceiling_fid']:.1f}.", "", "## Teachers", "",
             "| model / sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " | train s |",
             "|---|" + "---:|" * (len(NFES) + 1)]
    for name, t in report["teachers"].items():
        row = {n: f for n, f in zip(t["nfe"], t["fid"])}
        cells = [f"{row[n]:.2f}" if n in row else "" for n in NFES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['train_seconds'] or 0:.0f} |")
    lines += ["", "## Students", "", "| student | teacher | NFE 1 | NFE 2 | NFE 4 | steps | train s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in report["students"].items():
        row = {n: f for n, f in zip(s["nfe"], s["fid"])}
        cells = [f"{row[n]:.2f}" if n in row else "" for n in (1, 2, 4)]
        lines.append(f"| {name} ({s['sampler']}) | {s['teacher']} | " + " | ".join(cells)
                     + f" | {s['student_steps_trained']} | {s['train_seconds']:.0f} |")
    lines += ["", "## Targets", "", "```", json.dumps(report["targets"], indent=1), "```", "", report.get("budget", "")]
    report_file(out, ".md").write_text("\n".join(lines) + "\n")
    with png_figure(report_file(out, ".png"), figsize=(7, 4.5)) as (_, axes):
        ax = axes[0, 0]
        for name, t in report["teachers"].items():
            ax.plot(t["nfe"], t["fid"], marker="o", ms=3, label=name)
        for name, s in report["students"].items():
            ax.plot(s["nfe"], s["fid"], marker="*", ms=9, ls="--", label=f"{name} (student)")
        ax.axhline(report["floor_fid"], color="k", lw=0.8, ls=":", label="floor (real vs real)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FID (digit features)")
        ax.legend(fontsize=6, ncol=2)
    if grids:
        with png_figure(out.with_name(out.name + "_samples.png"), 1, len(grids),
                        figsize=(2.2 * len(grids), 2.6)) as (_, axes):
            for a, (name, img) in zip(axes[0], grids.items()):
                a.imshow(img, cmap="gray", vmin=-1, vmax=1)
                a.set_title(name, fontsize=7)
                a.axis("off")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(TEACHER_SAMPLERS), choices=list(TEACHER_SAMPLERS))
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=4_000)
    p.add_argument("--student-steps", type=int, default=1_000, help="gradient steps per student (per PD round)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=1000, help="generated images per FID")
    p.add_argument("--max-nfe", type=int, default=50)
    p.add_argument("--pd-start", type=int, default=32, help="teacher steps of the first PD round")
    p.add_argument("--cd-scales", type=int, default=50, help="consistency-distillation discretisation")
    p.add_argument("--pairs", type=int, default=4096, help="teacher ODE pairs (reflow, InstaFlow, DMD)")
    p.add_argument("--pair-steps", type=int, default=32, help="ODE steps per pair")
    p.add_argument("--dmd-fake-updates", type=int, default=2)
    p.add_argument("--dmd-regression", type=float, default=0.25)
    p.add_argument("--teacher", nargs="+", default=[], metavar="STUDENT=FAMILY",
                   help="distil a student from another teacher, e.g. pd=trigflow (defaults: STUDENTS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny nets and budgets")
    p.add_argument("--assemble", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv
    args.teacher_of = dict(STUDENTS)
    for item in args.teacher:
        student, _, family = item.partition("=")
        if student not in STUDENTS or family not in TEACHER_SAMPLERS:
            p.error(f"--teacher {item!r}: want STUDENT=FAMILY with STUDENT in {', '.join(STUDENTS)} and FAMILY in "
                    f"{', '.join(TEACHER_SAMPLERS)}")
        args.teacher_of[student] = family
    if args.quick:
        for name, value in (("pretrain_steps", 300), ("student_steps", 40), ("base_channels", 8), ("samples", 200),
                            ("max_nfe", 8), ("pairs", 256), ("pair_steps", 8), ("pd_start", 8), ("cd_scales", 10),
                            ("batch_size", 32)):
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    tag = "images_quick" if args.quick else "images"
    out = Path(args.out) if args.out else ROOT / "results" / tag
    run_root = Path(args.runs) if args.runs else ROOT / "runs" / tag
    result_root = report_file(out, "_runs")
    torch.manual_seed(args.seed)

    from diffpolicy.images import ImageMetrics, load_digits

    metrics = ImageMetrics(args.size)
    xr, yr = load_digits(args.size, "train")
    if args.samples > len(xr):
        raise SystemExit(f"--samples {args.samples} exceeds the {len(xr)} real train images the floor needs")
    floor = metrics.evaluate(xr[: args.samples], yr[: args.samples])  # the same sample size as the models
    ceiling = metrics.ceiling()
    budget = (f"Budget: teachers {args.pretrain_steps} steps (batch {args.batch_size}, U-Net base {args.base_channels}); "
              f"students {args.student_steps} steps each unless their row says otherwise (PD: per round, "
              f"{args.pd_start} -> 1 steps); "
              f"{args.samples} samples per FID; {args.size}x{args.size} digits; seed {args.seed}.")
    grids = {}
    if not args.assemble:
        def teacher(fam):
            r = run_teacher(fam, args, metrics, run_root, result_root)
            best = min((f, n, s) for s, ev in r["samplers"].items() for f, n in zip(ev["fid"], ev["nfe"]))
            print(f"[{fam}] best FID {best[0]:.2f} ({best[2]}, NFE {best[1]})", flush=True)

        needed = {args.teacher_of[m] for m in args.students}  # the students' teachers, then the students, then the rest
        for fam in sorted(needed):  # a --teacher family outside --families is still trained and evaluated
            teacher(fam)
        for m in args.students:
            r = run_student(m, args, metrics, run_root, result_root)
            print(f"[{m}] FID " + ", ".join(f"NFE {n}: {f:.2f}" for n, f in zip(r["nfe"], r["fid"])), flush=True)
        for fam in [f for f in args.families if f not in needed]:
            teacher(fam)
        from diffpolicy.images import image_grid, sample_images

        for fam in args.families:  # sample grids of the teachers at 16 NFE (their first sampler)
            model = load_teacher(fam, args, run_root)
            s, g = TEACHER_SAMPLERS[fam][0]
            nfe = max(n for n in _nfes(g, args))
            grids[f"{fam} ({s}, {nfe})"] = image_grid(sample_images(model, 100, args.size, nfe, s, labels=_labels(100),
                                                             generator=torch.Generator().manual_seed(1)))
    report = assemble(result_root, floor, ceiling, budget)
    write_outputs(report, out, grids or None)
    print(report_file(out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

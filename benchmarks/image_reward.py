"""Reward fine-tuning of one pre-trained digits model: every method on every reward, one sample budget.

What is measured (``python benchmarks/image_reward.py``; ``--quick`` is a smoke run):

* The pre-trained model is the image benchmark's DDPM v-prediction teacher
  (``benchmarks/runs/images/teachers/ddpm_v``; trained here with the same settings if absent).
* Methods (``diffpolicy.agents``): DDPO-SF, DDPO-IS (2 inner epochs), DRaFT-K (K = 2), ReFL,
  DRWR, and for each of ``--kl-weights`` KL-regularised copies of DDPO-IS, DRaFT and DRWR
  (``<method>+kl<weight>``). Differentiable methods run only on differentiable rewards.
* Rewards (``diffpolicy.images.rewards``, table ``BENCH_REWARDS``): ``digit0``, the digit
  classifier's log-probability of a 0 for unconditional samples (the null label: the model is
  steered from about 7 % zeros toward zeros; the fraction classified as 0 is also recorded);
  ``brightness``; JPEG ``compressibility``; and, on request, ``class``, the log-probability of
  each conditional sample's own label (already -0.03 on average before tuning: saturated).
  Log-probability rewards are bounded by 0 and the pre-trained ones are bimodal, so the
  2-standard-deviation margin is out of reach by construction for both class rewards
  (``digit0``: at most (0 - mean) / std = 1.65); the target fraction is the readable figure.
* Each run gets ``--samples`` training images; the mean reward of 128 fixed-seed images is
  recorded every ``--eval-every`` iterations; before and after: the reward mean / std over 512
  images, and the FID and precision (Kynkaanniemi et al. 2019: the fraction of samples inside the
  real digits' feature manifold) of 1000 images against the held-out digits. FID also grows when
  a reward narrows the distribution on purpose (``digit0``: zeros only), precision does not: it
  is the quality figure to read there.

Each (reward, method) run writes ``results/image_reward_runs/<reward>/<method>.json`` and
resumes from its run directory; the table is assembled from whatever exists.
Outputs: ``results/image_reward.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffpolicy.plotting import png_figure, report_file

ROOT = Path(__file__).resolve().parent
METHODS = {  # name -> (module, class, settings)
    "ddpo_sf": ("ddpo", "DDPO", dict(importance_sampling=False)),
    "ddpo_is": ("ddpo", "DDPO", dict(importance_sampling=True, inner_epochs=2, clip_epsilon=0.1)),
    "draft": ("draft", "DRaFT", dict(grad_steps=2)),
    "refl": ("refl", "ReFL", dict(late_steps=5)),
    "drwr": ("image_drwr", "ImageDRWR", dict(beta=2.0)),
}
BENCH_REWARDS = {  # name -> (diffpolicy reward, its options, tuner options)
    "digit0": ("class", {"target": 0}, {"num_classes": 0}),
    "brightness": ("brightness", {}, {}),
    "compressibility": ("compressibility", {}, {}),
    "class": ("class", {}, {}),
}
REWARDS = ["digit0", "brightness", "compressibility"]
KL_METHODS = ("ddpo_is", "draft", "drwr")


def bench_reward(name: str):
    from diffpolicy.images.rewards import make_reward

    reward, options, tuner_options = BENCH_REWARDS[name]
    return make_reward(reward, **options), tuner_options


def kl_name(method: str, weight: float) -> str:
    return f"{method}+kl{weight:g}"


def kl_weight(method: str) -> float:
    """The KL weight in a method name (``draft+kl0.1`` -> 0.1; no ``+kl``: 0)."""
    return float(method.split("+kl")[1]) if "+kl" in method else 0.0


def base_method(method: str) -> str:
    """The tuner of a run name: ``draft@b8+kl1`` -> ``draft``."""
    return method.split("+")[0].split("@b")[0]


def batch_size(method: str, default: int) -> int:
    """The batch of a run name (``draft@b8`` -> 8; no ``@b``: ``default``, the ``--batch-size``)."""
    head = method.split("+")[0]
    return int(head.split("@b")[1]) if "@b" in head else default


def batch_variant(spec: str) -> str:
    """``--batch-variants`` entry ``draft=8`` -> the run name ``draft@b8``."""
    method, _, b = spec.partition("=")
    if method not in METHODS or not b.isdigit() or int(b) < 1:
        raise SystemExit(f"--batch-variants takes METHOD=BATCH with METHOD in {', '.join(METHODS)}; got {spec!r}")
    return f"{method}@b{int(b)}"


def pretrained(args):
    sys.path.insert(0, str(ROOT))
    from images import teacher_cfg  # the image benchmark's teacher settings: one shared run

    from diffpolicy.images import pretrain_images

    ns = argparse.Namespace(size=8, pretrain_steps=args.pretrain_steps, batch_size=128, base_channels=args.base_channels,
                            lr=2e-4, seed=0)
    return pretrain_images(teacher_cfg("ddpm_v", ns), run_dir=Path(args.pretrained_run), progress=args.progress)["ema"]


def _tuner_class(method: str):
    import importlib

    module, cls, _ = METHODS[base_method(method)]
    return getattr(importlib.import_module(f"diffpolicy.agents.{module}"), cls)


def make_tuner(method: str, model, reward, args, **tuner_options):
    settings = METHODS[base_method(method)][2]
    return _tuner_class(method)(model, reward, 8, sampling_steps=args.sampling_steps,
                                batch_size=batch_size(method, args.batch_size), lr=args.lr,
                                kl_weight=kl_weight(method), **settings, **tuner_options)


def target_fraction(tuner, model=None) -> float | None:
    """For a class reward: the fraction of 512 fixed-seed samples whose target class has
    probability above 1/2 (so it is the classifier's pick); None for other rewards."""
    from diffpolicy.images.rewards import ClassLogProb

    if not isinstance(tuner.reward, ClassLogProb):
        return None
    x, context = tuner.sample(512, seed=1, model=model)
    with torch.no_grad():
        return float((tuner.reward(x, context) > -math.log(2)).float().mean())


def run_one(reward_name: str, method: str, model, metrics, args, run_root: Path, result_root: Path) -> dict | None:
    from diffpolicy.checkpoint import find_checkpoint

    path = result_root / reward_name / f"{method}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    reward, tuner_options = bench_reward(reward_name)
    tuner = make_tuner(method, model, reward, args, **tuner_options)
    if old is not None and old["samples"] >= args.samples:
        run_dir = run_root / reward_name / method
        if "precision_after" not in old and find_checkpoint(run_dir) is not None:  # recorded before precision was
            tuner.fit(old["iterations"], run_dir=run_dir, progress=False)  # loads the final checkpoint, no training
            old["precision_before"] = metrics.evaluate(*tuner.sample(1000, seed=2, model=model))["precision"]
            old["precision_after"] = metrics.evaluate(*tuner.sample(1000, seed=2))["precision"]
            path.write_text(json.dumps(old, indent=1))
        return old
    # one batch per iteration (DDPO-IS: per inner_epochs iterations), so every method sees args.samples images;
    # curve points every args.eval_every iterations of a --batch-size batch, i.e. at the same sample counts
    b = tuner.config.batch_size
    epochs = getattr(tuner.config, "inner_epochs", 1)
    iterations = max(1, round(args.samples / b)) * epochs
    eval_every = max(1, round(args.eval_every * args.batch_size / b))

    def score(n, seed, model=None):
        return tuner.evaluate(n, seed=seed, model=model)

    before = score(512, 1, model)
    fraction_before = target_fraction(tuner, model)
    quality_before = metrics.evaluate(*tuner.sample(1000, seed=2, model=model))
    curve, steps = [], list(range(0, iterations + 1, eval_every)) or [0]
    if steps[-1] != iterations:
        steps.append(iterations)
    start = time.perf_counter()
    train_seconds = 0.0
    for it in steps:
        if it:
            t0 = time.perf_counter()
            tuner.fit(it, run_dir=run_root / reward_name / method, progress=False, checkpoint_every=eval_every)
            train_seconds += time.perf_counter() - t0
        curve.append({"samples": tuner.samples(it), "reward": score(128, 3)["reward_mean"]})
    after = score(512, 1)
    fraction_after = target_fraction(tuner)
    quality_after = metrics.evaluate(*tuner.sample(1000, seed=2))
    result = {"reward": reward_name, "method": method, "reward_before": before["reward_mean"],
              "reward_before_std": before["reward_std"], "reward_after": after["reward_mean"],
              "reward_after_std": after["reward_std"], "fid_before": quality_before["fid"],
              "fid_after": quality_after["fid"], "precision_before": quality_before["precision"],
              "precision_after": quality_after["precision"],
              "samples": tuner.samples(iterations), "iterations": iterations, "seconds": train_seconds,
              "wall_seconds": time.perf_counter() - start, "curve": curve, "kl_weight": kl_weight(method),
              "batch_size": b}
    if fraction_before is not None:
        result.update(target_fraction_before=fraction_before, target_fraction_after=fraction_after)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def assemble(result_root: Path, budget: str) -> dict:
    results = {}
    for p in sorted(result_root.glob("*/*.json")):
        r = json.loads(p.read_text())
        results.setdefault(r["reward"], {})[r["method"]] = r
    return {"results": results, "targets": targets(results), "budget": budget}


def targets(results: dict) -> dict:
    out = {}
    for reward, runs in results.items():
        t = {}
        for m, r in runs.items():
            t[f"{m}_margin_in_std"] = (r["reward_after"] - r["reward_before"]) / max(r["reward_before_std"], 1e-12)
            if "+kl" in m:
                t[f"{m}_fid_drift"] = r["fid_after"] / r["fid_before"]
        # the KL target: some weight keeps FID within 1.5x while still raising the reward by 2 std
        kl = [(t[f"{m}_margin_in_std"], t[f"{m}_fid_drift"], m) for m in runs if "+kl" in m]
        within = [k for k in kl if k[1] <= 1.5]
        if kl:
            margin, drift, m = max(within) if within else min(kl, key=lambda k: k[1])
            t["kl_best"] = {"method": m, "margin_in_std": margin, "fid_drift": drift,
                            "met": bool(drift <= 1.5 and margin >= 2.0)}
        # sample efficiency: the samples a differentiable method needs to reach the final reward of the
        # best DDPO run (any batch size), as a fraction of that run's samples; each at its own batch size
        unregularised = [m for m in runs if "+kl" not in m]
        ddpo = [runs[m] for m in unregularised if base_method(m) in ("ddpo_is", "ddpo_sf")]
        if ddpo:
            best = max(ddpo, key=lambda r: r["curve"][-1]["reward"])
            t["ddpo_final"] = {"method": best["method"], "reward": best["curve"][-1]["reward"], "samples": best["samples"]}
            for m in unregularised:
                if base_method(m) in ("draft", "refl"):
                    hit = samples_to(runs[m]["curve"], best["curve"][-1]["reward"])
                    t[f"{m}_samples_to_ddpo_final_fraction"] = None if hit is None else hit / best["samples"]
            # below saturation: samples to cover 1/4, 1/2, 3/4 of the way from the start to that final reward
            start = best["curve"][0]["reward"]
            levels = [start + f * (best["curve"][-1]["reward"] - start) for f in (0.25, 0.5, 0.75)]
            t["samples_to_levels"] = {"levels": levels, **{m: [samples_to(runs[m]["curve"], v) for v in levels]
                                                           for m in unregularised}}
        out[reward] = t
    return out


def samples_to(curve: list, level: float) -> int | None:
    """Training samples at the first curve point whose reward reaches ``level`` (None: never)."""
    return next((c["samples"] for c in curve if c["reward"] >= level), None)


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    lines = ["# Reward fine-tuning of the digits model (same sample budget for every method)", ""]
    for reward, runs in report["results"].items():
        frac = any("target_fraction_after" in r for r in runs.values())
        lines += [f"## {reward}", "", "| method | reward before | reward after | margin (std) | FID before | FID after "
                  "| precision before | after | samples | train s |" + (" target class before | after |" if frac else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if frac else "")]
        for m, r in runs.items():
            margin = (r["reward_after"] - r["reward_before"]) / max(r["reward_before_std"], 1e-12)
            prec = (f"{r['precision_before']:.2f} | {r['precision_after']:.2f}" if "precision_after" in r else "— | —")
            lines.append(f"| {m} | {r['reward_before']:.3f} ± {r['reward_before_std']:.3f} | {r['reward_after']:.3f} | "
                         f"{margin:.1f} | {r['fid_before']:.1f} | {r['fid_after']:.1f} | {prec} | {r['samples']} | "
                         f"{r['seconds']:.0f} |"
                         + ("".join(f" {r[k]:.1%} |" if k in r else " — |"
                                    for k in ("target_fraction_before", "target_fraction_after")) if frac else ""))
        lines.append("")
        levels = report["targets"].get(reward, {}).get("samples_to_levels")
        if levels:
            lines += [f"Training samples to reach 1/4, 1/2, 3/4 of the way to {report['targets'][reward]['ddpo_final']['method']}'s "
                      "final reward (" + ", ".join(f"{v:.3f}" for v in levels["levels"]) + "):", "",
                      "| method | 1/4 | 1/2 | 3/4 |", "|---|---:|---:|---:|"]
            lines += [f"| {m} | " + " | ".join("—" if n is None else str(n) for n in hits) + " |"
                      for m, hits in levels.items() if m != "levels"]
            lines.append("")
    lines += ["## Targets", "", "```", json.dumps(report["targets"], indent=1), "```", "", report["budget"]]
    report_file(out, ".md").write_text("\n".join(lines) + "\n")
    rewards = list(report["results"])
    if not rewards:
        return
    with png_figure(report_file(out, ".png"), 1, len(rewards), figsize=(4.5 * len(rewards), 3.5)) as (_, axes):
        for ax, reward in zip(axes[0], rewards):
            for m, r in report["results"][reward].items():
                ax.plot([c["samples"] for c in r["curve"]], [c["reward"] for c in r["curve"]], marker="o", ms=3,
                        label=m)
            ax.set_title(reward)
            ax.set_xlabel("training samples")
            ax.set_ylabel("mean reward")
            ax.legend(fontsize=6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rewards", nargs="+", default=REWARDS, choices=list(BENCH_REWARDS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--samples", type=int, default=4096, help="training images per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-variants", nargs="*", default=[], metavar="METHOD=BATCH",
                   help="also run METHOD with its own batch size, as the run '<method>@b<batch>' (e.g. draft=8; "
                        "the same sample budget, so a smaller batch takes more updates)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-weights", type=float, nargs="*", default=[0.1, 1.0, 10.0],
                   help="a '+kl<w>' copy of DDPO-IS, DRaFT and DRWR per weight (none: no KL runs)")
    p.add_argument("--eval-every", type=int, default=16, help="iterations between curve points")
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--pretrained-run", default=str(ROOT / "runs" / "images" / "teachers" / "ddpm_v"))
    p.add_argument("--runs", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--assemble", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv
    if args.quick:
        for name, value in (("samples", 128), ("batch_size", 16), ("sampling_steps", 6), ("eval_every", 4),
                            ("pretrain_steps", 300), ("base_channels", 8)):
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
        if "--pretrained-run" not in given:
            args.pretrained_run = str(ROOT / "runs" / "image_reward_quick" / "pretrained")
    tag = "image_reward_quick" if args.quick else "image_reward"
    out = Path(args.out) if args.out else ROOT / "results" / tag
    run_root = Path(args.runs) if args.runs else ROOT / "runs" / tag
    result_root = report_file(out, "_runs")
    budget = (f"Budget: {args.samples} training images per run (batch {args.batch_size}, {args.sampling_steps} sampling "
              f"steps, lr {args.lr}); KL weights {args.kl_weights}; pre-trained: ddpm_v digits U-Net "
              f"(base {args.base_channels}, {args.pretrain_steps} steps); seed 0.")
    if not args.assemble:
        from diffpolicy.images import ImageMetrics

        torch.set_num_threads(1)
        model = pretrained(args)
        metrics = ImageMetrics(8)
        methods = (args.methods + [batch_variant(v) for v in args.batch_variants]
                   + [kl_name(m, w) for m in KL_METHODS for w in args.kl_weights if w > 0])
        for reward_name in args.rewards:
            differentiable = bench_reward(reward_name)[0].differentiable
            for m in methods:
                if _tuner_class(m).needs_reward_gradient and not differentiable:
                    continue
                if base_method(m) not in args.methods:
                    continue
                r = run_one(reward_name, m, model, metrics, args, run_root, result_root)
                print(f"[{reward_name} / {m}] reward {r['reward_before']:.3f} -> {r['reward_after']:.3f}, "
                      f"FID {r['fid_before']:.1f} -> {r['fid_after']:.1f} ({r['seconds']:.0f} s)", flush=True)
    report = assemble(result_root, budget)
    write_outputs(report, out)
    print(report_file(out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

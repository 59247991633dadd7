"""What a reward gain costs in FID when no fine-tuning is involved: the frontier a KL target is read against.

The image reward benchmark asks a KL-regularised run to raise the mean reward by 2 pre-trained
standard deviations while its FID stays within 1.5x of the pre-trained model's. This script
measures, on the pre-trained model's own samples (the benchmark's ``ddpm_v`` digits model and
its DDPM chain), what that gain costs when it is reached by

* ``kl_optimum``: the exact optimum of the KL-regularised objective ``E_p[r] - beta KL(p || p_pre)``,
  ``p*(x) = p_pre(x) exp(r(x) / beta) / Z`` (e.g. Korbak et al. 2022, "RL with KL penalties is
  better viewed as Bayesian inference", eq. 4), drawn by resampling ``--pool`` model samples with
  weights ``exp(r / beta)`` (its effective sample size is reported: duplicates inflate FID);
* simple image transforms of the samples (brightness only): ``gamma`` (pixel values in [0, 1]
  raised to ``g < 1``) and ``dilate`` (a blend with the 3x3 max-pooled image: thicker strokes).

Each row: the reward gain in pre-trained standard deviations, FID / the pre-trained FID (1000
images against the held-out digits, as in the benchmark) and precision. Outputs
``results/reward_frontier.{json,md}``::

    python benchmarks/reward_frontier.py                      # brightness, the benchmark's model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffpolicy.plotting import report_file

ROOT = Path(__file__).resolve().parent
TRANSFORMS = {  # name -> (values, transform of images in [0, 1])
    "gamma": ((0.9, 0.8, 0.75, 0.7, 0.6), lambda p, g: p.clamp(0, 1) ** g),
    "dilate": ((0.05, 0.1, 0.15, 0.2), lambda p, a: (1 - a) * p + a * torch.nn.functional.max_pool2d(p, 3, 1, 1)),
}


def frontier(model, metrics, reward, tuner, betas, pool: int, n: int = 1000, transforms: bool = True) -> dict:
    """Rows ``{"how", "value", "margin_in_std", "fid_drift", "precision"}`` against the first ``n``
    of ``pool`` seeded samples of ``model``."""
    x, ctx = tuner.sample(pool, seed=2, model=model)
    n = min(n, pool)
    with torch.no_grad():
        r = reward(x, ctx).double()
    ref_x, ref_ctx, ref_r = x[:n], None if ctx is None else ctx[:n], r[:n]
    mean, std = float(ref_r.mean()), float(ref_r.std())
    base = metrics.evaluate(ref_x, ref_ctx)
    rows = []

    def row(how, value, y, c, extra=None):
        with torch.no_grad():
            gain = (float(reward(y, c).double().mean()) - mean) / std
        q = metrics.evaluate(y, c)
        rows.append({"how": how, "value": value, "margin_in_std": gain, "fid": q["fid"],
                     "fid_drift": q["fid"] / base["fid"], "precision": q["precision"], **(extra or {})})

    g = torch.Generator().manual_seed(0)
    for beta in betas:
        w = torch.softmax(r / beta, 0)
        idx = torch.multinomial(w, n, replacement=True, generator=g)
        row("kl_optimum", beta, x[idx], None if ctx is None else ctx[idx], {"ess": float(1 / w.square().sum())})
    if transforms:
        p = (ref_x + 1) / 2
        for name, (values, fn) in TRANSFORMS.items():
            for v in values:
                row(name, v, fn(p, v) * 2 - 1, ref_ctx)
    return {"reward_mean": mean, "reward_std": std, "fid": base["fid"], "precision": base["precision"],
            "samples": n, "pool": pool, "rows": rows}


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=1))
    lines = ["# What a reward gain costs in FID without fine-tuning", "",
             "Pre-trained samples resampled toward the KL-regularised optimum p_pre exp(r / beta), or transformed; "
             "gain in pre-trained standard deviations, FID against the held-out digits relative to the pre-trained "
             "model's.", ""]
    for reward, rep in report["rewards"].items():
        lines += [f"## {reward}", "", f"Pre-trained: {rep['reward_mean']:.3f} ± {rep['reward_std']:.3f}, FID "
                  f"{rep['fid']:.2f}, precision {rep['precision']:.2f} ({rep['samples']} samples; KL optimum drawn "
                  f"from a pool of {rep['pool']}).", "",
                  "| how | value | gain (std) | FID | FID drift | precision | effective samples |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['how']} | {r['value']:g} | {r['margin_in_std']:.2f} | {r['fid']:.1f} | {r['fid_drift']:.2f}x | "
                  f"{r['precision']:.2f} | {format(r['ess'], '.0f') if 'ess' in r else '—'} |" for r in rep["rows"]]
        lines.append("")
    report_file(out, ".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rewards", nargs="+", default=["brightness"])
    p.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.02, 0.0125, 0.01],
                   help="KL weights of the optimum p_pre exp(r / beta) (in reward units)")
    p.add_argument("--pool", type=int, default=32000, help="pre-trained samples the optimum is resampled from")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--pretrained-run", default=str(ROOT / "runs" / "images" / "teachers" / "ddpm_v"))
    p.add_argument("--out", default=str(ROOT / "results" / "reward_frontier"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import image_reward as bench

    from diffpolicy.images import ImageMetrics

    torch.set_num_threads(1)
    args.progress, args.batch_size, args.lr = False, 32, 1e-5  # what the benchmark's helpers read
    model = bench.pretrained(args)
    metrics = ImageMetrics(8)
    report = {"rewards": {}}
    for name in args.rewards:
        reward, tuner_options = bench.bench_reward(name)
        tuner = bench.make_tuner("ddpo_is", model, reward, args, **tuner_options)  # its DDPM chain, as DDPO samples
        report["rewards"][name] = frontier(model, metrics, reward, tuner, args.betas, args.pool,
                                           transforms=name == "brightness")
    write_outputs(report, Path(args.out))
    print(report_file(args.out, ".md").read_text())
    return report


if __name__ == "__main__":
    main()

"""The ``diffpolicy`` command line: ``demo``, ``dataset make|list|info`` and ``image pretrain|sample``.

Config-driven commands take ``--config FILE.yaml`` and ``key=value`` overrides of their config
dataclass (:mod:`diffpolicy.config`); an unknown key is an error naming the closest one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .demo import DemoConfig, run_demo


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field`` option per dataclass field, with the field's comment-free default."""
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit eps/v/rectified-flow/consistency models on a 2-D toy and "
                                       "compare samplers (sliced Wasserstein vs NFE and time)")
    _add_dataclass_args(demo, DemoConfig)
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")

    ds = sub.add_parser("dataset", help="make, list and inspect local Minari datasets")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True)
    make = ds_sub.add_parser("make", help="make a D4RL-style dataset with an SB3 behaviour policy trained here")
    make.add_argument("env_id", help="gymnasium id, e.g. Hopper-v5")
    make.add_argument("quality", choices=("random", "medium", "expert", "medium-replay", "medium-expert"),
                      help="D4RL's dataset qualities")
    make.add_argument("--transitions", type=int, default=1_000_000, help="size (default: 1000000, as D4RL)")
    make.add_argument("--behaviour-steps", type=int, default=150_000, help="SB3 SAC training steps (default: 150000)")
    make.add_argument("--ref-episodes", type=int, default=50, help="episodes for the reference scores (default: 50)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that id")
    ds_sub.add_parser("list", help="list the local Minari datasets")
    info = ds_sub.add_parser("info", help="size, spaces and reference scores of a dataset")
    info.add_argument("dataset_id")

    img = sub.add_parser("image", help="pre-train and sample image diffusion models (digits or your folder)")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    pre = img_sub.add_parser("pretrain", help="train one model family (ImagePretrainConfig: family=ddpm_eps|ddpm_x0|"
                                              "ddpm_v|rf|ct|trigflow, steps=..., size=8|16, ...); resumes a run dir")
    pre.add_argument("run_dir", help="run directory: config.json, logs, checkpoint.pt (an existing one continues)")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="ImagePretrainConfig fields")
    pre.add_argument("--config", default=None, help="YAML file of ImagePretrainConfig fields")
    pre.add_argument("--no-progress", dest="progress", action="store_false")
    smp = img_sub.add_parser("sample", help="sample a grid from a pre-trained run (its EMA weights)")
    smp.add_argument("run_dir")
    smp.add_argument("--n", type=int, default=100, help="images (labels 0..9 in turn; default 100)")
    smp.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    smp.add_argument("--sampler", default="ddim", help="ddim, ddpm, dpmpp_2m, rf_euler, consistency, ... (default ddim)")
    smp.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples.png); the tensor goes beside it as .pt")
    return parser


def _dataset_command(args) -> int:
    from diffpolicy.envs import datasets as D

    if args.dataset_command == "make":
        ds = D.make_dataset(args.env_id, args.quality, n_transitions=args.transitions,
                            behaviour_steps=args.behaviour_steps, ref_episodes=args.ref_episodes, seed=args.seed,
                            overwrite=args.overwrite)
        print(f"made {ds.spec.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
    elif args.dataset_command == "list":
        for did in D.local_datasets():
            print(did)
    else:
        try:
            ds = D.load_dataset(args.dataset_id, download=False)
        except D.DatasetNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        md = ds.storage.metadata
        print(f"{ds.spec.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
        print(f"env: {getattr(ds.spec.env_spec, 'id', None)}; observations {ds.observation_space.shape}, "
              f"actions {ds.action_space.shape}")
        print(f"ref_min_score {md.get('ref_min_score')}, ref_max_score {md.get('ref_max_score')}")
        print(f"algorithm: {md.get('algorithm_name')}")
    return 0


def _image_command(args) -> int:
    from pathlib import Path

    import torch

    from diffpolicy.config import ConfigError, load_config
    from diffpolicy.images import ImagePretrainConfig, image_grid, load_pretrained, pretrain_images, sample_images

    run = Path(args.run_dir)
    if args.image_command == "pretrain":
        try:
            cfg = load_config(ImagePretrainConfig, args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
        if distributed:
            import dataclasses

            import torch.distributed as dist

            local = int(os.environ.get("LOCAL_RANK", "0"))
            if cfg.device.startswith("cuda"):
                torch.cuda.set_device(local)
                cfg = dataclasses.replace(cfg, device=f"cuda:{local}")
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        try:
            out = pretrain_images(cfg, run_dir=run, progress=args.progress and not distributed)
        finally:
            if distributed:
                dist.destroy_process_group()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{cfg.family}: {out['steps']} steps, last loss {out['history'][-1]['loss']:.4f} ({run})")
        return 0
    try:
        cfg, model, step = load_pretrained(run)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = torch.arange(args.n) % 10 if cfg.class_conditional else None
    try:
        x = sample_images(model, args.n, cfg.size, args.steps, args.sampler, labels=labels, guidance=args.guidance,
                          generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:  # an unknown sampler, a bad step count
        print(f"error: {e}", file=sys.stderr)
        return 2
    png = Path(args.out) if args.out else run / "samples.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x, png.with_suffix(".pt"))
    from PIL import Image

    tile = image_grid(x, cols=10)
    Image.fromarray(((tile + 1) * 127.5).round().byte().numpy()).resize((tile.shape[1] * 4, tile.shape[0] * 4),
                                                                         Image.NEAREST).save(png)
    print(f"{args.n} samples of {cfg.family} at step {step} ({args.sampler}, {args.steps} steps) -> {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
        if args.quick:  # shorter budgets, except where the user chose a value
            quick = dict(train_steps=200, ct_steps=200, n_eval=500, n_held_out=5000, n_paired=2)
            defaults = DemoConfig()
            values.update({k: v for k, v in quick.items() if values[k] == getattr(defaults, k)})
        run_demo(DemoConfig(**values))
    elif args.command == "dataset":
        return _dataset_command(args)
    elif args.command == "image":
        return _image_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``diffpolicy`` command line: ``demo`` and ``dataset make|list|info``."""
from __future__ import annotations

import argparse
import dataclasses
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``diffpolicy`` command line. Subcommands grow with the library; for now: ``demo``."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
        if args.quick:  # shorter budgets, except where the user chose a value
            quick = dict(train_steps=200, ct_steps=200, n_eval=500, n_held_out=5000)
            defaults = DemoConfig()
            values.update({k: v for k, v in quick.items() if values[k] == getattr(defaults, k)})
        run_demo(DemoConfig(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())

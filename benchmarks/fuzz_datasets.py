"""Fuzz the dataset loader: random byte flips and truncations of a Minari HDF5 file.

Every damaged copy must either load (a flip inside the data changes values; HDF5 keeps no
checksum here) or stop with one of the loader's documented errors: ``DatasetCorruptError``,
``NonFiniteDataError``, or the ``ValueError`` for unsupported spaces / empty datasets. Anything
else is a bug; its case (seed, flips, cut) is written out so it can become an ``@example`` of
``tests/test_reliability.py::test_fuzzed_dataset_files_load_or_give_our_errors``.

    python benchmarks/fuzz_datasets.py --cases 600 --seed 0

Writes ``benchmarks/results/fuzz_datasets.{json,md}``. The test runs 16 fixed cases in CI;
this script explores many more (about 0.2 s per case on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from diffpolicy.plotting import report_file

RESULTS = Path(__file__).resolve().parent / "results"


def _case(rng: random.Random) -> dict:
    """The test's distribution: up to 6 single-byte XOR flips, and a truncation 30 % of the time."""
    cut = rng.random()
    return dict(cut=cut if cut > 0.7 else 0.0,
                flips=[(rng.random(), rng.randint(1, 255)) for _ in range(rng.randint(0, 6))])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz_datasets")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="diffpolicy-fuzz-"))
    os.environ["MINARI_DATASETS_PATH"], os.environ["DIFFPOLICY_HOME"] = str(root / "minari"), str(root / "home")
    from diffpolicy.envs.datasets import (DatasetCorruptError, NonFiniteDataError, OfflineData, _minari_root,
                                          load_dataset, make_dataset)

    try:
        src = make_dataset("Pendulum-v1", "medium", n_transitions=2000, behaviour_steps=1000,
                           behaviour_eval_every=500, ref_episodes=2, progress=False)
        src_dir = _minari_root() / src.spec.dataset_id
        did = "diffpolicy/pendulum/fuzzed-v0"
        dst = _minari_root() / did
        rng, outcomes, bugs, t0 = random.Random(args.seed), Counter(), [], time.perf_counter()
        for i in range(args.cases):
            case = _case(rng)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src_dir, dst)
            meta = dst / "data" / "metadata.json"
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "dataset_id": did}))
            h5 = dst / "data" / "main_data.hdf5"
            raw = bytearray(h5.read_bytes())
            for where, xor in case["flips"]:
                raw[int(where * len(raw))] ^= xor
            h5.write_bytes(bytes(raw[: max(1, int(len(raw) * (1 - case["cut"])))]))
            try:
                OfflineData.from_minari(load_dataset(did, download=False))
                outcomes["loads"] += 1
            except (DatasetCorruptError, NonFiniteDataError) as e:
                outcomes[type(e).__name__] += 1
            except Exception as e:  # noqa: BLE001 - anything else is what we are looking for
                documented = isinstance(e, ValueError) and ("only flat Box" in str(e) or "holds no episodes" in str(e))
                outcomes["ValueError (documented)" if documented else "undocumented"] += 1
                if not documented:
                    bugs.append(dict(case=i, **case, error=f"{type(e).__name__}: {e}"[:300]))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    out = dict(cases=args.cases, seed=args.seed, seconds=round(time.perf_counter() - t0, 1),
               outcomes=dict(outcomes), undocumented=bugs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report_file(args.out, ".json").write_text(json.dumps(out, indent=1))
    lines = [f"# Dataset loader fuzz: {args.cases} damaged copies (seed {args.seed}, {out['seconds']} s)", "",
             "| outcome | cases |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(outcomes.items())]
    lines += ["", f"Undocumented errors: {len(bugs)}"] + [f"- case {b['case']}: flips {b['flips']}, cut {b['cut']:.3f}: "
                                                          f"`{b['error']}`" for b in bugs]
    report_file(args.out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()

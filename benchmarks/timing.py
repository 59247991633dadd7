"""Timing shared by the benchmark scripts.

:func:`measure`: interleaved timing, every round runs each variant once, in a shuffled order,
so machine noise hits all variants alike; medians after a warm-up. :func:`measured_before`:
the timing figures of a table already written, for rewrites that do not measure them again.
"""
from __future__ import annotations

import json
import random
import statistics
import time

from diffpolicy.plotting import report_file


def measure(variants: dict, rounds: int, warmup: int, sync=lambda: None) -> dict:
    """Median milliseconds per call of each ``variants[name]()``; ``sync`` (e.g. a CUDA
    synchronise) runs before and after each timed call."""
    times = {k: [] for k in variants}
    names, rng = list(variants), random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(names)
        for k in names:
            sync()
            t0 = time.perf_counter_ns()
            variants[k]()
            sync()
            if r >= warmup:
                times[k].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def measured_before(out, keys) -> dict:
    """The figures ``keys`` of the table already at ``out`` (``<out>.json``), or ``{}``.

    A sweep rewrites its table after every finished run, and ``--assemble`` rebuilds it, without
    timing anything (timings need a quiet machine); these rewrites keep the last measured figures
    instead of dropping them."""
    path = report_file(out, ".json")
    old = json.loads(path.read_text()) if path.exists() else {}
    return {k: old[k] for k in keys if k in old}

"""Interleaved timing shared by the speed scripts: every round runs each variant once, in a
shuffled order, so machine noise hits all variants alike; medians after a warm-up."""
from __future__ import annotations

import random
import statistics
import time


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

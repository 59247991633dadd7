"""Report outputs of the benchmarks, ``diffpolicy compare`` and the demo: figures written straight
to PNG files, headless (:func:`png_figure`); the files of a report named by one stem
(:func:`report_file`); the mean-over-seeds cells of their tables (:func:`seed_spread`)."""
from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["png_figure", "report_file", "seed_spread", "REPORT_SUFFIXES"]

#: The files a report writes beside one another: ``<stem>.json``, ``<stem>.md``, ``<stem>.png``.
REPORT_SUFFIXES = (".json", ".md", ".png")


def report_file(stem, ext: str) -> Path:
    """The report file ``<stem><ext>``. A dot inside the stem is kept (``x_tau0.9`` gives
    ``x_tau0.9.json``, where ``Path.with_suffix`` would give ``x_tau0.json``); a stem given with
    one of the report's own suffixes (``x.json``) names the same report as ``x``. ``ext`` may be
    any tail: the sweeps keep their per-run results in ``report_file(out, "_runs")``."""
    stem = Path(stem)
    if stem.suffix in REPORT_SUFFIXES:
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ext)


def seed_spread(mean: float, std: float, n: int, digits: int = 1) -> str:
    """A table cell for a mean over ``n`` seeds: ``"mean ± std"``, or the bare mean for one seed,
    whose spread is unknown rather than zero."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


@contextlib.contextmanager
def png_figure(path, nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 110):
    """Yield ``(fig, axes)``, ``axes`` always a 2-D ``nrows x ncols`` array; on leaving the block the
    figure is laid out, written to ``path`` and closed (closed also when the block raises, and then
    nothing is written). Matplotlib's Agg backend: no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)

"""Figures written straight to PNG files, headless: the one plotting shell of the benchmarks,
``diffpolicy compare`` and the demo."""
from __future__ import annotations

import contextlib

__all__ = ["png_figure"]


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

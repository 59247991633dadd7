"""diffpolicy.plotting: the headless figure shell every benchmark and report draws through, and report file names."""
import pytest


def test_png_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    from diffpolicy.plotting import png_figure

    before = set(plt.get_fignums())
    with png_figure(tmp_path / "one.png") as (fig, axes):
        assert axes.shape == (1, 1)  # always 2-D, even for one panel
        axes[0, 0].plot([0, 1], [1, 0])
        assert fig.number in plt.get_fignums()
    with png_figure(tmp_path / "grid.png", 2, 3, figsize=(6, 4), dpi=50) as (fig, axes):
        assert axes.shape == (2, 3)
    assert set(plt.get_fignums()) == before
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (300, 200)  # figsize x dpi


def test_a_block_that_raises_writes_nothing_and_still_closes(tmp_path):
    import matplotlib.pyplot as plt

    from diffpolicy.plotting import png_figure

    before = set(plt.get_fignums())
    with pytest.raises(KeyError):
        with png_figure(tmp_path / "bad.png"):
            raise KeyError("no such curve")
    assert not (tmp_path / "bad.png").exists() and set(plt.get_fignums()) == before


def test_report_file_keeps_a_dotted_stem_and_accepts_the_reports_own_suffixes(tmp_path):
    from pathlib import Path

    from diffpolicy.plotting import report_file

    assert report_file(tmp_path / "x_tau0.9", ".json") == tmp_path / "x_tau0.9.json"  # with_suffix: x_tau0.json
    assert report_file("results/offline", ".md") == Path("results/offline.md")
    for given in ("results/offline.json", "results/offline.md", "results/offline.png"):
        assert report_file(given, ".png") == Path("results/offline.png")
    assert report_file("v1.0.json", ".md") == Path("v1.0.md")
    # the sweeps' per-run result stores sit beside their report under the same stem
    for given in ("results/offline", "results/offline.json"):
        assert report_file(given, "_runs") == Path("results/offline_runs")
    assert report_file("results/x_tau0.9", "_runs") == Path("results/x_tau0.9_runs")

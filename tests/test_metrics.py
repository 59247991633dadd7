"""Sliced Wasserstein: exact in 1-D, the closed form for shifted Gaussians, and the cached-reference form."""
import math

import pytest
import torch

from diffpolicy.metrics import SlicedWassersteinTo, sliced_wasserstein


def test_one_dimension_is_the_sorted_difference():
    x, y = torch.randn(400, 1, dtype=torch.float64), torch.rand(400, 1, dtype=torch.float64) * 3
    exact = ((x.sort(0).values - y.sort(0).values) ** 2).mean().sqrt()  # W2 of equal-size empirical laws
    assert sliced_wasserstein(x, y, n_projections=4) == pytest.approx(float(exact), rel=1e-9)


def test_shifted_gaussians_match_the_closed_form():
    # W2 between N(0, I) and N(m, I) along a unit direction theta is |theta . m|; E[(theta . m)^2] = |m|^2 / D
    gen = torch.Generator().manual_seed(0)
    m = torch.tensor([1.5, -0.5, 1.0])
    x, y = torch.randn(10000, 3, generator=gen), torch.randn(10000, 3, generator=gen) + m
    sw = sliced_wasserstein(x, y, n_projections=2000, generator=gen)
    assert sw == pytest.approx(math.sqrt(float(m @ m) / 3), rel=0.04)


def test_a_cached_reference_gives_the_same_distance_and_checks_shapes():
    x, y = torch.randn(300, 2), torch.randn(2000, 2) + 0.5
    ref = SlicedWassersteinTo(y, generator=torch.Generator().manual_seed(7))
    assert ref(x) == sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match=r"x must be \[N, 2\]"):
        ref(torch.randn(5, 3))
    with pytest.raises(ValueError, match="same D"):
        sliced_wasserstein(torch.randn(5, 3), y)

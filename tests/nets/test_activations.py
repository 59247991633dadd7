"""Our exp-only Mish against ``torch.nn.functional.mish`` (the independent reference): values,
first and second derivatives, over the whole float range including the clamp at ``x = 20``."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from diffpolicy.nets.activations import Mish, make_activation, mish

POINTS = [-200.0, -100.0, -40.0, -20.5, -5.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 19.9, 20.0, 20.1, 50.0, 1e4]


def _grid(dtype):
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor(POINTS, dtype=dtype), 6 * torch.randn(2000, generator=g, dtype=dtype)])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_mish_matches_torch_in_value_and_gradient(dtype, tol):
    x = _grid(dtype).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ours, ref = mish(x), F.mish(ref_x)
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    w = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=tol, atol=tol)
    assert torch.isfinite(x.grad).all()


def test_mish_derivatives_against_finite_differences():
    x = torch.tensor([-30.0, -3.0, -0.7, 0.0, 0.4, 2.5, 19.5, 25.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(mish, (x,))
    assert gradgradcheck(mish, (x,))  # double backward (gradient penalties) is exact too


def test_mish_module_and_fallbacks():
    x = torch.randn(64, 8)
    torch.testing.assert_close(Mish()(x), torch.nn.Mish()(x))
    assert isinstance(make_activation("Mish"), Mish)
    xb = x.to(torch.bfloat16)  # no exp path for bfloat16 (autocast): falls back to F.mish exactly
    assert torch.equal(mish(xb), F.mish(xb))
    with pytest.raises(ValueError, match="valid: elu, gelu, mish"):
        make_activation("swishy")


def test_mish_runs_under_torch_func_transforms():
    """TorchRL vmaps its value and Q-ensemble networks: vmap and grad must pass through our Mish."""
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(mish)(x), F.mish(x))
    g = torch.func.vmap(torch.func.grad(lambda v: mish(v).sum()))(x)
    ref_x = x.clone().requires_grad_()
    F.mish(ref_x).sum().backward()
    torch.testing.assert_close(g, ref_x.grad)

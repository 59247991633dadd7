"""A Gaussian target whose exact denoiser and PF-ODE flow map are known (shared by tests)."""
import torch

from diffpolicy.denoiser import DenoiserBase

MU = torch.tensor([[1.0, -0.5]])
COV = torch.tensor([[[0.5, 0.2], [0.2, 0.3]]])
N = 4000


def _sqrtm(m):
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag_embed(w.sqrt()) @ v.transpose(-1, -2)


class GaussianFlowMap(DenoiserBase):
    """The exact PF-ODE flow map x_t -> x_0 of N(mu, Sigma): the ideal consistency function.

    The flow is linear: x_t = alpha_t mu + C_t^{1/2} w with C_t = alpha_t^2 Sigma + sigma_t^2 I and
    w constant, so x_0 = mu + Sigma^{1/2} C_t^{-1/2} (x_t - alpha_t mu).
    """

    prediction = "x0"

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, cond=None):
        a, s = (v.double().view(-1, 1, 1) for v in self.schedule.alpha_sigma(t.double()))
        cov = COV[0].double()
        c_t = a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64)
        m = _sqrtm(cov) @ torch.linalg.inv(_sqrtm(c_t))
        d = x.double() - a[:, :, 0] * MU.double()
        return (MU.double() + (m @ d.unsqueeze(-1)).squeeze(-1)).to(x.dtype)


def moments_ok(out, mean_tol=0.05, cov_tol=0.06):
    m, c = out.mean(0), torch.cov(out.T)
    assert (m - MU[0]).abs().max() < mean_tol, f"mean {m.tolist()} vs {MU[0].tolist()}"
    assert (c - COV[0]).abs().max() < cov_tol, f"cov {c.tolist()} vs {COV[0].tolist()}"

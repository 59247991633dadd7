"""Progressive distillation: the target by hand, and one round that halves the steps on a 2-D toy."""
import torch

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser, DenoiserBase
from diffpolicy.distill import progressive_distillation_loss, student_timesteps
from diffpolicy.ema import EMA
from diffpolicy.metrics import SlicedWassersteinTo
from diffpolicy.nets import MLPDenoiser
from diffpolicy.samplers import prior, run_sampler
from diffpolicy.toys import GaussianMixtureDenoiser

MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]])
COVS = torch.stack([torch.eye(2) * 0.05] * 3)


def _data(n, gen):
    k = torch.randint(0, 3, (n,), generator=gen)
    return MEANS[k] + 0.05**0.5 * torch.randn(n, 2, generator=gen)


class _Probe(DenoiserBase):
    """An x0-student whose prediction is a free tensor ``p`` (one value per element); records its inputs."""

    def __init__(self, sched, p):
        super().__init__()
        self.schedule, self.prediction = sched, "x0"
        self.p = torch.nn.Parameter(p)
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.p


def test_the_target_makes_one_ddim_step_land_on_the_teachers_two():
    """Salimans & Ho Alg. 2: a student predicting the loss's target x~ as its x0 takes ONE DDIM step
    t -> t'' to where the teacher's TWO DDIM steps t -> t' -> t'' land (the library's DDIM sampler on
    the teacher's grid). x~ is read off the loss as a black box: the loss is w (p - x~)^2 per element,
    so its p-gradients g at p = 0 and p = 1 give x~ = g(0) / (g(0) - g(1)), whatever the weight w,
    and w itself (Salimans & Ho §4's truncated SNR, max(alpha^2 / sigma^2, 1))."""
    sched = S.DiscreteVP(1000, "linear")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="eps")
    x0 = _data(256, torch.Generator().manual_seed(0)).double()
    grads, seen = [], []
    for value in (0.0, 1.0):
        probe = _Probe(sched, torch.full_like(x0, value))
        progressive_distillation_loss(probe, teacher, x0, student_steps=2,
                                      generator=torch.Generator().manual_seed(1)).sum().backward()
        grads.append(probe.p.grad)
        seen += probe.seen
    assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0])  # the same draws at p = 0 and p = 1
    x_tilde = grads[0] / (grads[0] - grads[1])
    z, t = seen[0]
    a_t, s_t = sched.alpha_sigma(t)
    weight = (grads[1] - grads[0]) * x0.shape[1] / 2  # d/dp of w mean_j (p_j - x~_j)^2 = 2 w (p - x~) / d
    torch.testing.assert_close(weight, (a_t**2 / s_t**2).clamp_min(1.0)[:, None].expand_as(weight))  # truncated SNR
    ts = sched.timesteps(4).double()  # the teacher's grid; student steps go t_0 -> t_2 -> t_4
    i = (t[:, None] == ts).double().argmax(1)
    assert set(i.tolist()) == {0, 2}  # both student steps were drawn
    for k in (0, 2):
        rows = i == k
        with torch.no_grad():
            two = run_sampler("ddim", teacher, z[rows].clone(), ts[k:k + 3])  # t -> t' -> t''
        (a, s), (a2, s2) = sched.alpha_sigma(ts[k]), sched.alpha_sigma(ts[k + 2])
        eps_student = (z[rows] - a * x_tilde[rows]) / s  # DDIM: eps implied by the x0 prediction
        one = a2 * x_tilde[rows] + s2 * eps_student     # one step t -> t''
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-8)
        assert float((two - z[rows]).abs().mean()) > 0.05  # a real move, not a fixed point


def test_one_round_halves_the_steps_and_beats_the_teacher_at_the_same_steps():
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "linear")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="eps")
    student = Denoiser(MLPDenoiser(2, hidden=128, depth=3, time_dim=32), sched, "v")
    ema = EMA(student, 0.99, warmup=True)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        loss = progressive_distillation_loss(student, teacher, _data(256, gen), student_steps=2, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(student)
    swd = SlicedWassersteinTo(_data(20000, torch.Generator().manual_seed(9)), generator=torch.Generator().manual_seed(3))

    def quality(model, ts):
        x = prior(model, (4000, 2), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return swd(run_sampler("ddim", model, x, ts).float())

    teacher4, teacher2 = quality(teacher, sched.timesteps(4)), quality(teacher, sched.timesteps(2))
    student2 = quality(ema.module.eval(), student_timesteps(sched, 2))
    assert student2 < 0.6 * teacher2, (student2, teacher2, teacher4)   # what distillation buys
    assert student2 < 1.1 * teacher4, (student2, teacher4)              # ~ its 4-step teacher (0.358 vs 0.358)

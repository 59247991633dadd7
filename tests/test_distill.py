"""Progressive distillation: the target by hand, and one round that halves the steps on a 2-D toy."""
import torch

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser
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


def test_the_target_makes_one_ddim_step_land_on_the_teachers_two():
    sched = S.DiscreteVP(1000, "linear")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="eps")

    class Perfect(torch.nn.Module):  # a student whose x0 is the PD target: its loss must be 0
        prediction, schedule = "x0", sched

        def x0_eps(self, x, t, cond=None):
            ts = sched.timesteps(4)
            t1 = torch.stack([ts[(ts == tt).nonzero()[0, 0] + 1] for tt in t.double()]).float()
            t2 = torch.stack([ts[(ts == tt).nonzero()[0, 0] + 2] for tt in t.double()]).float()
            step = lambda x, a, b: (lambda x0e: sched.alpha_sigma(b)[0][:, None] * x0e[0]
                                    + sched.alpha_sigma(b)[1][:, None] * x0e[1])(teacher.x0_eps(x, a))
            z2 = step(step(x, t, t1), t1, t2)
            (a, s), (a2, s2) = sched.alpha_sigma(t), sched.alpha_sigma(t2)
            r = (s2 / s)[:, None]
            return ((z2 - r * x) / (a2[:, None] - r * a[:, None])).float(), None

    x0 = _data(64, torch.Generator().manual_seed(0))
    loss = progressive_distillation_loss(Perfect(), teacher, x0, student_steps=2,
                                         generator=torch.Generator().manual_seed(1))
    assert loss.shape == (64,) and float(loss.max()) < 1e-8


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

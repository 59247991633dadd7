"""train_student: a resumed run equals a straight one (student, EMA and auxiliary optimiser
states included), the config is checked, and a non-finite loss stops with its step."""
import pytest
import torch

from diffpolicy import schedules as S
from diffpolicy.denoiser import Denoiser
from diffpolicy.distill import fake_score_loss, one_step, score_distillation_loss
from diffpolicy.distill.train import train_student
from diffpolicy.nets import MLPDenoiser
from diffpolicy.toys import GaussianMixtureDenoiser
from diffpolicy.checkpoint import load_checkpoint

MEANS, COVS = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.stack([torch.eye(2) * 0.1] * 2)


def _run(steps, run_dir=None):
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000, "squaredcos_cap_v2")
    teacher = GaussianMixtureDenoiser(sched, MEANS, COVS, prediction="x0")
    student = Denoiser(MLPDenoiser(2, hidden=32, depth=2), sched, "x0")
    fake = Denoiser(MLPDenoiser(2, hidden=32, depth=2), sched, "x0")
    fake_opt = torch.optim.Adam(fake.parameters(), lr=1e-3)

    def loss(step, g):
        x = one_step(student, torch.randn(16, 2, generator=g))
        fl = fake_score_loss(fake, x, generator=g).mean()
        fake_opt.zero_grad()
        fl.backward()
        fake_opt.step()
        return score_distillation_loss(x, teacher, fake=fake, weighting="dmd", generator=g).mean()

    out = train_student(student, loss, steps=steps, lr=1e-3, run_dir=run_dir, config={"method": "dmd"},
                        aux={"fake": fake, "fake_opt": fake_opt}, log_every=5, checkpoint_every=5, progress=False)
    return out, fake


def test_resume_equals_a_straight_run(tmp_path):
    straight, fake_a = _run(20)
    _run(10, tmp_path)
    resumed, fake_b = _run(20, tmp_path)
    for a, b in zip([*straight["ema"].parameters(), *fake_a.parameters()], [*resumed["ema"].parameters(), *fake_b.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["step"] for h in resumed["history"]] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="different configuration"):
        train_student(torch.nn.Linear(2, 2), lambda s, g: torch.zeros(()), steps=30, run_dir=tmp_path,
                      config={"method": "cd"}, progress=False)


def test_a_non_finite_loss_names_its_step(tmp_path):
    net = torch.nn.Linear(2, 2)
    loss = lambda step, g: net.weight.sum() * (float("nan") if step == 6 else 1.0)  # noqa: E731
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        train_student(net, loss, steps=20, run_dir=tmp_path, log_every=5, checkpoint_every=5, progress=False)
    assert load_checkpoint(tmp_path)["state"]["step"] == 5

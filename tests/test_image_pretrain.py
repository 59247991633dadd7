"""Image pre-training: every family trains and samples through one entry point; runs resume exactly."""
import pytest
import torch

from diffpolicy.images import FAMILIES, ImagePretrainConfig, pretrain_images, sample_images

SAMPLER = {"ct": ("consistency", 2), "rf": ("euler", 5), "trigflow": ("trigflow", 2)}


def _cfg(family, steps=40, **kw):
    return ImagePretrainConfig(**{"family": family, "steps": steps, "batch_size": 32, "base_channels": 8,
                                  "log_every": 10, "lr": 1e-3, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_and_samples(family):
    out = pretrain_images(_cfg(family), progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    if family != "ct":  # the consistency loss is not monotone (its discretisation curriculum moves)
        assert losses[-1] < 0.8 * losses[0], losses
    sampler, steps = SAMPLER.get(family, ("ddim", 5))
    x = sample_images(out["ema"], 6, 8, steps, sampler, labels=torch.arange(6), guidance=2.0,
                      generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 8, 8) and bool(x.isfinite().all()) and float(x.abs().max()) <= 1.0


def test_pretraining_resumes_exactly_and_refuses_other_settings(tmp_path):
    straight = pretrain_images(_cfg("ddpm_eps", steps=20), progress=False)
    pretrain_images(_cfg("ddpm_eps", steps=10, checkpoint_every=10), run_dir=tmp_path, progress=False)
    resumed = pretrain_images(_cfg("ddpm_eps", steps=20, checkpoint_every=10), run_dir=tmp_path, progress=False)
    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["step"] for h in resumed["history"]] == [10, 20]
    assert (tmp_path / "train.csv").read_text().count("\n") == 3 and (tmp_path / "tb").is_dir()
    with pytest.raises(ValueError, match="different configuration"):
        pretrain_images(_cfg("ddpm_eps", steps=30, lr=3e-4), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown image family 'gan'"):
        pretrain_images(_cfg("gan"), progress=False)
    with pytest.raises(ValueError, match="divisible by 2"):
        pretrain_images(_cfg("ddpm_eps"), data=(torch.zeros(4, 1, 7, 7), torch.zeros(4, dtype=torch.long)),
                        progress=False)


def test_a_non_finite_loss_stops_with_its_step_before_saving(tmp_path):
    x = torch.zeros(8, 1, 8, 8)
    x[3] = float("nan")  # one poisoned image: the first batch that draws it gives a nan loss
    with pytest.raises(FloatingPointError, match=r"loss is nan at step \d+"):
        pretrain_images(_cfg("ddpm_eps", steps=20, checkpoint_every=20), data=(x, torch.zeros(8, dtype=torch.long)),
                        run_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_image_grid_tiles_row_major_and_pads_with_black():
    from diffpolicy.images import image_grid

    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    tile = image_grid(x, cols=2)
    assert tile.shape == (4, 4)
    torch.testing.assert_close(tile, torch.tensor([[0., 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1], [2, 2, -1, -1]]))

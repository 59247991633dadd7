"""Image data and offline metrics: closed forms for FID, KID and precision / recall, a digit
classifier that is accurate on held-out digits, and FID that is ~0 for real data and grows with noise."""
import numpy as np
import pytest
import scipy.linalg
import torch

from diffpolicy.images import ImageMetrics, augment, frechet_distance, kid, load_digits, load_image_folder, precision_recall
from diffpolicy.images.metrics import DigitClassifier


def test_frechet_distance_against_scipy_and_the_diagonal_closed_form():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(6, 6, generator=gen, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    ma, mb = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    ref = float((ma - mb) @ (ma - mb) + np.trace(ca.numpy() + cb.numpy() - 2 * scipy.linalg.sqrtm(ca.numpy() @ cb.numpy()).real))
    assert frechet_distance(ma, ca, mb, cb) == pytest.approx(ref, rel=1e-8)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, 2.0, 3.0])  # diagonal: sum (s1 - s2)^2
    assert frechet_distance(torch.zeros(3), torch.diag(s1**2), torch.ones(3), torch.diag(s2**2)) == pytest.approx(
        3 + float(((s1 - s2) ** 2).sum()))
    assert frechet_distance(ma, ca, ma, ca) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_unbiased_near_zero_and_precision_recall_on_simple_sets():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    same, shifted = kid(x, y, generator=gen), kid(x, y + 1.0, generator=gen)
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    p, r = precision_recall(x, y + 100.0)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(x, x[:, :] * 0.1)  # collapsed to the centre: precise, little recall
    assert p > 0.9 and r < 0.5


def test_kid_is_the_unbiased_polynomial_mmd_by_a_double_loop():
    """One subset of the whole sets (MMD^2 does not depend on the order) against the unbiased
    estimator of Binkowski et al. 2018 written out pair by pair, kernel ``(x.y / d + 1)^3``."""
    gen = torch.Generator().manual_seed(2)
    m = 9  # both sets the size of one subset
    x, y = torch.randn(m, 5, generator=gen, dtype=torch.float64), torch.randn(m, 5, generator=gen, dtype=torch.float64) + 0.3
    k = lambda a, b: (float(a @ b) / 5 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert kid(x, y, subsets=3, subset_size=m, generator=gen) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_precision_recall_on_a_hand_made_set():
    """k = 1 on the line. Real {0, 1, 3}: radii 1, 1, 2. Fake {0.5, 0.7, 6}: radii 0.2, 0.2, 5.3.
    Precision: 0.5 and 0.7 lie in real balls, 6 does not (3 + 2 < 6): 2/3. Recall: 0 lies in no
    fake ball (0.5 > 0.2, 6 > 5.3), 1 and 3 lie in 6's ball: 2/3."""
    real, fake = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [0.7], [6.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3)
    assert precision_recall(fake, real, k=1) == pytest.approx((r, p))  # the roles swap


def test_digits_data_splits_augment_and_folders(tmp_path):
    x, y = load_digits(8, "train")
    xh, yh = load_digits(8, "held_out")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xh) == 1797 and float(x.min()) == -1 and float(x.max()) == 1
    assert sorted(set(yh.tolist())) == list(range(10))
    assert load_digits(16, "all")[0].shape == (1797, 1, 16, 16)
    shifted = augment(x[:64], shift=1, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == x[:64].shape and not torch.equal(shifted, x[:64])
    assert torch.equal(augment(x[:8], shift=0), x[:8])
    with pytest.raises(ValueError, match="size must be 8"):
        load_digits(12)
    from PIL import Image

    for cls, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    imgs, labels, names = load_image_folder(tmp_path, size=8, channels=1)
    assert imgs.shape == (4, 1, 8, 8) and names == ["cats", "dogs"] and labels.tolist() == [0, 0, 1, 1]
    assert float(imgs[0].max()) == -1.0 and float(imgs[3].min()) == 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    clf = DigitClassifier.trained(8, steps=800, cache_dir=tmp_path_factory.mktemp("models"))
    return ImageMetrics(8, classifier=clf)


def test_the_classifier_reads_held_out_digits(metrics):
    assert metrics.accuracy(metrics.real, metrics.real_labels) > 0.93


def test_fid_is_small_for_real_digits_and_grows_with_noise(metrics):
    floor, ceiling = metrics.floor(), metrics.ceiling()
    gen = torch.Generator().manual_seed(0)
    x, y = load_digits(8, "train")
    x, y = x[: len(metrics.real)], y[: len(metrics.real)]
    noisy = [metrics.evaluate((x + s * torch.randn(x.shape, generator=gen)).clamp(-1, 1))["fid"] for s in (0.2, 0.5, 1.0)]
    assert floor["fid"] < noisy[0] < noisy[1] < noisy[2] < ceiling["fid"]
    assert floor["fid"] < 0.1 * ceiling["fid"] and floor["class_accuracy"] > 0.93
    assert floor["precision"] > 0.6 and floor["recall"] > 0.6 and ceiling["precision"] < 0.5 * floor["precision"]
    same = metrics.evaluate(metrics.real)  # identical sets
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate(torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        metrics.evaluate(torch.zeros(4, 1, 16, 16))


def test_a_corrupt_classifier_cache_is_retrained(tmp_path):
    path = tmp_path / "digits_cnn_8px_5steps_seed0.pt"
    path.write_bytes(b"not a checkpoint")
    clf = DigitClassifier.trained(8, steps=5, cache_dir=tmp_path)
    assert isinstance(clf, DigitClassifier) and torch.load(path, weights_only=True)

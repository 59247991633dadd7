"""Offline image-quality metrics from a small digit classifier trained here (no weight downloads).

The classifier (:class:`DigitClassifier`, a 3-layer CNN) is trained on the train split of the
digits and cached; its 64-d penultimate activations are the feature space of

- FID (Heusel et al. 2017 eq. 6): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``
  (:func:`frechet_distance`; the symmetric form of ``(S_a S_b)^1/2``, exact for PSD matrices);
- KID (Binkowski et al. 2018 eq. 4): the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (:func:`kid`);
- precision / recall (Kynkaanniemi et al. 2019 eqs. 1-3): the fraction of generated samples
  inside the k-NN balls of the real ones, and the converse (:func:`precision_recall`);

and its predictions give the class accuracy of class-conditional samples. :class:`ImageMetrics`
bundles them against the held-out digits and reports the floor (real train vs held-out) and
ceiling (uniform noise vs held-out) that calibrate them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import augment, load_digits

__all__ = ["DigitClassifier", "ImageMetrics", "frechet_distance", "kid", "precision_recall"]


def frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)`` (float64 eigendecompositions)."""
    mu_a, mu_b, cov_a, cov_b = (v.double() for v in (mu_a, mu_b, cov_a, cov_b))
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def _mean_cov(f: Tensor) -> tuple[Tensor, Tensor]:
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def fid_from_features(a: Tensor, b: Tensor) -> float:
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
    return frechet_distance(*_mean_cov(a), *_mean_cov(b))


def kid(a: Tensor, b: Tensor, subsets: int = 10, subset_size: int = 500, generator: torch.Generator | None = None
        ) -> float:
    """Kernel inception distance: mean over ``subsets`` of the unbiased MMD^2 of ``subset_size`` draws."""
    a, b = a.double(), b.double()
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=torch.float64)
        vals.append(float((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()))
    return float(np.mean(vals))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds of each set; ``k = 3`` as in the paper)."""
    real, fake = real.double(), fake.double()

    def radii(f):
        d = torch.cdist(f, f)
        return d.kthvalue(k + 1, dim=1).values  # the 0 to itself is the first

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None]).any(1).double().mean()

    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


class DigitClassifier(nn.Module):
    """A small CNN on ``[N, 1, s, s]`` digits in ``[-1, 1]``; ``features`` is its 64-d penultimate layer."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * width, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    @classmethod
    def trained(cls, size: int = 8, steps: int = 2000, cache_dir=None, seed: int = 0, progress: bool = False
                ) -> "DigitClassifier":
        """The classifier for ``size``-pixel digits, trained on the train split (cached in
        ``cache_dir``, default ``$DIFFPOLICY_HOME/models`` or ``~/.diffpolicy/models``)."""
        root = Path(cache_dir or Path(os.environ.get("DIFFPOLICY_HOME", Path.home() / ".diffpolicy")) / "models")
        path = root / f"digits_cnn_{size}px_{steps}steps_seed{seed}.pt"
        model = cls()
        if path.exists():
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return model.eval()
            except Exception:  # a corrupt or incompatible cache (any unpickling error) is retrained, not trusted
                pass
        x, y = load_digits(size, "train")
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls()
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            it = range(steps)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="digit classifier", leave=False)
            for _ in it:
                idx = torch.randint(0, len(y), (128,), generator=gen)
                loss = F.cross_entropy(model(augment(x[idx], generator=gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        return model.eval()


class ImageMetrics:
    """FID, KID, precision / recall and class accuracy of samples against the held-out digits."""

    def __init__(self, size: int = 8, classifier: DigitClassifier | None = None, **train_kw):
        self.size = size
        self.clf = classifier if classifier is not None else DigitClassifier.trained(size, **train_kw)
        self.real, self.real_labels = load_digits(size, "held_out")
        self.real_features = self.features(self.real)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, self.size, self.size):
            raise ValueError(f"images must be [N, 1, {self.size}, {self.size}] in [-1, 1], got {tuple(x.shape)}")
        if not bool(x.isfinite().all()):
            raise ValueError("images contain NaN or inf")
        return torch.cat([self.clf.features(c.float()) for c in x.split(512)])

    @torch.no_grad()
    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        """Fraction of ``x`` the classifier assigns to ``labels`` (class-conditional samples)."""
        pred = torch.cat([self.clf(c.float()).argmax(-1) for c in x.split(512)])
        return float((pred == labels.to(pred.device)).double().mean())

    def evaluate(self, x: Tensor, labels: Tensor | None = None, seed: int = 0) -> dict[str, float]:
        f = self.features(x.clamp(-1, 1))
        p, r = precision_recall(self.real_features, f)
        out = {"fid": fid_from_features(f, self.real_features),
               "kid": kid(f, self.real_features, generator=torch.Generator().manual_seed(seed)),
               "precision": p, "recall": r}
        if labels is not None:
            out["class_accuracy"] = self.accuracy(x, labels)
        return out

    def floor(self) -> dict[str, float]:
        """Real (train split) against real (held-out): the best a generator can score here."""
        x, y = load_digits(self.size, "train")
        n = len(self.real)
        return self.evaluate(x[:n], y[:n])

    def ceiling(self, seed: int = 0) -> dict[str, float]:
        """Uniform noise against the held-out digits: the worst reference."""
        g = torch.Generator().manual_seed(seed)
        return self.evaluate(torch.rand(len(self.real), 1, self.size, self.size, generator=g) * 2 - 1)

"""Image data: scikit-learn's bundled 8x8 digits (optionally 16x16) and any folder of images.

Images are float tensors ``[N, C, H, W]`` in ``[-1, 1]`` (the data range of the diffusion
schedules), with integer class labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits", "load_image_folder", "augment", "image_grid", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_digits(size: int = 8, split: str = "train", held_out_fraction: float = 0.2, seed: int = 0
                ) -> tuple[Tensor, Tensor]:
    """The 1797 scikit-learn digits as ``([N, 1, size, size] in [-1, 1], labels [N])``.

    ``size`` 8 (native) or 16 (bilinear upsampling). ``split``: ``"train"``, ``"held_out"`` (a
    fixed ``held_out_fraction`` of each class, chosen by ``seed``; metrics compare against it) or
    ``"all"``.
    """
    from sklearn.datasets import load_digits as sk_digits

    if size not in (8, 16):
        raise ValueError(f"size must be 8 (native) or 16 (upsampled), got {size}")
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    if size == 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    if split == "all":
        return x, y
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every class
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held[idx[: int(round(held_out_fraction * len(idx)))]] = True
    keep = held if split == "held_out" else ~held
    return x[keep], y[keep]


def augment(x: Tensor, *, shift: int = 1, flip: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Random translations by up to ``shift`` pixels (edges padded with the background ``-1``) and,
    with ``flip``, random horizontal flips (off by default: a flipped digit is another shape)."""
    if shift:
        n, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def load_image_folder(path, size: int = 32, channels: int = 3) -> tuple[Tensor, Tensor, list[str]]:
    """All images under ``path`` as ``([N, channels, size, size] in [-1, 1], labels [N], class_names)``.

    Images in sub-folders take the sub-folder's name as their class (sorted, ``labels`` index
    ``class_names``); images directly in ``path`` are class ``0`` of ``[""]``. Every image is
    converted to grayscale (``channels=1``) or RGB (``3``) and resized to ``size x size``.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    classes = sorted({p.parent.relative_to(root).as_posix() if p.parent != root else "" for p in files})
    index = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0 * 2.0 - 1.0
        except OSError as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
        images.append(torch.from_numpy(arr).reshape(size, size, channels).permute(2, 0, 1))
        labels.append(index[p.parent.relative_to(root).as_posix() if p.parent != root else ""])
    return torch.stack(images), torch.tensor(labels), classes


def image_grid(x: Tensor, cols: int = 10) -> Tensor:
    """One-channel images ``[N, 1, s, s]`` tiled row-major into ``[rows * s, cols * s]``, empty
    cells at -1 (black)."""
    n, _, s, w = x.shape
    rows = -(-n // cols)
    padded = torch.full((rows * cols, s, w), -1.0, dtype=x.dtype)
    padded[:n] = x[:, 0].detach().cpu()
    return padded.reshape(rows, cols, s, w).permute(0, 2, 1, 3).reshape(rows * s, cols * w)

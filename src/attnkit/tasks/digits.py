"""Handwritten digits (scikit-learn's bundled copy of the UCI set): a 10-class image task for 2-D mechanisms.

``sklearn.datasets.load_digits`` reads 1,797 grey 8 x 8 images (values 0..16) from a file inside the
scikit-learn package, so nothing is downloaded. A seeded permutation holds out a fifth of them as the test set;
training batches are drawn with replacement from the rest. The images are scaled to [0, 1] and, for ``n = 16``
or ``n = 4`` tokens, average-pooled to 4 x 4 or 2 x 2 (a quick, coarser task for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..records import register

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class ImageTask:
    """Images ``(size, h, w, 1)`` (float32) and class labels ``(size,)`` (int64); ``n = h * w`` tokens.

    :meth:`batch` is a pure function of ``(seed, step)``, drawn from the training images only;
    :meth:`test_batch` walks the held-out images in order (``index`` past the end gives an empty batch)."""

    name: str
    grid: tuple
    classes: int
    seed: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    settings: dict

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    def batch(self, size: int, step: int = 0):
        idx = np.random.default_rng((self.seed, step)).integers(0, len(self.train_labels), size)
        return self.train_images[idx, ..., None], self.train_labels[idx]

    def test_batch(self, size: int, index: int = 0):
        s = slice(index * size, (index + 1) * size)
        return self.test_images[s, ..., None], self.test_labels[s]


def digits(n: int = 64, *, seed: int = 0) -> ImageTask:
    """The digits task on ``n`` tokens: 64 (the 8 x 8 images), 16 (pooled to 4 x 4) or 4 (2 x 2)."""
    side = {64: 8, 16: 4, 4: 2}.get(n)
    if side is None:
        raise ValueError(f"digits: n must be 64, 16 or 4 tokens (8 x 8 images, pooled), got {n=}")
    from sklearn.datasets import load_digits  # optional until used: the quality suite's image rows need it

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    f = 8 // side
    images = images.reshape(-1, side, f, side, f).mean((2, 4))
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(round(len(images) * (1 - TEST_FRACTION)))
    tr, te = order[:cut], order[cut:]
    labels = data.target.astype(np.int64)
    return ImageTask("digits", (side, side), 10, seed, images[tr], labels[tr], images[te], labels[te], {})


register(
    "digits",
    family="J",
    kind="task",
    paper="Optical Recognition of Handwritten Digits (UCI; scikit-learn's load_digits)",
    exact=True,
    supports={"spatial"},
    factory=digits,
    summary="classify 8 x 8 handwritten digits (1,797 images bundled in scikit-learn), a fifth held out",
    source=digits,
)

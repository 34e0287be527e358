"""Generated shape images: a 6-class image task for 2-D mechanisms, drawn by seed with numpy (no download).

Generation rule: every image is ``side x side`` grey pixels (default 12 x 12, ``n = 144`` tokens) holding one
shape of class ``square`` (filled), ``frame`` (a 1-pixel square outline), ``circle`` (a filled disc),
``triangle`` (filled, apex up), ``cross`` (a plus sign) or ``diagonal`` (an X), drawn in a bounding box of
``s x s`` pixels, ``s`` uniform in ``5 .. min(9, side - 2)``, at a uniform position inside the image. Pixels
inside the shape get a foreground level drawn per image from ``[0.75, 1]``, the others a background level from
``[0, 0.25]``, and every pixel adds uniform noise in ``[-0.2, 0.2]`` (then clipped to ``[0, 1]``).

The label is determined by the image: the noise never crosses 0.5 (foreground >= 0.55, background <= 0.45),
so thresholding at 0.5 recovers the shape's exact mask, and the generator refuses to run if two classes draw
the same mask (cropped to its bounding box) at any size; :func:`solve` is that hand-written classifier.
Classes, sizes and positions are uniform; ``train`` images (default 4,096) and ``test`` images (default 1,024)
are drawn from independent streams of ``seed``.

Why 12 x 12: every registered 2-D mechanism builds its grid for 144 tokens (``halo_2d`` and MaxViT need a side
divisible by 4, ``dilated_neighborhood_2d`` a side of at least 10), and at 144 tokens a 7 x 7 neighbourhood
covers a third of the image, not almost all of it as on the 8 x 8 digits.
"""

from __future__ import annotations

import numpy as np

from ..errors import bad
from ..records import register
from .digits import ImageTask

CLASSES = ("square", "frame", "circle", "triangle", "cross", "diagonal")
MIN_SIZE, MAX_SIZE = 5, 9
#: The foreground and background levels and the noise amplitude (foreground - noise > 0.5 > background + noise).
FOREGROUND, BACKGROUND, NOISE = (0.75, 1.0), (0.0, 0.25), 0.2


def template(shape: str, s: int) -> np.ndarray:
    """The boolean ``s x s`` mask of ``shape`` in its bounding box."""
    i, j = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "frame":
        return (i == 0) | (j == 0) | (i == s - 1) | (j == s - 1)
    if shape == "circle":
        return (i - c) ** 2 + (j - c) ** 2 <= (s / 2) ** 2 - 0.5
    if shape == "triangle":
        return np.abs(j - c) <= c * i / (s - 1) + 0.5  # one (odd s) or two pixels at the apex, full at the base
    if shape == "cross":
        w = 1 if s % 2 else 2
        lo = (s - w) // 2
        return ((i >= lo) & (i < lo + w)) | ((j >= lo) & (j < lo + w))
    if shape == "diagonal":
        return (i == j) | (i + j == s - 1)
    raise ValueError(bad("shape", f"one of {CLASSES}", repr(shape)))


def _crop(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(rows):
        return mask[:0, :0]
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _key(mask: np.ndarray) -> tuple:
    m = _crop(mask)
    return m.shape, m.tobytes()


def _templates(side: int) -> tuple[list, dict]:
    """Every ``(class, size)`` template for images of ``side`` pixels, and the map from a cropped mask to its class;
    raises if two classes share a mask (the label would not be determined by the image)."""
    sizes = range(MIN_SIZE, min(MAX_SIZE, side - 2) + 1)
    out, lookup = [], {}
    for label, shape in enumerate(CLASSES):
        for s in sizes:
            t = template(shape, s)
            key = _key(t)
            if lookup.get(key, label) != label:
                raise AssertionError(f"shapes: {shape} and {CLASSES[lookup[key]]} draw the same {s}x{s} mask")
            lookup[key] = label
            out.append((label, t))
    return out, lookup


def _draw(rng, side: int, count: int, templates: list) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(CLASSES), count)
    per_class = len(templates) // len(CLASSES)
    which = labels * per_class + rng.integers(0, per_class, count)
    masks = np.zeros((count, side, side), bool)
    for b, t in enumerate(which):
        m = templates[t][1]
        s = m.shape[0]
        r, c = rng.integers(0, side - s + 1, 2)
        masks[b, r : r + s, c : c + s] = m
    fg = rng.uniform(*FOREGROUND, (count, 1, 1))
    bg = rng.uniform(*BACKGROUND, (count, 1, 1))
    noise = rng.uniform(-NOISE, NOISE, (count, side, side))
    images = np.clip(np.where(masks, fg, bg) + noise, 0, 1).astype(np.float32)
    return images, labels.astype(np.int64)


def solve(images: np.ndarray) -> np.ndarray:
    """The hand-written classifier: threshold at 0.5, crop to the shape's bounding box, look the mask up among
    the templates. ``images`` is ``(size, side, side)`` or ``(size, side, side, 1)``; returns the labels."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    lookup = _templates(images.shape[1])[1]
    return np.array([lookup.get(_key(im > 0.5), -1) for im in images], np.int64)


def shapes(n: int = 144, *, seed: int = 0, train: int = 4096, test: int = 1024) -> ImageTask:
    """The shapes task on ``n = side * side`` tokens (``side`` from 8 to 32; default 12 x 12)."""
    side = int(round(n**0.5))
    if isinstance(n, bool) or not isinstance(n, int) or side * side != n or not 8 <= side <= 32:
        raise ValueError("shapes: " + bad("n", "a square number of tokens from 64 (8 x 8) to 1024 (32 x 32)", n))
    for arg, value in (("train", train), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("shapes: " + bad(arg, "an int >= 1 (images)", repr(value)))
    templates, _ = _templates(side)
    tr_x, tr_y = _draw(np.random.default_rng((seed, 0)), side, train, templates)
    te_x, te_y = _draw(np.random.default_rng((seed, 1)), side, test, templates)
    settings = {"classes": CLASSES, "train": train, "test": test}
    return ImageTask("shapes", (side, side), len(CLASSES), seed, tr_x, tr_y, te_x, te_y, settings)


register(
    "shapes",
    family="J",
    kind="task",
    paper="generated here: square, frame, circle, triangle, cross and X images with noise (attnkit)",
    exact=True,
    supports={"spatial"},
    factory=shapes,
    summary="classify 12 x 12 noisy generated shapes (6 classes) at random position and size",
    source=shapes,
)

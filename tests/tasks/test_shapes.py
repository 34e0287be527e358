"""The generated shape images: seeded, in range, balanced, and labelled as the hand-written solver reads them."""

import numpy as np
import pytest

from attnkit import registry
from attnkit.tasks import ImageTask, shapes


def test_the_record_is_a_spatial_task():
    rec = registry.get("shapes")
    assert rec.family == "J" and rec.kind == "task" and rec.supports == {"spatial"}


def test_images_are_seeded_float_in_range_and_balanced():
    task = registry.get("shapes").make(144, seed=3)
    assert isinstance(task, ImageTask) and task.grid == (12, 12) and task.n == 144 and task.classes == 6
    assert task.train_images.shape == (4096, 12, 12) and task.test_images.shape == (1024, 12, 12)
    x, y = task.batch(7, step=2)
    assert x.shape == (7, 12, 12, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0 <= task.train_images.min() and task.train_images.max() <= 1
    assert np.bincount(task.train_labels, minlength=6).min() > 4096 / 6 * 0.8
    same = shapes.shapes(144, seed=3)
    assert (same.train_images == task.train_images).all() and (same.test_labels == task.test_labels).all()
    assert not (shapes.shapes(144, seed=4).train_images == task.train_images).all()
    train = {im.tobytes() for im in task.train_images}
    assert not any(im.tobytes() in train for im in task.test_images)  # independent noise draws
    assert (task.batch(7, step=2)[0] == x).all() and not (task.batch(7, step=3)[0] == x).all()


@pytest.mark.parametrize("n", [64, 144, 256])
def test_the_solver_reads_every_label_off_its_image(n):
    task = shapes.shapes(n, seed=0, train=512, test=512)
    assert (shapes.solve(task.test_images) == task.test_labels).all()
    assert (shapes.solve(task.batch(64)[0]) == task.batch(64)[1]).all()
    fg = task.test_images > 0.5
    assert 0.02 < fg.mean() < 0.6  # the shapes are neither specks nor the whole image


def test_the_classes_are_the_drawn_templates():
    assert shapes.template("square", 5).all() and shapes.template("frame", 5).sum() == 16
    assert shapes.template("cross", 5).sum() == 9 and shapes.template("diagonal", 5).sum() == 9
    tri = shapes.template("triangle", 7)
    assert tri[0].sum() == 1 and tri[-1].all() and (np.diff(tri.sum(1)) >= 0).all()
    disc = shapes.template("circle", 7)
    assert not disc[0, 0] and disc[3].all() and (disc == disc.T).all()


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"n": 100 + 1}, "n"),
        ({"n": 49}, "n"),
        ({"n": 36 * 36}, "n"),
        ({"n": 144, "train": 0}, "train"),
        ({"n": 144, "test": -1}, "test"),
        ({"n": 144.0}, "n"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        shapes.shapes(**kwargs)
    with pytest.raises(ValueError, match="shape"):
        shapes.template("hexagon", 5)

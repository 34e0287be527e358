"""The trained-quality suite: its rows come from the registry, and a tiny dense model learns MQAR."""

from attnkit import registry
from attnkit.bench import quality
from attnkit.bench.suite import BENCH_SUITES, SUITES

TINY = dict(
    widths=(16,), steps=1, batch=2, eval_batches=1, tasks=(("mqar", 16, {"pairs": 2}), ("in_context_recall", 16, {}))
)


def test_the_mechanisms_come_from_the_registry():
    causal = quality.causal_mechanisms()
    expected = {
        r.name
        for r in registry.records()
        if r.kind in ("pattern", "selector", "function", "layer") and "causal" in r.supports
    }
    assert {r.name for r in causal} == expected
    assert set(quality.QUICK) <= expected and quality.DENSE in expected
    assert "quality" in SUITES and "quality" not in BENCH_SUITES  # the quick default stays short


def test_every_causal_mechanism_gets_an_mqar_and_a_mad_row():
    names = {r.name for r in quality.causal_mechanisms()}
    cells = quality.plan(quality.QualityConfig(full=True))
    assert quality.QualitySuite(quality.QualityConfig(full=True)).cells() == len(cells)
    mad = ("in_context_recall", "noisy_recall", "selective_copying", "fuzzy_recall", "compression", "memorisation")
    for task in ("mqar", *mad):
        assert {rec.name for t, *_, rec in cells if t == task} == names, task
    assert {"causal", "sliding_window", "linear_elu"} <= {rec.name for *_, rec in quality.plan(quality.QualityConfig())}


def test_every_2d_mechanism_gets_a_digits_and_a_shapes_row_beside_dense():
    spatial = {r.name for r in quality.spatial_mechanisms()}
    expected = {r.name for r in registry.records() if r.kind in ("pattern", "layer") and "spatial" in r.supports}
    assert spatial == expected and {"neighborhood_2d", "transnext_aggregated", "ppma_polyline"} <= spatial
    full = quality.plan(quality.QualityConfig(full=True))
    for task in ("digits", "shapes"):
        assert {rec.name for t, *_, rec in full if t == task} == spatial | {"dense"}, task
        quick = {rec.name for t, *_, rec in quality.plan(quality.QualityConfig()) if t == task}
        assert quick == set(quality.QUICK_2D) and quick <= spatial | {"dense"}, task


def test_the_image_model_runs_every_2d_mechanism_on_the_shapes_grid():
    """12 x 12 shapes (144 tokens): every 2-D mechanism builds its grid there (MaxViT and halo need a side
    divisible by 4, the dilated neighbourhood at least 10); only the 3-D (video) neighbourhood, whose grid is a
    cube, refuses 144 tokens (radial reads them as 16 frames of 9)."""
    import torch

    task = registry.get("shapes").make(144, seed=0, train=8, test=8)
    images = torch.from_numpy(task.batch(2)[0])
    refused = set()
    for rec in [quality.DENSE_2D, *quality.spatial_mechanisms()]:
        try:
            model = quality.build_image(rec, task.n, task.classes, dim=16)
        except ValueError:
            refused.add(rec.name)
            continue
        with torch.no_grad():
            try:
                out = model(images)
            except ValueError:
                refused.add(rec.name)
                continue
        assert out.shape == (2, 6) and torch.isfinite(out).all(), rec.name
    assert refused == {"neighborhood_3d_causal"}


def test_the_quick_run_trains_shapes_fewer_steps_and_says_so():
    quick, full = quality.QualityConfig(), quality.QualityConfig(full=True)
    assert quick.steps_for("shapes") == quality.QUICK_STEPS["shapes"] < quick.steps == quick.steps_for("mqar")
    assert full.steps_for("shapes") == full.steps and quality.QualityConfig(steps=5).steps_for("shapes") == 5
    row = {"task": "shapes", "n": 144, "mechanism": "dense", "dim": 32, "state": None, "accuracy": 0.9}
    lines = quality.markdown({"rows": [{**row, "steps": 300, "seconds": 1.0}], "seconds": 1.0, "targets": []})
    assert any(line.endswith("| 300 steps |") for line in lines)


def test_an_image_model_learns_digits_with_each_kind_of_mixer():
    """80 steps on the digits: dense, a registered pattern and a family-I layer each train (the loss falls below
    the uniform ln 10 = 2.30, accuracy above chance's 0.10) and score every held-out image."""
    task = registry.get("digits").make(64, seed=0)
    for name in ("dense", "neighborhood_2d", "ela"):
        got = quality.train(quality._by_name(name), task, dim=16, steps=80, batch=32, lr=1e-2, seed=0)
        assert got["loss"] < 2.2, (name, got)
        assert 0.18 < got["accuracy"] <= 1, (name, got)


def test_a_run_gives_every_cell_a_number_or_a_reason():
    names = (quality.DENSE,)  # one mechanism: the run is seconds per cell on a loaded 2-core machine
    config = quality.QualityConfig(mechanisms=names, **TINY)
    steps = []
    section = quality.run_quality(config, steps.append)
    assert len(steps) == quality.QualitySuite(config).cells() == len(section["rows"]) == 2 * len(names)
    for r in section["rows"]:
        assert ("accuracy" in r) != ("note" in r), r  # a number, or the reason there is none
        assert "accuracy" not in r or 0 <= r["accuracy"] <= 1
    lines = quality.markdown(section)
    assert all(any(f"| {n} |" in line for line in lines) for n in names)


def test_dense_training_learns_the_answer_vocabulary():
    """40 steps: the loss on the scored positions falls from ln 16 (uniform) below ln 8 + a margin, i.e. the
    model has learned at least that answers are value tokens (the full recall is the suite's job, not a test's)."""
    task = registry.get("mqar").make(16, seed=0, pairs=2, vocab=16)
    got = quality.train(registry.get(quality.DENSE), task, dim=32, steps=40, batch=32, lr=1e-2, seed=0, eval_batches=1)
    assert got["loss"] < 2.3, got
    assert 0 <= got["accuracy"] <= 1


def test_the_targets_judge_zoologys_result():
    def row(mech, acc, dim=32):
        return {
            "task": "mqar",
            "n": 64,
            "mechanism": mech,
            "dim": dim,
            "state": quality.state_size(dim),
            "accuracy": acc,
        }

    rows = [row("causal", 1.0), row("sliding_window", 0.2), row("linear_elu", 0.3), row("linear_elu", 0.6, 64)]
    assert [t["met"] for t in quality.judge(rows)] == [True, True, True]
    rows = [row("causal", 0.9), row("sliding_window", 0.9), row("linear_elu", 0.6), row("linear_elu", 0.3, 64)]
    assert [t["met"] for t in quality.judge(rows)] == [False, False, False]

"""The trained-quality suite: its rows come from the registry, and a tiny dense model learns MQAR."""

import pytest
import torch

from attnkit import registry
from attnkit.errors import ShapeError
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


def test_the_quick_run_trains_shapes_fewer_steps_and_mqar_more_and_says_so():
    quick, full = quality.QualityConfig(), quality.QualityConfig(full=True)
    assert quick.steps_for("shapes") == quality.QUICK_STEPS["shapes"] < quality.STEPS == quick.steps_for("digits")
    assert quick.steps_for("mqar") == full.steps_for("mqar") == quality.QUICK_STEPS["mqar"] > quality.STEPS
    assert full.steps_for("shapes") == quality.STEPS and quality.QualityConfig(steps=5).steps_for("mqar") == 5
    assert quick.lrs_for("mqar") == quality.MQAR_LRS and quick.lrs_for("digits") == (quick.lr,)
    row = {"task": "shapes", "n": 144, "mechanism": "dense", "dim": 32, "state": None, "accuracy": 0.9}
    lines = quality.markdown({"rows": [{**row, "steps": 300, "seconds": 1.0}], "seconds": 1.0, "targets": []})
    assert any(line.endswith("| 300 steps |") for line in lines)
    recall = {**row, "task": "mqar", "steps": 2000, "heads": 1, "lr": [0.003], "seconds": 1.0}
    lines = quality.markdown({"rows": [recall], "seconds": 1.0, "targets": []})
    assert any(line.endswith("| 2000 steps, 1 head, lr 0.003 |") for line in lines)


def test_zoologys_model_learns_mqar_where_the_transformer_sat_on_the_plateau():
    """Zoology's recall model (a gated short convolution, then dense attention, one head) leaves the ln(4)
    plateau and recalls every pair at 64 tokens and 4 pairs in 800 steps, the easy setting of Zoology's target
    (the 2-block RoPE transformer with MLPs sat at 0.29 after 1,600)."""
    task = registry.get("mqar").make(64, seed=0, pairs=4)
    model = quality.build_recall(registry.get(quality.DENSE), task.vocab, task.n, 64)
    assert model.heads == 1 and isinstance(model.mixers[0], quality.ShortConv)
    got = quality.train(registry.get(quality.DENSE), task, dim=64, steps=800, batch=32, lr=3e-3, seed=0)
    assert got["accuracy"] >= 0.99 and got["heads"] == 1, got


def test_the_short_convolution_is_causal():
    conv = quality.ShortConv(8)
    x = torch.randn(2, 10, 8)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 8)
    assert torch.equal(conv(x)[:, :6], conv(y)[:, :6]) and not torch.equal(conv(x)[:, 6:], conv(y)[:, 6:])


def test_a_mechanism_over_several_heads_gets_four_in_the_recall_model():
    for name, heads in (("causal", 1), ("linear_elu", 1), ("strided_shards", 4), ("sqa", 4)):
        assert quality.build_recall(registry.get(name), 64, 64, 32).heads == heads, name
    with pytest.raises(ShapeError, match="heads"):
        quality.build_recall(registry.get("sqa"), 64, 64, 32, heads=1)


def test_the_state_is_what_a_layer_holds_to_decode():
    window = registry.get("sliding_window").make(64)
    w = int(window.dense_mask(64, 64).sum(-1).max())
    assert 1 < w < 64
    assert quality.state_size(registry.get("sliding_window"), 64, 32, 1) == 2 * 32 * w
    assert quality.state_size(registry.get("causal"), 64, 32, 1) == 2 * 32 * 64
    assert quality.state_size(registry.get("linear_elu"), 64, 32, 1) == 32 * 32
    assert quality.state_size(registry.get("linear_elu"), 64, 32, 4) == 4 * 8 * 8
    assert quality.state_size(registry.get("moba"), 64, 32, 1) == 2 * 32 * 64  # a selector may read every key


def test_the_state_plot_draws_a_panel_per_mqar_setting(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"task": "mqar", "n": n, "pairs": p, "mechanism": m, "dim": d, "state": d * d, "accuracy": 0.5}
        for n, p in ((64, 4), (128, 8))
        for m in ("causal", "linear_elu")
        for d in (32, 64)
    ]
    rows.append({"task": "digits", "n": 64, "mechanism": "dense", "dim": 32, "state": None, "accuracy": 0.9})
    (path,) = quality.state_plot(rows, tmp_path)
    assert path.name == "mqar_state.png" and path.stat().st_size > 10_000
    assert quality.state_plot(rows[-1:], tmp_path) == []


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
            "state": quality.state_size(registry.get(mech), 64, dim, 1),
            "accuracy": acc,
        }

    rows = [row("causal", 1.0), row("sliding_window", 0.2), row("linear_elu", 0.3), row("linear_elu", 0.6, 64)]
    assert [t["met"] for t in quality.judge(rows)] == [True, True, True]
    rows = [row("causal", 0.9), row("sliding_window", 0.9), row("linear_elu", 0.6), row("linear_elu", 0.3, 64)]
    assert [t["met"] for t in quality.judge(rows)] == [False, False, False]
    rows = [row("causal", 1.0), row("sliding_window", 0.2), row("linear_elu", 0.60), row("linear_elu", 0.63, 64)]
    assert [t["met"] for t in quality.judge(rows)] == [True, True, False]  # 3 points: within one seed's noise
    harder = [{**r, "n": 128, "pairs": 8} for r in rows[2:]]  # the most pairs decide, not the easy setting
    easy = [{**r, "pairs": 4} for r in rows[:2]] + [{**rows[2], "pairs": 4}, {**rows[3], "accuracy": 0.9, "pairs": 4}]
    assert [t["met"] for t in quality.judge(easy + harder)] == [True, True, False]


# -- CAB's four settings ---------------------------------------------------------------------------------------

CAB = {"bidirectional_recall": "noncausal", "cross_lookup": "cross", "streaming_lookup": "causal_cross"}


def test_each_cab_setting_takes_its_mechanisms_from_the_registry():
    assert {t: quality.setting(t) for t in CAB} == CAB and quality.setting("mqar") == "causal"
    assert quality.setting("digits") == "image"
    recs = [r for r in registry.records() if r.kind in ("pattern", "selector", "function")]
    line = [r for r in recs if not {"spatial", "grid"} & r.supports]
    expected = {
        "noncausal": {"dense"}
        | {r.name for r in line if r.kind == "selector" and "cross" in r.supports}
        | {r.name for r in line if r.kind != "selector" and "causal" not in r.supports},
        "cross": {"dense"}
        | {r.name for r in recs if "cross" in r.supports and (r.kind == "selector" or "causal" not in r.supports)},
        "causal_cross": {
            r.name
            for r in recs
            if "causal" in r.supports and (r.kind == "function" or (r.kind == "pattern" and "cross" in r.supports))
        },
    }
    for s, names in expected.items():
        assert {r.name for r in quality.mechanisms_for(s)} == names, s
    # dense, a linear mechanism and a window in every setting; no causal mechanism in a non-causal one
    assert {"dense", "linear_elu_bidirectional", "sliding_window_symmetric", "agent_attention", "moba"} <= expected[
        "cross"
    ]
    assert {"causal", "linear_elu", "sliding_window", "retnet"} <= expected["causal_cross"]
    assert "minference_vertical_slash" not in expected["noncausal"]  # a causal-only selector
    assert not {"causal", "sliding_window", "linear_elu"} & (expected["noncausal"] | expected["cross"])
    full = quality.plan(quality.QualityConfig(full=True))
    for task, s in CAB.items():
        assert {rec.name for t, *_, rec in full if t == task} == expected[s], task
        quick = {rec.name for t, *_, rec in quality.plan(quality.QualityConfig()) if t == task}
        assert quick == set(quality.QUICK_CAB[s]) and quick <= expected[s], task
    # a mechanism list keeps, per task, only the mechanisms that can run it
    picked = quality.plan(quality.QualityConfig(mechanisms=("dense", "causal"), tasks=quality.CAB_TASKS, widths=(16,)))
    assert [(t, rec.name) for t, *_, rec in picked] == [
        ("bidirectional_recall", "dense"),
        ("cross_lookup", "dense"),
        ("streaming_lookup", "causal"),
    ]


def _perturbed_after(src, i, vocab, seed):
    out = src.clone()
    g = torch.Generator().manual_seed(seed)
    out[:, i + 1 :] = torch.randint(0, vocab, out[:, i + 1 :].shape, generator=g)
    return out


def test_causal_cross_models_never_read_a_later_source_token():
    """CAB's causal check on the cross model: target ``i``'s output is unchanged when the source after ``i`` is
    redrawn, for every causal-cross mechanism; the non-causal dense cross model does change (the check can fail)."""
    task = registry.get("streaming_lookup").make(16, seed=0)
    src, x, _ = (torch.from_numpy(a) for a in task.batch(2))
    torch.manual_seed(0)
    for rec in [*quality.causal_cross_mechanisms(), quality.DENSE_2D]:
        model = quality.build_cross(rec, task, dim=16).eval()
        with torch.no_grad():
            full = model(src, x)
            for i in (0, 5, 14):
                cut = model(_perturbed_after(src, i, task.source_vocab, i), x)
                same = torch.allclose(cut[:, : i + 1], full[:, : i + 1], atol=1e-5)
                assert same == (rec is not quality.DENSE_2D), (rec.name, i)


def test_non_causal_self_models_read_both_sides():
    task = registry.get("bidirectional_recall").make(16, seed=0, pairs=4)
    x = torch.from_numpy(task.batch(2)[0])
    torch.manual_seed(0)
    for name, causal in (("dense", False), ("linear_elu_bidirectional", False), ("causal", True)):
        rec = quality._by_name(name)
        model = quality.build(rec, task.vocab, task.n, 16, causal=rec.name == "causal").eval()
        with torch.no_grad():
            cut = model(_perturbed_after(x, 7, task.vocab, 1))[:, :8]
            assert torch.allclose(cut, model(x)[:, :8], atol=1e-5) == causal, name


def test_tiny_trainings_beat_chance_in_each_cab_setting():
    """A few hundred steps of dense attention: each CAB task is learned well above chance (1 / values = 0.25),
    while causal attention on the non-causal self task stays below what reading both sides gives."""
    cases = (
        ("cross_lookup", 8, {"queries": 4, "keys": 8, "values": 4}, "dense", 100),
        ("streaming_lookup", 8, {"keys": 8, "values": 4}, "causal", 100),
        ("bidirectional_recall", 12, {"pairs": 3, "keys": 4, "values": 4}, "dense", 250),
    )
    for name, n, opts, mech, steps in cases:
        task = registry.get(name).make(n, seed=0, **opts)
        got = quality.train(quality._by_name(mech), task, dim=32, steps=steps, batch=32, lr=3e-3, seed=0)
        assert got["accuracy"] > 0.6, (name, got)
    task = registry.get("bidirectional_recall").make(12, seed=0, pairs=3, keys=4, values=4)
    got = quality.train(registry.get("causal"), task, dim=32, steps=250, batch=32, lr=3e-3, seed=0)
    assert got["accuracy"] < 0.7, got  # at most half the records precede their query: 0.5 + 0.5 / 4 = 0.625


def test_the_targets_judge_cabs_result():
    def row(task, mech, acc):
        return {"task": task, "n": 16, "mechanism": mech, "dim": 32, "state": 256, "accuracy": acc}

    good = [row("cross_lookup", "dense", 0.99), row("cross_lookup", "sliding_window_symmetric", 0.2)]
    good += [row("streaming_lookup", "causal", 1.0), row("streaming_lookup", "sliding_window", 0.5)]
    assert [t["met"] for t in quality.judge(good)] == [True, True, True, True]
    bad = [row("cross_lookup", "dense", 0.6), row("cross_lookup", "sliding_window_symmetric", 0.5)]
    assert [t["met"] for t in quality.judge(bad)] == [False, False]


def test_a_run_over_the_cab_tasks_gives_each_setting_its_rows():
    tasks = (("bidirectional_recall", 8, {"pairs": 2}), ("cross_lookup", 8, {}), ("streaming_lookup", 8, {}))
    config = quality.QualityConfig(
        mechanisms=("dense", "causal", "linear_elu"), widths=(16,), steps=1, batch=2, eval_batches=1, tasks=tasks
    )
    section = quality.run_quality(config, lambda _: None)
    got = [(r["task"], r["mechanism"]) for r in section["rows"]]
    assert got == [
        ("bidirectional_recall", "dense"),
        ("cross_lookup", "dense"),
        ("streaming_lookup", "causal"),
        ("streaming_lookup", "linear_elu"),
    ]
    assert all("accuracy" in r for r in section["rows"]), section["rows"]
    assert [t["target"] for t in section["targets"]] == [
        "dense >= 95% on CAB's bidirectional_recall",
        "dense >= 95% on CAB's cross_lookup",
        "causal >= 95% on CAB's streaming_lookup",
    ]


def test_an_unknown_mechanism_name_is_refused_by_name():
    with pytest.raises(ShapeError, match="nope"):
        quality.plan(quality.QualityConfig(mechanisms=("dense", "nope"), tasks=quality.CAB_TASKS))

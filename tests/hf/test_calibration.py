"""Calibration artifacts (DuoAttention gates, MoA profiles): made offline, keyed by the model, checked on load."""

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

import attnkit.hf as akhf
from attnkit.cli import main
from attnkit.hf import artifacts


def test_calibrate_duo_writes_a_file_that_loads(smollm2, tmp_path):
    model, _ = smollm2
    res = CliRunner().invoke(
        main,
        [
            "calibrate",
            "--method",
            "duo",
            "--length",
            "128",
            "--samples",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "duo.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    pol = akhf.DuoAttention.load(model, tmp_path / "duo.json", retrieval=0.5)
    gates = np.array(pol.gates)
    assert gates.shape == (30, 3) and (gates < 1).any() and (gates >= 0).all()
    assert int(pol.retrieval_heads.sum()) == 45


def test_shipped_calibrations_load_for_smollm2(smollm2):
    model, _ = smollm2
    assert akhf.DuoAttention.load(model).retrieval_heads.shape == (30, 3)
    moa = akhf.MoA.load(model, 0.25)
    assert np.mean(moa.spans) <= 0.25 + 1e-9


def test_missing_corrupt_and_foreign_files_raise(smollm2, tmp_path):
    model, _ = smollm2
    with pytest.raises(akhf.CalibrationError, match="existing"):
        akhf.DuoAttention.load(model, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(akhf.CalibrationError, match="readable JSON"):
        akhf.DuoAttention.load(model, bad)
    good = artifacts.save(tmp_path / "ok.json", model, "duo_attention", [[1.0] * 3] * 30, {})
    doc = json.loads(good.read_text())
    doc["model_key"] = "0" * 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(akhf.CalibrationError, match="for this model"):
        akhf.DuoAttention.load(model, other)
    with pytest.raises(akhf.CalibrationError, match="moa calibration"):
        akhf.MoA.load(model, 0.25, good)
    doc = json.loads(good.read_text())
    doc["values"] = [[1.0]]
    other.write_text(json.dumps(doc))
    with pytest.raises(akhf.CalibrationError, match="malformed"):
        akhf.DuoAttention.load(model, other)


def test_moa_plan_is_the_best_choice_under_the_budget():
    rng = np.random.default_rng(0)
    cands = (0.25, 0.5, 1.0)
    costs = np.sort(rng.random((2, 2, 3)), axis=-1)[..., ::-1].copy()  # longer spans lose less
    plan = akhf.MoA.plan(costs, 0.5, candidates=cands)
    best = min(
        (sum(costs.reshape(4, 3)[i, j] for i, j in enumerate(pick)), pick)
        for pick in itertools.product(range(3), repeat=4)
        if np.mean([cands[j] for j in pick]) <= 0.5
    )
    got = sum(costs.reshape(4, 3)[i, cands.index(s)] for i, s in enumerate(np.ravel(plan.spans)))
    assert np.isclose(got, best[0])
    assert np.mean(plan.spans) <= 0.5


def test_duo_for_budget_never_exceeds_it():
    gates = np.random.default_rng(1).random((30, 3)).tolist()
    for budget, n in ((0.125, 4096), (0.25, 4096), (0.5, 1024)):
        pol = akhf.DuoAttention.for_budget(gates, budget, n, sinks=16, recent=240)
        kept = pol.retrieval * n + (1 - pol.retrieval) * 256
        assert kept <= budget * n + 1e-6
        assert kept > budget * n - n / 90 - 1

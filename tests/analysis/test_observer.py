"""The capture's statistics equal the ones computed from transformers' eager full maps, in float64."""

import subprocess
import sys

import pytest
import torch

from attnkit.analysis import Statistics, capture, eager_maps
from attnkit.errors import ShapeError, UnsupportedError
from attnkit.reference import analysis as ref

NAMES = ("entropy", "first_mass", "local_mass", "distance", "group", "pooled")


def _batch(tok, texts, n):
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=n)
    return enc.input_ids, enc.attention_mask


def _compare(cap, maps, real, counted, *, causal, groups, first=2, window=8, offsets=(1, 3), pooled=4):
    want = ref.statistics(
        maps,
        counted,
        first=first,
        window=window,
        offsets=offsets,
        causal=causal,
        groups=groups,
        pooled=pooled,
        real=real,
    )
    got = {
        "entropy": cap.entropy,
        "first_mass": cap.first_mass,
        "local_mass": cap.local_mass,
        "distance": cap.distance,
        "group": cap.group_mass,
        "pooled": cap.pooled,
    } | {f"offset_{d}": cap.offset_mass(d) for d in offsets}
    for name, value in got.items():
        # float32 throughout (the eager maps and the capture's products and prefix sums): a few hundred roundings
        # of eps = 1.2e-7 at most, far below any mass that matters
        tol = 2e-5 if name == "entropy" else 1e-5
        assert value.shape == want[name].shape, name
        assert (value - want[name]).abs().max().item() < tol, name
    for layer in cap.layers:
        assert (cap.columns(layer) - want["columns"][layer]).abs().max().item() < 2e-6


def test_smollm2_statistics_equal_the_eager_maps_with_left_padding(smollm2):
    model, tok = smollm2
    from attnkit.models import english_text

    text = english_text()
    ids, am = _batch(tok, [text[:400], text[2000:2110]], 48)
    assert not bool(am.all())  # the second row is left-padded
    groups = torch.full(ids.shape, -1)
    groups[:, -24:-12], groups[:, -12:] = 0, 1
    st = Statistics(first=2, window=8, offsets=(1, 3), pooled=4, groups=groups, columns=True, maps={(3, 2): None})
    with capture(model, st) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    maps = eager_maps(model, ids, am)
    real = am.bool()
    _compare(cap, maps, real, real, causal=True, groups=groups)
    exact = cap.map(3, 2)
    assert (exact - maps[3][:, 2])[real].abs().max().item() < 5e-6


def test_query_selection_counts_only_the_chosen_queries(smollm2):
    model, tok = smollm2
    ids = torch.randint(300, 5000, (1, 40), generator=torch.Generator().manual_seed(1))
    chosen = torch.zeros(ids.shape, dtype=torch.bool)
    chosen[:, 25:] = True
    with capture(model, first=2, window=8, offsets=(1, 3), pooled=4, queries=chosen) as cap, torch.no_grad():
        model(input_ids=ids)
    maps = eager_maps(model, ids)
    want = ref.statistics(maps, chosen, first=2, window=8, offsets=(1, 3), pooled=4)
    assert (cap.offset_mass(3) - want["offset_3"]).abs().max().item() < 2e-6
    assert torch.equal(cap.queries, torch.full((1, 30), 15.0, dtype=torch.float64))


def test_decode_steps_add_their_queries(smollm2):
    model, tok = smollm2
    ids = torch.randint(300, 5000, (2, 20), generator=torch.Generator().manual_seed(2))
    with capture(model, top_k=2, first=1) as cap, torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == 24
    assert torch.equal(cap.queries[:, 0], torch.full((2,), 23.0, dtype=torch.float64))  # prefill 20 + 3 steps
    maps = eager_maps(model, out[:, :23])  # the decode queries are rows 20..22 of the full map
    for layer in (0, 12, 29):
        mass, keys = cap.top_k(layer)
        top = maps[layer].topk(2, dim=-1)
        assert torch.equal(keys[:, :, 20:23], top.indices[:, :, 20:23])
        assert (mass[:, :, 20:23] - top.values[:, :, 20:23]).abs().max().item() < 1e-5
    want = ref.statistics(maps, torch.ones(2, 23, dtype=torch.bool), first=1)
    assert (cap.first_mass - want["first_mass"]).abs().max().item() < 2e-6


def test_minilm_encoder_with_right_padding(minilm):
    model, tok = minilm
    enc = tok(
        ["a short sentence about cats", "a much longer sentence about the weather in the mountains today"],
        return_tensors="pt",
        padding=True,
    )
    ids, am = enc.input_ids, enc.attention_mask
    assert not bool(am.all())
    groups = torch.full(ids.shape, -1)
    groups[:, 1:4], groups[:, 4:7] = 0, 1
    with capture(model, first=2, window=3, offsets=(1,), pooled=4, groups=groups, columns=True) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    maps = eager_maps(model, ids, am)
    real = am.bool()
    _compare(cap, maps, real, real, causal=False, groups=groups, window=3, offsets=(1,))


def test_bad_statistics_are_named():
    with pytest.raises(ShapeError, match="window"):
        Statistics(window=0)
    with pytest.raises(ShapeError, match="queries"):
        Statistics(queries=torch.ones(4))
    with pytest.raises(ShapeError, match="groups"):
        Statistics(groups=torch.ones(1, 4))


def test_unasked_statistics_raise(smollm2):
    model, _ = smollm2
    with capture(model) as cap, torch.no_grad():
        model(input_ids=torch.randint(300, 900, (1, 8)))
    with pytest.raises(UnsupportedError, match="pooled"):
        _ = cap.pooled
    with pytest.raises(UnsupportedError, match="top_k"):
        cap.top_k(0)
    with pytest.raises(ShapeError, match="offsets"):
        cap.offset_mass(5)


_MEMORY = """
import resource, torch
from attnkit.models import load_smollm2, english_text
from attnkit.analysis import capture, Statistics, full_map_bytes
torch.set_num_threads(2)
model, tok = load_smollm2()
ids = tok(english_text(), return_tensors="pt").input_ids[:, :{n}]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with torch.no_grad():
    model(ids)
    plain = peak()
    with capture(model, Statistics(pooled=32, columns=True)) as cap:
        model(ids)
print(peak() - plain, full_map_bytes(model, {n}) / 2**20, float(cap.first_mass.mean()))
"""


def test_memory_stays_bounded_where_the_full_maps_would_not():
    """At 1024 tokens the float32 maps of SmolLM2's 30 x 9 heads take 1,080 MiB; the capture adds < 256 MiB."""
    n = 1024
    out = subprocess.run([sys.executable, "-c", _MEMORY.format(n=n)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    extra, full, sink = (float(x) for x in out.stdout.split()[-3:])
    assert full > 1000 and extra < 256, (extra, full)
    assert 0.1 < sink < 1

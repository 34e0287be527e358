"""RULER's needle variants (attnkit.bench.needle): prompt builders, the scorer, the two feeding settings, and one
tiny real run of SmolLM2."""

from __future__ import annotations

import random
import re

import pytest
import torch

from attnkit.bench import needle


@pytest.fixture(scope="module")
def smollm2():
    from attnkit.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def _n(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


def _depth_of(tok, p, sentence):
    """Where ``sentence`` starts in the haystack, as a fraction of the haystack's tokens."""
    at = p.context.index(sentence)
    head = _n(tok, needle.HEAD)
    return (_n(tok, p.context[:at]) - head) / (_n(tok, p.context) - head)


@pytest.mark.parametrize("variant", needle.VARIANTS)
@pytest.mark.parametrize("haystack", needle.HAYSTACKS)
def test_the_asked_needle_is_at_the_depth_and_the_length_is_right(tok, variant, haystack):
    for length, depth in ((512, 0.1), (1024, 0.5), (1024, 0.9)):
        p = needle.build(tok, variant, length, depth, random.Random(f"{variant}{depth}"), haystack)
        assert abs(len(tok(p.text).input_ids) - length) <= 0.05 * length
        assert p.depth == depth and p.variant == variant and p.haystack == haystack
        key, value = p.keys[0], p.answers[0]
        sentence = f"The special number for {key} is {value}."
        assert p.text.count(sentence) == 1
        assert abs(_depth_of(tok, p, sentence) - depth) < 0.04
        assert p.question.startswith("\n") and key in p.question and value not in p.question
        # every inserted needle is in the text once, at its own depth
        for k, v, d in p.needles:
            s = f"The special number for {k} is {v}."
            assert p.context.count(s) == 1 and abs(_depth_of(tok, p, s) - d) < 0.04


def test_single_needle(tok):
    p = needle.niah_single(tok, 512, 0.3, random.Random(0))
    assert len(p.needles) == 1 and p.answers == (p.needles[0][1],) and p.keys == (p.needles[0][0],)
    assert len(p.answers[0]) == 7 and p.answers[0].isdigit() and p.answers[0][0] != "0"


def test_multikey_has_distinct_distractors_and_asks_one(tok):
    p = needle.niah_multikey(tok, 1024, 0.5, random.Random(1))
    keys = [k for k, _, _ in p.needles]
    values = [v for _, v, _ in p.needles]
    assert len(keys) == 4 and len(set(keys)) == 4 and len(set(values)) == 4
    assert len(p.keys) == 1 and p.keys[0] in keys
    assert p.answers == (dict(zip(keys, values, strict=True))[p.keys[0]],)
    assert all(k not in p.question for k in keys if k != p.keys[0])
    depths = sorted(d for _, _, d in p.needles)
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(depths, depths[1:], strict=False))


def test_multivalue_asks_every_value_of_one_key(tok):
    p = needle.niah_multivalue(tok, 1024, 0.7, random.Random(2))
    assert {k for k, _, _ in p.needles} == set(p.keys) and len(p.keys) == 1
    assert sorted(p.answers) == sorted(v for _, v, _ in p.needles) and len(set(p.answers)) == 4
    assert p.text.count(p.keys[0]) == 4 + 2  # four needles, twice in the question


def test_multiquery_asks_every_key(tok):
    p = needle.niah_multiquery(tok, 1024, 0.2, random.Random(3))
    pairs = {k: v for k, v, _ in p.needles}
    assert len(pairs) == 4 and set(p.keys) == set(pairs)
    assert p.answers == tuple(pairs[k] for k in p.keys)
    assert all(k in p.question for k in p.keys)


def test_haystacks_differ_per_prompt_and_come_from_their_source(tok):
    from attnkit.models import english_text

    a = needle.niah_single(tok, 512, 0.5, random.Random(10), "natural")
    b = needle.niah_single(tok, 512, 0.5, random.Random(11), "natural")
    hay_a, hay_b = a.context[len(needle.HEAD) :], b.context[len(needle.HEAD) :]
    assert hay_a[:200] != hay_b[:200]
    manual = english_text()
    assert hay_a[:200] in manual and "The grass is green" not in hay_a
    f = needle.niah_single(tok, 512, 0.5, random.Random(10), "filler")
    assert f.context[len(needle.HEAD) :].startswith(needle.FILLER)
    # the key words never occur in the natural haystack by accident
    low = manual.lower()
    assert not [w for w in needle.KEY_WORDS if re.search(rf"\b{w}\b", low)]


def test_prompts_are_seeded_and_distinct(tok):
    one = needle.prompts(tok, 512, (0.1, 0.9), 2, variants=("single",), haystacks=("natural",))
    two = needle.prompts(tok, 512, (0.1, 0.9), 2, variants=("single",), haystacks=("natural",))
    assert [p.text for p in one] == [p.text for p in two]
    assert len({p.text for p in one}) == 4 and len({p.answers for p in one}) == 4


def test_bad_names_raise(tok):
    with pytest.raises(ValueError, match="variant"):
        needle.build(tok, "niah", 512, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="haystack"):
        needle.build(tok, "single", 512, 0.5, random.Random(0), "essays")


def test_score_is_rulers_string_match_all():
    assert needle.score(" 1234567.\nThe special", ["1234567"]) == 1.0
    assert needle.score(" 1234576.", ["1234567"]) == 0.0
    assert needle.score(" 1111111, 2222222 and 9999999", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert needle.score("4444444 3333333 2222222 1111111", ["1111111", "2222222", "3333333", "4444444"]) == 1.0
    assert needle.score("The answer is Walrus", ["walrus"]) == 1.0
    assert needle.score("", ["1"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        needle.score("x", [])


def test_chunks_aware_end_with_a_full_chunk():
    assert needle._chunks(1100, 512, "agnostic") == [(0, 512), (512, 1024), (1024, 1100)]
    assert needle._chunks(1100, 512, "aware") == [(0, 76), (76, 588), (588, 1100)]
    assert needle._chunks(300, 512, "aware") == [(0, 300)]
    assert needle._chunks(1024, 512, "aware") == [(0, 512), (512, 1024)]
    assert needle._chunks(1100, 512, "aware_one_step") == [(0, 1100)]


def test_markdown_puts_dense_first():
    row = dict(length=512, depth=0.5, prefill_s=1.0, peak_kv=100, haystack="natural", setting="agnostic")
    rows = [
        {**row, "policy": "snapkv", "budget": 0.25, "variant": "single", "score": 0.0, "peak_kv": 25},
        {**row, "policy": "dense", "budget": 1.0, "variant": "single", "score": 1.0},
        {**row, "policy": "dense", "budget": 1.0, "variant": "multivalue", "score": 0.5},
    ]
    lines = needle.markdown(rows)
    body = [x for x in lines if x.startswith("| dense") or x.startswith("| snapkv")]
    assert body[0].startswith("| dense | full | natural | agnostic | 1.00 | 0.50 | 0.75 |")
    assert body[1].startswith("| snapkv | 1/4 | natural | agnostic | 0.00 | nan | 0.00 |")
    assert body[1].endswith("| 0.250 |")


def test_tiny_real_run(smollm2):
    """Dense finds a needle in 256 tokens in every setting; StreamingLLM at 1/8 (32 entries) cannot see one at
    depth 0.1 (the negative control: a run that scores anything as found would fail here)."""
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model at 256 tokens: one thread is as fast, and not slowed by a busy machine
    try:
        rows = needle.run_needle(
            model,
            tok,
            ["dense", "streaming_llm"],
            [1 / 8],
            length=256,
            depths=(0.1,),
            variants=("single",),
            haystacks=("filler",),
            settings=needle.SETTINGS,
            chunk=128,
        )
    finally:
        torch.set_num_threads(threads)
    got = {(r["policy"], r["setting"]): r for r in rows}
    assert len(rows) == 2 * len(needle.SETTINGS)
    for s in needle.SETTINGS:
        assert got["dense", s]["score"] == 1.0, got["dense", s]["said"]
        assert got["streaming_llm", s]["score"] == 0.0, got["streaming_llm", s]["said"]
        assert got["streaming_llm", s]["peak_kv"] < got["dense", s]["peak_kv"]
        assert abs(got["dense", s]["tokens"] - 256) <= 13


def test_eval_counts_and_reports_the_needle_section():
    from attnkit.bench import models

    base = models.EvalConfig(lengths=(), policies=("dense", "h2o"), passkey_budgets=(0.25,), minilm=False)
    assert models.ModelsSuite(base).cells() == 2 * 5 * 2  # passkey: 2 lengths x 5 depths x (dense + h2o)
    cfg = models.EvalConfig(**{**base.__dict__, "needle": True, "passkey": False})
    # 2 haystacks x 4 variants x 3 depths x 1 prompt x 2 settings x (dense + h2o at one budget)
    assert models.ModelsSuite(cfg).cells() == 2 * 4 * 3 * 2 * 2
    row = dict(length=512, depth=0.5, prefill_s=1.0, peak_kv=100, haystack="filler", setting="aware", score=1.0)
    res = {"config": base.__dict__, "ppl": [], "passkey": [], "minilm": []}
    assert "Needle retrieval" not in models.markdown(res)  # an eval.json from before the needle section
    res["needle"] = [{**row, "policy": "dense", "budget": 1.0, "variant": "single"}]
    assert "| dense | full | filler | aware | 1.00 | 1.00 |" in models.markdown(res)

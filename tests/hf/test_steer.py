"""Family-G interventions: float64 parity with attnkit.reference.steer, identity settings bit-identical to
Dense on SmolLM2, prefill and decode with left padding."""

import math

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError
from attnkit.hf.steer import (
    ACT,
    CARVE,
    PASTA,
    VHR,
    SSMax,
    VAR,
    HeadPerturbation,
    LogNScaling,
    SpanAmplification,
    SpanKnockout,
    Steer,
    Temperature,
    contrastive_logits,
)
from attnkit.reference import steer as ref

B, HQ, HKV, K, D = 2, 4, 2, 14, 8
LAYER = 3


def _inputs(Q, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Q, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, HKV, K, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, HKV, K, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, :3] = False  # the second row is left-padded
    return q, k, v, valid


def _heads_mask(heads):
    return torch.tensor([(LAYER, h) in heads for h in range(HQ)])


CASES = {
    "temperature": lambda: (Temperature({(LAYER, 1): 0.7, (LAYER, 2): 1.6}), {}),
    "logn": lambda: (LogNScaling(train_length=4, only=(LAYER,)), {}),
    "ssmax": lambda: (SSMax(train_length=6, only=(LAYER,)), {}),
    "pasta": lambda: (PASTA(span=(4, 9), heads={(LAYER, 0), (LAYER, 3)}, alpha=0.05), {}),
    "pasta_include": lambda: (PASTA(span=(4, 9), heads={(LAYER, 1)}, alpha=0.2, scale="include"), {}),
    "act": lambda: (ACT(heads={(LAYER, 0), (LAYER, 2)}, beta=0.3, alpha=1.5), {}),
    "var": lambda: (VAR(span=(5, 10), heads={(LAYER, 1), (LAYER, 2)}, rho=0.6), {}),
    "perturb": lambda: (HeadPerturbation(heads={(LAYER, 3)}, alpha=0.4), {}),
    "amplify": lambda: (SpanAmplification(span=(3, 8), sensitivity={(LAYER, 0): 0.5, (LAYER, 2): 2.0}, gamma=1.5), {}),
    "knockout": lambda: (SpanKnockout(span=(4, 9), layers_=(LAYER,)), {}),
    "vhr": lambda: (VHR({(LAYER, 1): 1.8, (LAYER, 2): 0.6}), {}),
    "carve": lambda: (CARVE(span=(4, 10), drop=(5, 7, 8), layers_=(LAYER,)), {}),
}


def _reference(x, q, k, v, valid):
    Hq, Kk = q.shape[1], k.shape[2]
    temps = x.temperature(LAYER, Hq, Kk, q.shape[2])
    bias = x.bias(LAYER, Hq, Kk, q.device)
    p = ref.probabilities(q, k, valid=valid, temps=temps, bias=bias)
    if isinstance(x, ACT):
        p = ref.act(p, _heads_mask(x.heads), beta=x.beta, alpha=x.alpha, valid=valid)
    elif isinstance(x, VAR):
        p = ref.var(p, _heads_mask(x.heads), span=x.span, rho=x.rho, valid=valid)
    elif isinstance(x, HeadPerturbation):
        p = ref.perturb(p, _heads_mask(x.heads), alpha=x.alpha)
    elif isinstance(x, SpanKnockout):
        p = ref.knockout(p, span=x.span)
    elif isinstance(x, VHR):
        p = ref.scale_heads(p, torch.tensor([x.factors.get((LAYER, h), 1.0) for h in range(Hq)], dtype=torch.float64))
    elif isinstance(x, CARVE):
        p = ref.mask_tokens(p, span=x.span, drop=x.drop)
    return ref.output(p, v)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("Q", [K, 1])  # prefill, and a decode step over the cache
def test_float64_parity_with_the_reference(case, Q):
    x, _ = CASES[case]()
    q, k, v, valid = _inputs(Q)
    got = Steer((x,)).attend(LAYER, q, k, v, valid, K - Q, None, True)
    want = _reference(x, q, k, v, valid)
    assert got is not None
    live = valid[:, K - Q :]  # padded queries are not compared (they see no key in row 1 ... or only padding)
    assert (got - want)[live[:, None, :, None].expand_as(got)].abs().max().item() < 1e-12
    # other layers are untouched: the dense path
    assert Steer((x,)).attend(LAYER + 1, q, k, v, valid, K - Q, None, True) is None


def test_temperatures_multiply_and_biases_add():
    q, k, v, valid = _inputs(K, seed=1)
    a, b = Temperature({(LAYER, 1): 0.5}), Temperature({(LAYER, 1): 3.0})
    both = Steer((a, b)).attend(LAYER, q, k, v, valid, 0, None, True)
    one = Steer((Temperature({(LAYER, 1): 1.5}),)).attend(LAYER, q, k, v, valid, 0, None, True)
    assert (both - one).abs().max().item() < 1e-12


def test_length_scalings_follow_their_formulas():
    # a prefill of 32 queries: query i sees i + 1 keys; only those past the training length are scaled
    t = LogNScaling(train_length=8).temperature(0, 4, 32, 32)
    assert t.shape == (4, 32) and bool((t[:, :8] == 1).all())
    assert torch.allclose(t[:, -1], torch.full((4,), (5 / 3) ** 0.5, dtype=torch.float64))
    assert torch.allclose(t[0, 15], torch.tensor(math.sqrt(math.log(16) / math.log(8)), dtype=torch.float64))
    assert LogNScaling(train_length=64).temperature(0, 4, 32, 32) is None  # inside the training length
    s = SSMax(train_length=16).temperature(0, 2, 256, 1)
    assert torch.allclose(s, torch.full((2, 1), 2.0, dtype=torch.float64))
    assert SSMax(train_length=16).temperature(0, 2, 16, 1) is None
    assert torch.allclose(
        SSMax(train_length=16).temperature(0, 2, 8, 4)[0],
        torch.log(torch.arange(5.0, 9.0, dtype=torch.float64)) / math.log(16),
    )


def test_identity_settings_are_bit_identical_to_dense(smollm2):
    model, tok = smollm2
    ids = torch.randint(300, 8000, (2, 20), generator=torch.Generator().manual_seed(2))
    identity = Steer(
        (
            Temperature({(3, 1): 1.0}),
            PASTA(span=(2, 8), heads={(3, 0)}, alpha=1.0),
            ACT(heads={(4, 1)}, beta=1.0),
            VAR(span=(2, 8), heads={(5, 2)}, rho=0.0),
            HeadPerturbation(heads={(6, 0)}, alpha=0.0),
            SpanAmplification(span=(2, 8), sensitivity={(7, 1): 0.9}, gamma=0.0),
            VHR({(8, 1): 1.0}),
            CARVE(span=(2, 8), drop=(), layers_=(3,)),
        )
    )
    with torch.no_grad():
        with akhf.applied(model, akhf.Dense()):
            dense = model(ids).logits
        with akhf.applied(model, identity):
            same = model(ids).logits
        with akhf.applied(model, Steer((PASTA(span=(2, 8), heads={(3, 0)}, alpha=0.01),))):
            steered = model(ids).logits
    assert torch.equal(same, dense)
    assert not torch.equal(steered, dense)


def test_generate_with_left_padding_and_an_explicit_intervention(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    enc = tok(
        ["The capital of France is", "A much longer prompt about the capital of Italy, which is"],
        return_tensors="pt",
        padding=True,
    )
    steer = Steer((HeadPerturbation(heads={(10, h) for h in range(9)}, alpha=0.3), Temperature({(2, 0): 1.3})))
    with akhf.applied(model, steer), torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 4)
    # the padded row gives what it gives alone (padding changes nothing)
    alone = tok(["The capital of France is"], return_tensors="pt")
    with akhf.applied(model, steer), torch.no_grad():
        one = model.generate(**alone, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, -4:], one[0, -4:])


def test_vhr_and_carve_decode_with_left_padding(smollm2):
    """The span is given in padded-batch indices; the padded row must give what it gives alone with the span
    shifted by its padding, in prefill and in every decode step, and differ from dense (the edits act)."""
    model, tok = smollm2
    tok.padding_side = "left"
    texts = [
        "Passage: Rome is in Peru. Question: where is Rome?",
        "A much longer passage than the first one: Oslo is in Chile, which is far away from Norway.",
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    pad = int((enc.attention_mask[0] == 0).sum())
    assert pad > 0
    span = (pad + 2, pad + 8)

    def steer(a, b):
        return Steer((CARVE(span=(a, b), drop=(a + 1, a + 3), layers_=tuple(range(30))), VHR({(12, 1): 2.0})))

    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with akhf.applied(model, steer(*span)), torch.no_grad():
        both = model.generate(**enc, **kw)
    alone = tok(texts[:1], return_tensors="pt")
    with akhf.applied(model, steer(span[0] - pad, span[1] - pad)), torch.no_grad():
        one = model.generate(**alone, **kw)
    with torch.no_grad():
        dense = model.generate(**alone, **kw)
    assert torch.equal(both.sequences[0, -3:], one.sequences[0, -3:])
    for a, b in zip(both.scores, one.scores, strict=True):
        assert (a[0] - b[0]).abs().max().item() < 1e-3
    assert (one.scores[0][0] - dense.scores[0][0]).abs().max().item() > 1e-2


def test_bad_settings_are_named():
    with pytest.raises(ShapeError, match="alpha"):
        PASTA(span=(0, 4), heads={(0, 0)}, alpha=0)
    with pytest.raises(ShapeError, match="span"):
        PASTA(span=(4, 4), heads={(0, 0)})
    with pytest.raises(ShapeError, match="heads"):
        ACT(heads=[(0,)])
    with pytest.raises(ShapeError, match="factors"):
        Temperature({(0, 0): -1.0})
    with pytest.raises(ShapeError, match="interventions"):
        Steer(("pasta",))


def test_contrastive_logits(smollm2):
    model, _ = smollm2
    ids = torch.randint(300, 8000, (1, 16), generator=torch.Generator().manual_seed(3))
    cf = Steer((SpanKnockout(span=(2, 8), layers_=tuple(range(30))),))
    with torch.no_grad():
        z = model(ids).logits
    assert torch.equal(contrastive_logits(model, ids, cf, beta=0.0), z)
    with akhf.applied(model, cf), torch.no_grad():
        zc = model(ids).logits
    got = contrastive_logits(model, ids, cf, beta=0.5)
    assert (got - (1.5 * z - 0.5 * zc)).abs().max().item() < 1e-4
    assert (zc[:, :2] - z[:, :2]).abs().max().item() < 1e-4  # tokens before the span are unchanged


def test_vhr_from_divergence_scores_and_carve_from_two_queries(smollm2):
    from attnkit.analysis import context_divergence
    from attnkit.hf.steer import carve

    model, tok = smollm2
    passage = tok(" Peru's capital city is Oslo. Its government sits in Oslo.", add_special_tokens=False).input_ids
    head = tok("Passage:", add_special_tokens=False).input_ids
    task = tok("\nQuestion: What is the capital of Peru?\nAnswer:", add_special_tokens=False).input_ids
    general = tok("\nQuestion: What is this text about?\nAnswer:", add_special_tokens=False).input_ids
    with_ctx, without = torch.tensor([head + passage + task]), torch.tensor([head + task])
    vhr = VHR.from_scores(context_divergence(model, with_ctx, without), top=6, alpha=2.0)
    assert len(vhr.factors) == 6 and set(vhr.factors.values()) == {2.0}
    span = (len(head), len(head) + len(passage))
    mask = carve(model, with_ctx, torch.tensor([head + passage + general]), span=span, keep=0.5)
    assert len(mask.drop) == (span[1] - span[0]) - round(0.5 * (span[1] - span[0]))
    assert all(span[0] <= t < span[1] for t in mask.drop)
    with torch.no_grad():
        base = model(with_ctx).logits[0, -1]
        with akhf.applied(model, Steer((vhr, mask))):
            moved = model(with_ctx).logits[0, -1]
    assert torch.isfinite(moved).all() and (moved - base).abs().max() > 1e-3
    with pytest.raises(ShapeError, match="factors"):
        VHR({(0, 0): -1.0})
    with pytest.raises(ShapeError, match="drop"):
        CARVE(span=(2, 5), drop=(7,))
    with pytest.raises(ShapeError, match="keep"):
        carve(model, with_ctx, with_ctx, span=span, keep=0.0)

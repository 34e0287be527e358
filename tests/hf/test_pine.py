"""PINE: float64 parity with attnkit.reference.pine, order invariance on SmolLM2, decode, left padding, errors."""

import pytest
import torch

from attnkit.errors import ShapeError, UnsupportedError
from attnkit.hf import Dense, applied
from attnkit.hf._rope import rerotate
from attnkit.hf.pine import PINE
from attnkit.reference import pine as ref

HQ, HKV, D, N = 4, 2, 16, 18
INV = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(N)
    q = rerotate(torch.randn(1, HQ, N, D, generator=g, dtype=torch.float64), pos, INV).double()
    k = rerotate(torch.randn(1, HKV, N, D, generator=g, dtype=torch.float64), pos, INV).double()
    v = torch.randn(1, HKV, N, D, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize(
    "segs",
    [((3, 7), (7, 9), (9, 14)), ((2, 5), (5, 11)), ((0, 4), (4, 6), (6, 9), (9, 13))],
    ids=["3", "2", "4-no-prefix"],
)
def test_matches_float64_reference_prefill_and_decode(segs):
    q, k, v = _qkv()
    pol = PINE(segments=segs, inv_freq=INV)
    out = pol.attend(0, q, k, v, None, 0, None, True)
    torch.testing.assert_close(out[0], ref.attention(q[0], k[0], v[0], segs, INV), atol=1e-12, rtol=0)
    step = pol.attend(0, q[:, :, -3:], k, v, None, N - 3, None, True)
    torch.testing.assert_close(
        step[0], ref.attention(q[0, :, -3:], k[0], v[0], segs, INV, q_offset=N - 3), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(step, out[:, :, -3:], atol=1e-12, rtol=0)


def test_padding_keys_are_excluded():
    q, k, v = _qkv(1)
    valid = torch.ones(1, N, dtype=torch.bool)
    valid[0, :2] = False
    segs = ((4, 8), (8, 10), (10, 14))
    out = PINE(segments=segs, inv_freq=INV).attend(0, q, k, v, valid, 0, None, True)
    want = ref.attention(q[0], k[0], v[0], segs, INV, valid=valid[0])
    torch.testing.assert_close(out[0, :, 2:], want[:, 2:], atol=1e-12, rtol=0)


def _prompt(tok, options):
    from attnkit.bench.option_order import encode

    return encode(tok, "What is the capital of France?", options)


def test_no_segments_is_bit_identical_to_dense(smollm2):
    model, tok = smollm2
    ids = torch.tensor([_prompt(tok, ["Rome", "Paris", "Oslo", "Cairo"])["ids"]])
    with torch.no_grad(), applied(model, Dense()):
        dense = model(ids).logits
    with torch.no_grad(), applied(model, PINE(segments=(), model=model)):
        same = model(ids).logits
    assert torch.equal(dense, same)


def test_answer_does_not_depend_on_option_order(smollm2):
    """Permuting the segments leaves the suffix's logits unchanged (PINE), where dense's move."""
    model, tok = smollm2
    orders = (
        ["Rome", "Paris", "Oslo", "Cairo"],
        ["Cairo", "Oslo", "Paris", "Rome"],
        ["Paris", "Cairo", "Rome", "Oslo"],
    )
    pine, dense = [], []
    for opts in orders:
        enc = _prompt(tok, opts)
        ids = torch.tensor([enc["ids"]])
        with torch.no_grad():
            dense.append(model(ids).logits[0, -1].float())
            with applied(model, PINE(segments=enc["spans"], model=model)):
                pine.append(model(ids).logits[0, -1].float())
    for a in pine[1:]:
        torch.testing.assert_close(a, pine[0], atol=2e-3, rtol=0)
    assert max((a - dense[0]).abs().max().item() for a in dense[1:]) > 0.1


def test_decode_with_the_cache_matches_one_prefill(smollm2):
    model, tok = smollm2
    enc = _prompt(tok, ["Rome", "Paris", "Oslo", "Cairo"])
    ids = torch.tensor([enc["ids"] + tok(" Paris.", add_special_tokens=False).input_ids])
    P = len(enc["ids"])
    pol = PINE(segments=enc["spans"], model=model)
    with torch.no_grad(), applied(model, pol):
        full = model(ids).logits[0, P - 1 :]
        out = model(ids[:, :P], use_cache=True)
        steps = [out.logits[0, -1]]
        cache = out.past_key_values
        for t in range(P, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps[:-1]).float(), full[:-1].float(), atol=2e-3, rtol=0)


def test_batch_with_left_padding_matches_each_row(smollm2):
    model, tok = smollm2
    a = _prompt(tok, ["Rome", "Paris", "Oslo", "Cairo"])
    b = _prompt(tok, ["Oslo", "Cairo", "Paris", "Rome"])
    b["ids"] = tok("Quiz.\n", add_special_tokens=False).input_ids + b["ids"]
    shift = len(b["ids"]) - len(a["ids"])
    b_spans = tuple((s + shift, e + shift) for s, e in b["spans"])
    pad = len(b["ids"]) - len(a["ids"])
    ids = torch.tensor([[0] * pad + a["ids"], b["ids"]])
    mask = torch.tensor([[0] * pad + [1] * len(a["ids"]), [1] * len(b["ids"])])
    a_spans = tuple((s + pad, e + pad) for s, e in a["spans"])
    with torch.no_grad():
        with applied(model, PINE(segments=(a_spans, b_spans), model=model)):
            both = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        with applied(model, PINE(segments=a["spans"], model=model)):
            one = model(torch.tensor([a["ids"]])).logits[0, -1].float()
    torch.testing.assert_close(both[0], one, atol=2e-3, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ShapeError, match="segments.*at least two"):
        PINE(segments=((0, 4),), inv_freq=INV)
    with pytest.raises(ShapeError, match="contiguous"):
        PINE(segments=((0, 4), (5, 8)), inv_freq=INV)
    with pytest.raises(ShapeError, match="model"):
        PINE(segments=((0, 4), (4, 8)))
    q, k, v = _qkv()
    with pytest.raises(UnsupportedError, match="prefill"):
        PINE(segments=((3, 7), (7, 9)), inv_freq=INV).attend(0, q[:, :, 5:], k, v, None, 5, None, True)
    with pytest.raises(ShapeError, match="segments"):
        PINE(segments=((3, 7), (7, 30)), inv_freq=INV).attend(0, q, k, v, None, 0, None, True)

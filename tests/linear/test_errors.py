"""Bad input to the family-C functions: an error that names the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import linear as L
from tests.helpers import rand_qkv

q, k, v = rand_qkv(1, 4, 2, 16, 16, 8)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"mode": "fast"}, ak.ShapeError, "mode: expected one of"),
        ({"chunk_size": 0}, ak.ShapeError, "chunk_size: expected an int >= 1"),
        ({"normalize": "l2"}, ak.PatternError, "normalize: expected one of"),
        ({"feature_map": "softmax"}, ak.PatternError, "feature_map: expected a FeatureMap or one of"),
        ({"feature_map": "identity", "normalize": True}, ak.PatternError, "normalize: expected False or 'rms'"),
        ({"decay": 1.5}, ak.PatternError, r"decay: expected a float or \(4,\) values in \(0, 1\]"),
        ({"decay": torch.ones(3)}, ak.PatternError, "decay: expected"),
        ({"decay": 0.9, "causal": False}, ak.PatternError, "decay: expected None for non-causal"),
        ({"initial_state": "s"}, ak.DTypeError, "initial_state: expected a LinearState"),
        ({"feature_map": L.FAVOR(16)}, ak.ShapeError, "feature_map: expected FAVOR built for head_dim 8"),
        ({"feature_map": L.Hedgehog(2, 8)}, ak.ShapeError, "feature_map: expected Hedgehog built for 2 heads"),
        ({"key_padding_mask": torch.ones(1, 15, dtype=torch.bool)}, ak.ShapeError, "key_padding_mask"),
    ],
)
def test_linear_attention_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        L.linear_attention(q, k, v, **kwargs)


def test_bad_tensors_and_states():
    with pytest.raises(ak.ShapeError, match="q: expected 16 tokens"):
        L.linear_attention(q[:, :, :10], k, v)
    with pytest.raises(ak.ShapeError, match="k: expected a number of heads that divides"):
        L.linear_attention(q, torch.randn(1, 3, 16, 8), torch.randn(1, 3, 16, 8))
    with pytest.raises(ak.ShapeError, match="q: expected a 4-D tensor"):
        L.linear_attention(q[0], k, v)
    with pytest.raises(ak.DTypeError, match="k: expected the dtype of q"):
        L.linear_attention(q, k.double(), v)
    _, st = L.linear_attention(q, k, v, return_state=True)
    with pytest.raises(ak.ShapeError, match="initial_state.kv: expected shape"):
        L.linear_attention(q[:, :, :, :8], k, v[..., :4], initial_state=st)
    with pytest.raises(ak.ShapeError, match="initial_state.totals: expected shape"):
        L.linear_attention(q, k, v, initial_state=st, normalize="mala")
    with pytest.raises(
        ak.MemoryBudgetError, match=r"^mode='parallel' .*: expected at most the memory budget.*use mode='chunk'"
    ):
        big = torch.zeros(1, 64, 8192, 4)  # zeros: uninitialised memory may hold NaN, which is checked first
        L.linear_attention(big, big, big, mode="parallel")


def test_other_mechanisms_bad_arguments():
    with pytest.raises(ak.ShapeError, match="forget: expected shape"):
        L.rat_attention(q, k, v, torch.rand(1, 2, 16, 3))
    with pytest.raises(ak.PatternError, match="chunk_size: expected an int >= 1"):
        L.rat_attention(q, k, v, torch.rand(1, 2, 16, 1), chunk_size=0)
    with pytest.raises(ak.PatternError, match="ridge: expected a float > 0"):
        L.local_linear_attention(q, k, v, ridge=0)
    with pytest.raises(ak.UnsupportedError, match="key_padding_mask: expected None for causal flow"):
        L.flow_attention(q, k, v, causal=True, key_padding_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ak.ShapeError, match="agents: expected shape"):
        L.agent_attention(q, k, v, torch.randn(1, 2, 4, 8))
    with pytest.raises(ak.PatternError, match="num_agents: expected an int in"):
        L.pool_agents(q, 0)
    with pytest.raises(ak.ShapeError, match="spatial: expected a grid of 16 tokens"):
        L.pool_agents(q, 4, spatial=(3, 5))
    with pytest.raises(ak.ShapeError, match="heads: expected an int >= 1 that divides dim=30"):
        L.GaussianAdaptiveAttention(30, 4)
    with pytest.raises(ak.ShapeError, match=r"x: expected \(B, N, 32\)"):
        L.GaussianAdaptiveAttention(32, 4)(torch.randn(2, 5, 16))
    with pytest.raises(ak.PatternError, match="layer: expected an int in"):
        L.transnormer_decay(4, 3, 2)
    with pytest.raises(ak.PatternError, match="bias: expected a finite float"):
        ak.scores.Sigmoid(float("nan"))
    with pytest.raises(ak.DTypeError, match="normalizer: expected an attnkit.scores.Normalizer"):
        ak.attention(q, k, v, normalizer="sigmoid")


def test_a_chunk_longer_than_the_sequence_is_the_sequence():
    """chunk_size clamps to the sequence (2**30 used to try to allocate 137 GB), with the same result."""
    q, k, v = (torch.randn(1, 2, 100, 8) for _ in range(3))
    huge = L.linear_attention(q, k, v, mode="chunk", chunk_size=2**30, decay=0.9)
    small = L.linear_attention(q, k, v, mode="recurrent", decay=0.9)
    torch.testing.assert_close(huge, small, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_padded_keys_contents_never_matter(mode):
    """NaN or inf in the k or v of a padded key used to poison every output (0 x NaN)."""
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    pm = torch.ones(2, 40, dtype=torch.bool)
    pm[0, 30:] = False
    want = L.linear_attention(q, k, v, key_padding_mask=pm, mode=mode, chunk_size=16)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 31], v2[0, :, 33] = float("nan"), float("inf")
    got = L.linear_attention(q, k2, v2, key_padding_mask=pm, mode=mode, chunk_size=16)
    torch.testing.assert_close(got, want)


def test_a_decay_that_is_no_number_is_named():
    q = torch.randn(1, 2, 16, 8)
    for decay in ("x", object(), [[0.5]]):
        with pytest.raises(ak.PatternError, match=r"^decay: expected a float"):
            L.linear_attention(q, q, q, decay=decay)


def test_cross_attention_names_a_non_tensor_key():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ak.DTypeError, match="^k: expected a torch.Tensor, got list"):
        L.linear_attention(q, [1, 2], q, causal=False)

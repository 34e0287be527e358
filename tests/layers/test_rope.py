"""Rotary embedding: frequencies as transformers computes them, the naive oracle, relative positions, and
SmolLM2's own rotation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from attnkit import reference
from attnkit.errors import ShapeError
from attnkit.layers import RopeScaling, Rotary
from tests.helpers import err


def _hf_inv_freq(kind, head_dim, base, fraction, **params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": kind, "rope_theta": base, "partial_rotary_factor": fraction, **params}
    cfg = SimpleNamespace(
        rope_parameters=rope,
        head_dim=head_dim,
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=params.get("original_max_position_embeddings", 4096) * 4,
    )
    cfg.standardize_rope_params = lambda: None
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")


@pytest.mark.parametrize(
    ("scaling", "hf"),
    [
        (RopeScaling("linear", 4.0), ("linear", {"factor": 4.0})),
        (
            RopeScaling("llama3", 8.0, original_max_len=8192),
            (
                "llama3",
                {
                    "factor": 8.0,
                    "original_max_position_embeddings": 8192,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                },
            ),
        ),
        (
            RopeScaling("yarn", 4.0, original_max_len=4096),
            ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}),
        ),
    ],
    ids=["linear", "llama3", "yarn"],
)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_frequencies_match_transformers(scaling, hf, fraction):
    kind, params = hf
    inv, attn_factor = _hf_inv_freq(kind, 64, 500000.0, fraction, **params)
    rot = Rotary(64, base=500000.0, fraction=fraction, scaling=scaling)
    assert rot.rotated == int(64 * fraction)
    torch.testing.assert_close(rot.inv_freq, inv, rtol=1e-6, atol=0)
    assert rot.magnitude == pytest.approx(attn_factor)


def test_ntk_scales_the_base():
    rot = Rotary(64, base=10000.0, scaling=RopeScaling("ntk", 4.0))
    plain = Rotary(64, base=10000.0 * 4.0 ** (64 / 62))
    torch.testing.assert_close(rot.inv_freq, plain.inv_freq)


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_rotation_matches_the_naive_oracle(fraction):
    rot = Rotary(32, base=100.0, fraction=fraction, scaling=RopeScaling("yarn", 2.0, original_max_len=64))
    x = torch.randn(2, 3, 50, 32, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 50))
    want = reference.rope(x, pos, rot.inv_freq.double(), rot.rotated, rot.magnitude)
    assert err(rot(x, pos), want) < 1e-12
    assert torch.equal(rot(x, pos)[..., rot.rotated :], x[..., rot.rotated :])


def test_scores_depend_only_on_the_relative_position():
    rot = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    s = [(rot(q, torch.tensor([p + 7])) * rot(k, torch.tensor([p]))).sum().item() for p in (0, 100, 12345)]
    assert max(s) - min(s) < 1e-9


def test_smollm2_rotation_is_reproduced(smollm2):
    """The real model's rotary embedding and ``apply_rotary_pos_emb`` give what Rotary gives."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = smollm2
    cfg = model.config
    rot = Rotary(cfg.head_dim, base=cfg.rope_parameters["rope_theta"])
    q = torch.randn(1, 9, 40, cfg.head_dim)
    pos = torch.arange(100, 140)[None]
    cos, sin = model.model.rotary_emb(q, pos)
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert err(rot(q, pos[0]), want) < 1e-5


def test_bad_arguments():
    with pytest.raises(ShapeError, match="kind"):
        RopeScaling("dynamic", 2.0)
    with pytest.raises(ShapeError, match="factor"):
        RopeScaling("linear", math.nan)
    with pytest.raises(ShapeError, match="fraction"):
        Rotary(64, fraction=0.01)
    with pytest.raises(ShapeError, match="scaling"):
        Rotary(64, scaling="yarn")
    with pytest.raises(ShapeError, match="positions"):
        Rotary(8)(torch.randn(1, 1, 4, 8), torch.rand(4))

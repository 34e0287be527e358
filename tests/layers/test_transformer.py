"""TransformerBlock and Transformer: stable names, the initialisation, hybrid mechanisms, cached generation,
torch.compile on the dense path, and the training example."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

from attnkit.errors import ShapeError
from attnkit.layers import Attention, Transformer, TransformerBlock
from attnkit.patterns import SlidingWindow
from tests.helpers import err

ROOT = Path(__file__).parents[2]


def test_state_dict_names_are_stable():
    model = Transformer(vocab=10, dim=16, depth=2, heads=2, kv_heads=1, qk_norm=True)
    names = set(model.state_dict())
    for i in range(2):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            assert f"blocks.{i}.attn.{part}.weight" in names
        for part in ("mlp.gate", "mlp.up", "mlp.down", "attn_norm", "mlp_norm"):
            assert f"blocks.{i}.{part}.weight" in names
    assert {"embed.weight", "norm.weight", "head.weight"} <= names
    assert model.head.weight is model.embed.weight  # tied by default
    assert abs(model.embed.weight.std().item() - 0.02) < 0.005
    assert model.blocks[0].mlp.gate.out_features == 48  # round(8/3 * 16) up to a multiple of 8


def test_hybrid_mechanisms_and_per_block_layers():
    model = Transformer(vocab=10, dim=16, depth=3, heads=2, mechanism=[SlidingWindow(left=3, right=0), None, "retnet"])
    assert isinstance(model.blocks[0].attn.mechanism, SlidingWindow)
    assert model.blocks[1].attn.mechanism is None
    tokens = torch.randint(0, 10, (2, 12))
    assert model(tokens).shape == (2, 12, 10)
    caches = model.make_cache(2, 20)
    assert [type(c).__name__ for c in caches] == ["KVCache", "KVCache", "StateCache"]
    with pytest.raises(ShapeError, match="mechanism"):
        Transformer(vocab=10, dim=16, depth=3, heads=2, mechanism=[None, None])
    custom = Transformer(vocab=10, dim=16, depth=2, heads=2, attn=lambda i: Attention(16, 2, kv_heads=1))
    assert custom.blocks[1].attn.kv_heads == 1


@pytest.mark.parametrize("mechanism", [None, "sliding_window", "linear_elu", "a_shape"])
def test_generate_with_the_cache_equals_the_uncached_argmax(mechanism):
    torch.manual_seed(0)
    model = Transformer(vocab=40, dim=32, depth=2, heads=4, kv_heads=2, mechanism=mechanism, max_seq_len=64).eval()
    prompt = torch.randint(0, 40, (2, 10))
    out = model.generate(prompt, steps=12)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits.argmax(-1)[:, 9:], out[:, 10:])


def test_block_with_padding_ignores_padded_keys():
    torch.manual_seed(1)
    block = TransformerBlock(16, 2, rope=True)
    x = torch.randn(1, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, :3] = False
    y = block(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[0, :3] = 100.0  # what the padded tokens hold must not matter to the real ones
    y2 = block(x2, key_padding_mask=mask)
    assert err(y[:, 3:], y2[:, 3:]) < 1e-5


def test_torch_compile_on_the_dense_path():
    """torch.compile runs the dense model, forward and backward, and matches eager (the non-finite check of
    attnkit.attention is a data-dependent branch: a graph break, not a failure)."""
    torch.manual_seed(2)
    model = Transformer(vocab=30, dim=32, depth=1, heads=4, kv_heads=2)
    tokens = torch.randint(0, 30, (2, 16))
    eager = model(tokens)
    compiled = torch.compile(model)
    out = compiled(tokens)
    out.sum().backward()
    assert err(out, eager) < 1e-5
    assert model.blocks[0].attn.q_proj.weight.grad is not None


def test_the_training_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "train_transformer.py"), run_name="__main__")
    out = capsys.readouterr().out
    acc = int(re.search(r"copies the first half: (\d+)%", out).group(1))
    assert acc >= 90, out

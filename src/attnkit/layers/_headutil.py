"""Small helpers the family-D head-variant layers share (argument checks, the oracle's preconditions)."""

from __future__ import annotations

import torch

from ..errors import ShapeError, UnsupportedError, bad, check_count


def check_input(x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        raise ShapeError(
            bad("x", f"a tensor (B, N, {dim})", tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
        )


def check_padding(mask, x: torch.Tensor) -> None:
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
        raise ShapeError(
            bad("key_padding_mask", f"a bool tensor {tuple(x.shape[:2])}", (tuple(mask.shape), mask.dtype))
        )


def check_positions(positions, n: int, start: int, device) -> torch.Tensor:
    if positions is None:
        return torch.arange(start, start + n, device=device)
    if not isinstance(positions, torch.Tensor) or positions.shape != (n,):
        raise ShapeError(
            bad("positions", f"a tensor ({n},) of absolute positions", getattr(positions, "shape", positions))
        )
    return positions


def require_plain_attention(layer) -> None:
    """The head-variant oracles cover dense softmax attention without RoPE, QK-norm or score mods."""
    for name, val in (
        ("mechanism", layer.mechanism),
        ("score", layer.score),
        ("rope", layer.rotary),
        ("qk_norm", layer.q_norm),
    ):
        if val is not None:
            raise UnsupportedError(bad(name, "None for the float64 reference of this head variant", type(val).__name__))


def linear_weights(layer, dtype):
    """``wq, wk, wv, wo`` and the biases of an :class:`~attnkit.layers.Attention`'s projections, cast to ``dtype``."""

    def c(t):
        return None if t is None else t.to(dtype)

    kw = {}
    for name, lin in (("q", layer.q_proj), ("k", layer.k_proj), ("v", layer.v_proj), ("o", layer.o_proj)):
        kw[f"w{name}"] = c(lin.weight)
        kw[f"b{name}"] = c(lin.bias)
    return kw


def head_sizes(dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *, split: int = 1):
    """Check a layer's sizes; return ``(kv_heads, head_dim)`` with their defaults (``heads``; ``dim / (split *
    heads)``, ``split = 2`` for a layer whose heads are halves, Diff Transformer's)."""
    check_count("dim", dim, 1)
    check_count("heads", heads, 1)
    kv_heads = heads if kv_heads is None else kv_heads
    check_count("kv_heads", kv_heads, 1)
    if heads % kv_heads:
        raise ShapeError(bad("kv_heads", f"a divisor of heads={heads}", kv_heads))
    if head_dim is None:
        if dim % (split * heads):
            of = f"heads={heads}" if split == 1 else f"{split} * heads={split * heads}"
            raise ShapeError(bad("head_dim", f"given, since dim={dim} is not a multiple of {of}", None))
        head_dim = dim // (split * heads)
    check_count("head_dim", head_dim, 1)
    return kv_heads, head_dim

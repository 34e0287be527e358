"""Peer libraries run side by side in the benchmark, each gated on agreeing with attnkit's result.

* raw compiled FlexAttention with the same mask (``torch.compile(flex_attention)`` + ``create_block_mask``);
* NATTEN (``natten.na1d/na2d/na3d``) for neighbourhood patterns, as installed (on CPU its flex backend);
* lucidrains ``local-attention`` for the causal sliding window.

A peer that is not installed is reported as missing; one whose output disagrees with attnkit's reference
result is reported as a mismatch and its time is not compared.
"""

from __future__ import annotations

import functools

import torch

from ..patterns import Neighborhood, SlidingWindow
from ..shapes import bhnd_to_spatial, spatial_to_bhnd


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def raw_flex(pattern, q, k, v):
    """The raw FlexAttention path a user would write: block mask built once, compiled kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    Nq, Nk = q.shape[2], k.shape[2]
    H = q.shape[1] if pattern.num_heads else None

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.mask_mod(b, h, q_idx, kv_idx)

    bm = create_block_mask(mask_mod, None, H, Nq, Nk, device=q.device)
    fn = _compiled_flex()
    return lambda: fn(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])


def natten_fn(pattern, q, k, v):
    if not isinstance(pattern, Neighborhood):
        return None
    import natten

    shape = pattern.shape
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    qs, ks, vs = (bhnd_to_spatial(t, shape).contiguous() for t in (q, k, v))
    kw = dict(
        kernel_size=pattern.kernel_size, dilation=pattern.dilation, stride=pattern.stride, is_causal=pattern.is_causal
    )
    return lambda: spatial_to_bhnd(fn(qs, ks, vs, **kw))


def local_attention_fn(pattern, q, k, v):
    if not (isinstance(pattern, SlidingWindow) and pattern.right == 0 and q.shape[1] == k.shape[1]):
        return None
    from local_attention import LocalAttention

    w = pattern.left + 1
    mod = LocalAttention(
        window_size=w, causal=True, look_backward=1, exact_windowsize=True, use_rotary_pos_emb=False, autopad=True
    )
    # local-attention's exact window keeps keys i - w .. i (w + 1 keys); compare it with that pattern.
    return lambda: mod(q, k, v)


def peer_pattern(name: str, pattern):
    """The attnkit pattern a peer actually computes (for the correctness gate)."""
    if name == "local-attention":
        return SlidingWindow(pattern.left + 1, 0)
    return pattern


PEERS = {
    "flex-raw": raw_flex,
    "natten": natten_fn,
    "local-attention": local_attention_fn,
}


def available(name: str) -> bool:
    mod = {"flex-raw": "torch.nn.attention.flex_attention", "natten": "natten", "local-attention": "local_attention"}[
        name
    ]
    try:
        __import__(mod)
    except ImportError:
        return False
    return True

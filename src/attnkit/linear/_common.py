"""Argument checks shared by the family-C functions."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import ShapeError, bad
from ..shapes import Dims, check_finite, validate


def check_qkv(q, k, v, *, causal: bool, key_padding_mask=None, scale=None) -> Dims:
    """Validate ``q, k, v`` like the softmax call; causal attention needs as many queries as keys, non-causal
    allows any number of queries (cross attention)."""
    # Cross attention may have more queries than keys: validate a key-length view of q for the common rules.
    ok = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k))
    qv = q[:, :, : k.shape[2]] if ok and not causal and q.shape[2] > k.shape[2] else q
    dims = validate(qv, k, v, key_padding_mask=key_padding_mask, scale=scale)
    dims = replace(dims, q_len=q.shape[2])
    if causal and dims.q_len != dims.kv_len:
        raise ShapeError(bad("q", f"{dims.kv_len} tokens (those of k) for causal attention", dims.q_len))
    # The softmax call's non-finite rule; a function with key padding selects zeros at padded keys itself.
    check_finite(q, k, v, key_padding_mask)
    return dims

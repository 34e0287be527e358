"""Oracle for dynamic selections: dense float64 attention over exactly the selected pairs."""

from __future__ import annotations

import torch

from .softmax import attention


def selected_attention(
    q,
    k,
    v,
    selection,
    *,
    causal: bool,
    key_padding_mask=None,
    dtype=torch.float64,
    return_lse: bool = False,
    scale: float | None = None,
):
    """Dense attention over ``selection.dense_mask`` (and the causal cut: queries are the last ``Nq`` keys),
    plus the selection's ``key_bias`` (Dynamic Mask Attention) when it has one. O(N^2); tests only."""
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    mask = selection.dense_mask(Hq)
    if causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    if selection.key_bias is None:
        return attention(
            q, k, v, mask=mask, key_padding_mask=key_padding_mask, dtype=dtype, return_lse=return_lse, scale=scale
        )
    bias = selection.key_bias.to(dtype)

    class _Bias:  # a score mod adding the per-key bias
        def score_mod(self, s, b, h, qi, kj):
            return s + bias[:, :, None, :]

    return attention(
        q,
        k,
        v,
        mask=mask,
        key_padding_mask=key_padding_mask,
        score=_Bias(),
        dtype=dtype,
        return_lse=return_lse,
        scale=scale,
    )

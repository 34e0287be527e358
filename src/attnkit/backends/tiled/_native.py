"""The tiled kernel's calls into the native extension (:mod:`attnkit.backends.native`), forward and backward, in
float32 or bf16: the softmax or attnkit's own non-softmax normalisers (:class:`~attnkit.scores.Sigmoid`,
:class:`~attnkit.scores.Softplus`), with or without attnkit's own score mods (:class:`~attnkit.scores.Softcap`,
:class:`~attnkit.scores.ALiBi`). Any other score mod or normaliser (a subclass, :class:`~attnkit.scores.TensorBias`,
a user's own) is Python code the kernel cannot call, and runs the torch-op paths.

bf16 inputs reach the kernel as bf16 (its products run on the CPU's bf16 matrix units with float32 accumulation,
the softmax and its statistics in float32); float16 inputs are widened to float32 first (MKL exports no
fp16 x fp16 -> fp32 product this CPU runs on matrix units). Both directions return float32.
"""

from __future__ import annotations

import torch

from ...errors import DTypeError, ShapeError
from ...layout import BlockLayout
from ...scores import ALiBi, Sigmoid, Softcap, Softplus
from .. import native
from ._common import _grouping, _pad_keys_mask, _pad_seq, _select_terms, _units

KEYS = 256  # keys per chunk (the K, V and score buffers of one worker stay in L2)


def _dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the native kernel computes ``dtype`` inputs in, or None when it does not serve them (float64)."""
    return {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32, torch.float16: torch.float32}.get(dtype)


_NO_SLOPES = torch.empty(0)


def _elementwise(score, normalizer, q_offset: int):
    """The kernel's ``(mod, cap, slopes, q_offset, norm, bias, length_scale)`` for this score mod and (bound)
    normaliser, or None when either is one it does not compute. Exact types only: a subclass may override
    ``score_mod`` or ``weights``."""
    mod, cap, slopes = 0, 1.0, _NO_SLOPES
    if type(score) is Softcap:
        mod, cap = 1, float(score.cap)
    elif type(score) is ALiBi:
        mod, slopes = 2, score._slopes
    elif score is not None:
        return None
    norm, bias, length_scale = 0, 0.0, False
    if type(normalizer) is Sigmoid:
        norm, bias = 1, float(normalizer.bias)
    elif type(normalizer) is Softplus:
        norm, length_scale = 2, bool(normalizer.length_scale)
    elif normalizer is not None:
        return None
    return (mod, cap, slopes, int(q_offset), norm, bias, length_scale)


def extension(q: torch.Tensor, score, normalizer):
    """The built extension when it serves this call (float32/bf16/fp16; a score mod and a normaliser it
    computes), else None."""
    if _dtype(q.dtype) is None or _elementwise(score, normalizer, 0) is None:
        return None
    return native.module()


def _call(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        # The C++ bounds and shape checks are a second line behind BlockLayout.check: the same error class.
        cls = DTypeError if isinstance(e, TypeError) else ShapeError
        msg = str(e).splitlines()[0]
        arg = "score" if msg.startswith(("slopes", "cap", "mod")) else "layout"
        arg = "normalizer" if msg.startswith("norm") else arg
        raise cls(f"{arg} (the native kernel's check): {msg}") from None


def _inputs(q, k, v, layout: BlockLayout, key_padding_mask):
    """q, k, v padded to whole blocks in the kernel's dtype, the padded key mask and the layout's tensors."""
    dt = _dtype(q.dtype)
    nq, nk = layout.num_q_blocks * layout.block_q, layout.num_kv_blocks * layout.block_k
    kpm = _pad_keys_mask(key_padding_mask, q.shape[0], nk)
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    G = _grouping(layout, B, Hq, Hkv)
    table = torch.tensor(list(_units(B, Hq, Hkv, G, layout)), dtype=torch.long).view(-1, 4)
    tiles = (layout.kv_ids.long(), layout.mask_ids.long(), layout.tile_masks.bool())
    padded = (_pad_seq(q, nq, dt), _pad_seq(k, nk, dt), _pad_seq(v, nk, dt))
    return padded, (*(t.contiguous() for t in tiles), kpm, table, G, layout.block_q, layout.block_k)


def forward(
    ext, q, k, v, layout: BlockLayout, scale: float, key_padding_mask, *, score=None, normalizer=None, q_offset: int = 0
):
    """``(out, lse)`` in float32, sliced to the queries (``normalizer`` bound to the call's length)."""
    padded, lay = _inputs(q, k, v, layout, key_padding_mask)
    tail = (scale, KEYS, _select_terms(layout.select), layout.q_offset, layout.kv_len)
    tail += _elementwise(score, normalizer, q_offset)
    out, lse = _call(ext.forward, *padded, *lay, *tail)
    Nq = q.shape[2]
    return out[:, :, :Nq], lse[:, :, :Nq]


def backward(
    ext,
    dout,
    q,
    k,
    v,
    out,
    lse,
    layout: BlockLayout,
    scale: float,
    key_padding_mask,
    *,
    score=None,
    normalizer=None,
    q_offset: int = 0,
):
    """``(dq, dk, dv)`` in the inputs' dtypes, from the forward's float32 ``out`` and ``lse``."""
    (qp, kp, vp), lay = _inputs(q, k, v, layout, key_padding_mask)
    Nq, nq = q.shape[2], qp.shape[2]
    # delta = rowsum(dO * O) in float32 from the unrounded output; padded query rows get dO = 0, lse = -inf.
    delta = torch.zeros(q.shape[0], q.shape[1], nq)
    delta[:, :, :Nq] = (dout.float() * out).sum(-1)
    lse_p = torch.full((q.shape[0], q.shape[1], nq), float("-inf"))
    lse_p[:, :, :Nq] = lse
    dop = _pad_seq(dout, nq, qp.dtype)
    tail = (scale, KEYS, _select_terms(layout.select), layout.q_offset, layout.kv_len)
    tail += _elementwise(score, normalizer, q_offset)
    dq, dk, dv = _call(ext.backward, dop, qp, kp, vp, lse_p, delta, *lay, *tail)
    Nk = k.shape[2]
    return dq[:, :, :Nq].to(q.dtype), dk[:, :, :Nk].to(k.dtype), dv[:, :, :Nk].to(v.dtype)

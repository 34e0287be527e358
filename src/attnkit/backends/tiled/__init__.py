"""``tiled``: our block-sparse CPU kernel over a :class:`~attnkit.layout.BlockLayout`.

For each query block ``i`` the kernel visits only the key blocks of its layout row; a chunk of consecutive
query blocks is computed with two batched matrix products:

``S = scale * Q_i K_{T(i)}^T (+ mod) + B_i``, ``lse_i = logsumexp(S)``, ``O_i = exp(S - lse_i) V_{T(i)}``

where ``T(i)`` are the row's key tiles and ``B_i`` the additive mask of the row (0 for full tiles, the stored
element mask for partial tiles, ``-inf`` for empty padding slots and padded keys). A row whose key tiles exceed
``_plan._MAX_KEYS`` is processed in segments merged with the online softmax (log-sum-exp merge), so memory stays
``O(N x keys per query)`` and no ``N x N`` tensor is ever built.

* When a chunk's key tiles are one contiguous run that advances by a fixed step per row (sliding windows,
  neighbourhood interiors), K and V are read through a strided view with no copy; otherwise the tiles are
  gathered.
* Grouped-query attention folds the ``Hq / Hkv`` query heads of one key/value head into the rows of one
  product, so K and V tiles are read once per group.
* The backward recomputes ``P = exp(S - lse)`` per chunk (FlashAttention-2 style): ``dV += P^T dO``,
  ``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * O)``, ``dQ = dS K``, ``dK += dS^T Q``; the torch-op
  backward scatters the key-side gradients with ``index_add_``, the native one owns each (batch, KV head)'s
  ``dK``, ``dV`` rows per range of query blocks and sums the ranges once.
* The softmax, attnkit's own score mods (softcap, ALiBi) and its normalisers (sigmoid, softplus) in float32 or
  bf16 (fp16 widened to float32) run through the
  native C++ kernel (:mod:`attnkit.backends.native`, :mod:`._native`) when it is built, forward and backward: one
  loop over (batch, head unit, query block) that copies its tiles' K and V rows into a per-thread buffer, 256 keys
  at a time, and runs the products as BLAS calls (bf16 operands into float32 in bf16) with the online softmax (or
  the normaliser's weights, which add up across chunks), the score mod, the tile masks and a token-grain selection
  (:class:`~attnkit.layout.TokenSelect`) applied to the scores in between; the longest rows are taken first. Any
  other score mod or normaliser, and ``ATTNKIT_TILED_KERNEL=torch`` (or a failed build, which warns), run the
  torch-op paths below.
* The torch-op forward of plain softmax without a token-grain refinement runs through PyTorch's fused CPU
  flash-attention op, which returns ``lse`` with the output. Its plan (:func:`._plan._fused_plan`) cuts every row
  into its unmasked *bulk* and its masked *tail* (the causal diagonal): bulks are sorted by width and packed
  into calls of near-equal width, short rows left-padded under a per-key mask (never a per-pair one), so the
  irregular rows of a dynamic selection run in few large calls; tails of the same shape run as one batch per
  unit; the two merge by their lse. Rows with masked tiles inside (neighbourhoods) run whole under their mask.
  The unfused path (``bmm``, ``exp``, ``bmm``) serves the rest and the backward.
* On the torch-op paths bf16/fp16 inputs are computed in float32 tile by tile and the output is rounded once.
* A query with no visible key gives ``out = 0`` and ``lse = -inf``.

One module per job: :mod:`._plan` cuts a layout's rows into the unfused path's chunks and the fused op's calls
(cached on the layout); :mod:`._fused` runs those calls; :mod:`._unfused` computes the logits of a chunk's
segments and their softmax; :mod:`._normalize` the non-softmax normalisers; :mod:`._backward` the torch-op
gradients; :mod:`._native` calls the C++ kernel; :mod:`._common` holds what they share (padding, the grouping of
heads into units, the tile gathers, the lse merge and ``_Unit``, the values one unit of work hands to each of its
chunks). This module chooses the path (native, fused or unfused) in each direction and holds the autograd
function.
"""

from __future__ import annotations

import torch

from ...errors import DTypeError, ShapeError, UnsupportedError, bad
from ...shapes import check_finite, validate
from ...layout import BlockLayout
from . import _native
from ._backward import backward
from ._common import _fold, _grouping, _prepare, _work
from ._fused import _run_fused
from ._normalize import _elementwise
from ._plan import _fused_plan, _plan
from ._unfused import _softmax


def forward(
    q, k, v, layout: BlockLayout, scale: float, score=None, key_padding_mask=None, q_offset: int = 0, normalizer=None
):
    """Tiled attention forward; ``(out, lse)`` in the compute dtype (float32 for bf16/fp16 inputs)."""
    if (ext := _native.extension(q, score, normalizer)) is not None:
        return _native.forward(
            ext, q, k, v, layout, scale, key_padding_mask, score=score, normalizer=normalizer, q_offset=q_offset
        )
    B, Hq, Nq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    bq, nqb = layout.block_q, layout.num_q_blocks
    cd, qp, kp, vp, kpm = _prepare(q, k, v, layout, key_padding_mask)
    G = _grouping(layout, B, Hq, Hkv)
    units = Hq // G
    fused = score is None and normalizer is None and layout.select is None
    # The fused runs write only the rows they reach (a row with no tile keeps 0 and -inf).
    out_f = (torch.zeros if fused else torch.empty)(B, units, nqb, G * bq, Dv, dtype=cd)
    lse_f = torch.full((B, units, nqb, G * bq), float("-inf"), dtype=cd)
    for b, lh, _, h0, unit in _work(layout, Hq, kp, vp, kpm, G=G, q_offset=q_offset, scale=scale, score=score):
        u = h0 // G
        qf = _fold(qp[b, h0 : h0 + G], G, nqb, bq)
        if fused:
            _run_fused(_fused_plan(layout, lh), qf, unit, out_f[b, u], lse_f[b, u])
            continue
        for ch in _plan(layout, lh, G * bq):
            qc, out_c, lse_c = qf[ch.r0 : ch.r1], out_f[b, u, ch.r0 : ch.r1], lse_f[b, u, ch.r0 : ch.r1]
            if normalizer is not None:
                out_c[...], lse_c[...] = _elementwise(ch, qc, unit, normalizer)
            else:
                _softmax(ch, qc, unit, out=out_c, lse_out=lse_c)
    out = out_f.view(B, units, nqb, G, bq, Dv).transpose(2, 3).reshape(B, Hq, nqb * bq, Dv)
    lse = lse_f.view(B, units, nqb, G, bq).transpose(2, 3).reshape(B, Hq, nqb * bq)
    return out[:, :, :Nq], lse[:, :, :Nq]


class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer):
        out, lse = forward(q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer)
        # The backward's delta = rowsum(dO * O) cancels against dO V^T: it needs O before the rounding to
        # bf16, so the compute-dtype output is what is saved.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, scale, score, key_padding_mask, q_offset, normalizer)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, score, kpm, q_offset, normalizer = ctx.args
        if (ext := _native.extension(q, score, normalizer)) is not None:
            dq, dk, dv = _native.backward(
                ext, dout, q, k, v, out, lse, layout, scale, kpm, score=score, normalizer=normalizer, q_offset=q_offset
            )
        else:
            dq, dk, dv = backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def tiled_attention(
    q,
    k,
    v,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    score=None,
    key_padding_mask=None,
    q_offset: int = 0,
    normalizer=None,
):
    """Run the tiled kernel on an explicit layout (static pattern or dynamic selector); ``(out, lse)``.

    ``normalizer`` (a bound :class:`~attnkit.scores.Normalizer`) replaces the softmax; ``lse`` is then
    ``log sum_j p_ij``. Differentiable in ``q``, ``k``, ``v`` (not through ``lse``).
    """
    dims = validate(q, k, v, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale)
    if not isinstance(layout, BlockLayout):
        want = "an attnkit.BlockLayout (pattern.block_layout(...) makes one)"
        raise DTypeError(bad("layout", want, type(layout).__name__))
    if q.device.type != "cpu":
        raise UnsupportedError(
            bad("q", "tensors on the CPU (tiled is a CPU kernel; on GPU use backend='flex')", q.device)
        )
    layout.check(dims.q_len, dims.kv_len)
    k, v = check_finite(q, k, v, key_padding_mask)
    if layout.select is not None and layout.q_offset != q_offset:
        raise ShapeError(bad("q_offset", f"the layout's q_offset {layout.q_offset}", q_offset))
    return _tiled(q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer)


def _tiled(q, k, v, layout: BlockLayout, scale, score, key_padding_mask, q_offset: int, normalizer):
    """:func:`tiled_attention` on a call already validated (attnkit.attention's request)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout.select is not None and normalizer is not None:
        raise UnsupportedError(
            bad("normalizer", "None with a token-grain selection (the row counts ignore it)", normalizer)
        )
    return _TiledFunction.apply(q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer)


# The backend interface (attnkit.backends.BACKENDS["tiled"]): when it can run a request, the layout it runs on and
# the call; after tiled_attention, which it calls.
from ._backend import (  # noqa: E402
    carries_nonfinite as carries_nonfinite,
    choose_block,
    describe,
    pattern_layout,
    request_layout,
    run,
    why_not,
)

__all__ = [
    "backward",
    "choose_block",
    "describe",
    "forward",
    "pattern_layout",
    "request_layout",
    "run",
    "tiled_attention",
    "why_not",
]

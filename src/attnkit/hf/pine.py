r"""PINE: position-invariant attention between the segments of a prompt (family G).

Wang et al., *Eliminating Position Bias of Language Models: A Mechanistic Approach* (ICLR 2025). A prompt is
``[prefix | segment_1 | ... | segment_n | suffix]``, the segments being options, documents or answers whose
order should not matter. Causal attention lets later segments see earlier ones but not the reverse, and RoPE
favours whatever sits nearest; PINE removes both asymmetries, training-free, in every layer:

1. **Bidirectional between segments.** A segment's tokens attend to every token of every other segment (and
   to the prefix); inside its own segment attention stays causal.
2. **Positions by importance, not by order.** Each segment starts from the position it would have as the
   *last* one (all segments right-aligned to end where the suffix begins, at :math:`E`). For a query, the
   other segments are then ranked by the attention they receive from it, computed *without* position
   encoding and averaged over each segment's tokens,

   .. math::

      I_d(i) = \frac{1}{|d|} \sum_{j \in d} \operatorname{softmax}_j\Big(\frac{\tilde q_i \cdot \tilde k_j}
      {\sqrt{D}}\Big),

   (:math:`\tilde q, \tilde k` the un-rotated query and key; the softmax runs over the segment tokens only),
   and laid out so that the most important one sits nearest the query: segment :math:`d` is shifted back by
   the total length of the segments ranked above it. Keys are rotated to these positions per query head.
   - For a *segment's* queries the ranking is per segment (summed over its query tokens, its own segment
     first), so the segment itself sits at :math:`E - |d|, \dots, E - 1` and every other segment before it.
   - For a *suffix* query (and every decoded token) the ranking is that query's own, per head.
   The prefix is untouched.

Permuting the segments therefore permutes nothing the suffix sees: its output is invariant to the segment
order up to floating-point summation order and ties in the ranking (tested on SmolLM2).

Choices (read from the authors' code, ``wzq016/PINE``; not copied):

- the importance softmax of segment queries masks their own segment, and that of suffix queries has no mask;
- with exactly two segments the ranking is fixed (each sees the other just before itself), as in the paper;
- ties keep the prompt order (a stable sort);
- rankings and positions are per query head (GQA keys are shared, their positions are not).

Spans are token *indices* into the (padded) batch, contiguous (``end`` of one is ``start`` of the next), the
same for every row or one list per row (left padding: give each row its own). Positions only enter as
differences, so the row's padding offset cancels. Prefill must hold the prefix and all segments in its first
step; later steps (the suffix in chunks, decoding) are suffix queries. Costlier than dense: keys are rotated
per (head, query) for suffix queries and per (head, segment) for segment queries, as in the paper.

Published for LLM-as-a-judge (RewardBench) and multi-document QA; measured here on generated multiple-choice
questions (:mod:`attnkit.bench.option_order`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ShapeError, UnsupportedError, bad
from ..records import register
from ._rope import _rotate_half, find_inv_freq
from .policy import Policy

_CHUNK = 1 << 24  # rotated key elements per chunk of suffix queries


def _spans(value, name) -> tuple:
    try:
        out = tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError):
        raise ShapeError(bad(name, "a sequence of (start, end) token-index spans", value)) from None
    if len(out) < 2:
        raise ShapeError(bad(name, "at least two segments (PINE orders segments against each other)", out))
    for (a, b), nxt in zip(out, out[1:] + ((out[-1][1], None),), strict=True):
        if not 0 <= a < b:
            raise ShapeError(bad(name, "spans with 0 <= start < end", out))
        if nxt[0] != b:
            raise ShapeError(bad(name, "contiguous segments (each end is the next start)", out))
    return out


@dataclass(frozen=True, eq=False)
class PINE(Policy):
    """Position-invariant inter-segment attention over ``segments`` (see the module docstring).

    ``model`` gives the rotary frequencies (or pass ``inv_freq`` directly). ``segments=()`` is dense attention,
    bit-identical to no policy."""

    segments: tuple = ()
    model: object = field(default=None, repr=False)
    inv_freq: torch.Tensor | None = field(default=None, repr=False)
    name = "pine"

    def __post_init__(self):
        segs = tuple(self.segments)
        if segs and not isinstance(segs[0][0], int):
            rows = tuple(_spans(s, f"segments[{i}]") for i, s in enumerate(segs))
        else:
            rows = (_spans(segs, "segments"),) if segs else ()
        object.__setattr__(self, "segments", rows)
        freq = self.inv_freq
        if freq is None and self.model is not None:
            freq = find_inv_freq(self.model)
            if freq is None:
                raise UnsupportedError(
                    bad("model", "a model with plain rotary embeddings (rotary_emb.inv_freq)", "none")
                )
        object.__setattr__(self, "inv_freq", freq)
        object.__setattr__(self, "model", None)  # keep only the frequencies, not a reference to the model
        if rows and freq is None:
            raise ShapeError(bad("model", "the model (or inv_freq) whose rotary frequencies PINE re-applies", None))

    def describe(self) -> str:
        return f"pine({len(self.segments[0]) if self.segments else 0} segments)"

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        if not self.segments:
            return None
        if not causal:
            raise UnsupportedError(bad("model", "a causal decoder (PINE reorders causal attention)", "non-causal"))
        B, Hq, Q, D = q.shape
        K = k.shape[2]
        if len(self.segments) not in (1, B):
            raise ShapeError(bad("segments", f"one list of spans or one per batch row ({B})", len(self.segments)))
        scale = D**-0.5 if scale is None else scale
        G = Hq // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        valid = torch.ones(B, K, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
        out = torch.empty(B, Hq, Q, v.shape[-1], dtype=q.dtype, device=q.device)
        for b in range(B):
            segs = self.segments[0 if len(self.segments) == 1 else b]
            out[b] = _row(q[b], k[b], v[b], valid[b].to(torch.bool), segs, q_offset, scale, self.inv_freq)
        return out


def _rotate(x, pos, inv_freq):
    """RoPE rotation of ``x (..., T, D)`` to positions ``pos (..., T)``, in ``x``'s dtype (float64 stays float64)."""
    ang = pos.to(x.dtype)[..., None] * inv_freq.to(device=x.device, dtype=x.dtype)
    ang = torch.cat((ang, ang), dim=-1)
    return x * ang.cos() + _rotate_half(x) * ang.sin()


def _layout(segs, device):
    """Per region token: its segment, and its base position (segments right-aligned to end at ``E``)."""
    s0, E = segs[0][0], segs[-1][1]
    lens = torch.tensor([b - a for a, b in segs], device=device)
    seg_of = torch.cat([torch.full((b - a,), d, device=device) for d, (a, b) in enumerate(segs)])
    base = torch.cat([torch.arange(E - (b - a), E, device=device) for a, b in segs])
    return s0, E, lens, seg_of, base


def _shift(importance, lens):
    """Rank the segments by ``importance (..., n)`` (descending, ties in prompt order); shift of each segment =
    total length of those ranked above it."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    ranked = lens[order]
    out = torch.empty_like(ranked)
    return out.scatter_(-1, order, ranked.cumsum(-1) - ranked)


def _per_segment(p, seg_of, lens):
    """``p (..., S)`` over the region's keys -> mean attention per segment ``(..., n)``."""
    tot = torch.zeros(*p.shape[:-1], len(lens), dtype=p.dtype, device=p.device)
    return tot.index_add_(-1, seg_of, p) / lens.to(p.dtype)


def _softmax_rows(s, allowed, v):
    s = s.masked_fill(~allowed, float("-inf"))
    top = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return p @ v


def _row(q, k, v, valid, segs, q_offset, scale, inv_freq):
    """One batch row: ``q (H, Q, D)`` at index positions ``q_offset + i``, ``k, v (H, K, D)`` at ``j``."""
    H, Q, _ = q.shape
    K = k.shape[1]
    dev = q.device
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    s0, E, lens, seg_of, base = _layout(segs, dev)
    if E > K:
        raise ShapeError(bad("segments", f"spans inside the {K} keys of the step", segs))
    if q_offset > s0:
        if q_offset < E:
            raise UnsupportedError(
                bad("prefill", "the prefix and every segment in the first step", f"a step starting at {q_offset}")
            )
    elif q_offset != 0:
        raise UnsupportedError(bad("prefill", "a first step starting at 0", q_offset))
    qi = q_offset + torch.arange(Q, device=dev)
    kj = torch.arange(K, device=dev)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    raw_q, raw_k = _rotate(qf, -qi, inv_freq), _rotate(kf, -kj, inv_freq)  # position-free
    out = torch.empty(H, Q, v.shape[-1], dtype=cd, device=dev)
    causal = (kj[None, :] <= qi[:, None]) & valid[None, :]

    pre = qi < s0  # prefix queries: ordinary causal attention
    if pre.any():
        out[:, pre] = _softmax_rows((qf[:, pre] @ kf.transpose(-1, -2)) * scale, causal[pre][None], vf)

    seg_q = (qi >= s0) & (qi < E)
    if seg_q.any():
        n = len(lens)
        if n == 2:
            shift = torch.stack([torch.stack([lens[0] * 0, lens[0]]), torch.stack([lens[1], lens[1] * 0])])
            shift = shift[None].expand(H, 2, 2)
        else:
            s = (raw_q[:, s0:E] @ raw_k[:, s0:E].transpose(-1, -2)) * scale
            other = seg_of[:, None] != seg_of[None, :]
            p = torch.softmax(s.masked_fill(~other[None], float("-inf")), -1)
            seg2seg = torch.zeros(H, n, n, dtype=cd, device=dev).index_add_(1, seg_of, _per_segment(p, seg_of, lens))
            seg2seg.diagonal(dim1=1, dim2=2).fill_(float("inf"))
            shift = _shift(seg2seg, lens)  # (H, n queried-from, n)
        for d, (a, b) in enumerate(segs):
            kpos = kj[:E].expand(H, E).clone()
            kpos[:, s0:E] = base - shift[:, d, seg_of]
            qpos = base[a - s0 : b - s0]
            kr = _rotate(raw_k[:, :E], kpos, inv_freq)
            qr = _rotate(raw_q[:, a - q_offset : b - q_offset], qpos.expand(H, -1), inv_freq)
            allowed = (kpos[:, None, :] <= qpos[None, :, None]) & valid[None, None, :E]
            out[:, a - q_offset : b - q_offset] = _softmax_rows((qr @ kr.transpose(-1, -2)) * scale, allowed, vf[:, :E])

    suf = qi >= E
    if suf.any():
        idx = suf.nonzero().flatten()
        step = max(1, _CHUNK // max(1, H * K * q.shape[-1]))
        for c in range(0, len(idx), step):
            rows = idx[c : c + step]
            p = torch.softmax((raw_q[:, rows] @ raw_k[:, s0:E].transpose(-1, -2)) * scale, -1)
            shift = _shift(_per_segment(p, seg_of, lens), lens)  # (H, R, n)
            kpos = kj.expand(H, len(rows), K).clone()
            kpos[:, :, s0:E] = base - shift[:, :, seg_of]
            kr = _rotate(raw_k[:, None].expand(H, len(rows), K, -1), kpos, inv_freq)
            qr = _rotate(raw_q[:, rows], qi[rows].expand(H, -1), inv_freq)
            s = torch.einsum("hrd,hrkd->hrk", qr, kr) * scale
            out[:, rows] = _softmax_rows(s, causal[rows][None], vf)
    return out.to(q.dtype)


register(
    "pine",
    family="G",
    kind="intervention",
    paper="Eliminating Position Bias of Language Models: A Mechanistic Approach (PINE, Wang et al., ICLR 2025)",
    exact=False,
    supports=("causal", "gqa", "decode", "padding"),
    factory=lambda n, *, model=None: PINE(segments=((0, n // 2), (n // 2, n)), model=model),
    summary="bidirectional attention between segments, positions re-assigned by importance (order-invariant)",
    source=PINE,
)

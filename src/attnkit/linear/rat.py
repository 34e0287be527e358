r"""RAT: recurrence inside chunks, softmax attention across chunks ("RAT: Bridging RNN Efficiency and Attention
Accuracy in Language Modeling", Wei et al., 2025).

The sequence is cut into chunks of ``L`` tokens. Inside a chunk a gated linear recurrence summarises the keys
and values, restarted at every chunk boundary:

.. math:: \tilde k_t = f_t \odot \tilde k_{t-1} + (1 - f_t) \odot k_t, \qquad
          \tilde v_t = f_t \odot \tilde v_{t-1} + (1 - f_t) \odot v_t

Query ``t`` in chunk ``c`` then attends with a softmax over the final states of the earlier chunks and its own
running state: :math:`\mathrm{softmax}_{u}(s\, q_t\cdot\tilde k_u)` over
:math:`u \in \{\text{last token of chunk } c' < c\} \cup \{t\}`. ``L = 1`` is softmax attention, ``L = N`` a
gated RNN. The forget gate ``f`` (the layer computes it as a sigmoid of a projection) is an input here, so the
function has no parameters; the paper's output gate belongs to the layer. Causal; cost ``O(N^2 D / L)``.
"""

from __future__ import annotations

import torch

from .. import reference as _ref
from ..errors import PatternError, ShapeError, bad
from ..layout import ceil_div
from ..records import register_function
from ._common import check_qkv

_QUERY_SLAB = 2048  # queries per slab of the across-chunk scores (bounds the N x N / L temporary)


def rat_attention(q, k, v, forget, *, chunk_size: int = 16, scale: float | None = None):
    """``q`` ``(B, Hq, N, D)``, ``k`` ``(B, Hkv, N, D)``, ``v`` ``(B, Hkv, N, Dv)``, ``forget`` in ``(0, 1)`` of
    shape ``(B, Hkv, N, 1)`` (one gate per token) or ``(B, Hkv, N, D)`` (per channel; needs ``D == Dv``).
    Returns ``(B, Hq, N, Dv)`` in the dtype of ``q``."""
    dims = check_qkv(q, k, v, causal=True, scale=scale)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise PatternError(bad("chunk_size", "an int >= 1", repr(chunk_size)))
    want = (dims.batch, dims.kv_heads, dims.kv_len)
    if (
        not isinstance(forget, torch.Tensor)
        or forget.dim() != 4
        or tuple(forget.shape[:3]) != want
        or forget.shape[3] not in (1, dims.head_dim)
        or (forget.shape[3] > 1 and dims.head_dim != dims.v_dim)
    ):
        raise ShapeError(
            bad(
                "forget",
                f"shape {want + (1,)} or {want + (dims.head_dim,)} (then D == Dv)",
                tuple(getattr(forget, "shape", ())),
            )
        )
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    g, L, N = dims.group, chunk_size, dims.q_len
    s = dims.head_dim**-0.5 if scale is None else scale
    kx, vx, fx = (t.to(cd).repeat_interleave(g, 1) for t in (k, v, forget))
    nc = ceil_div(N, L)
    pad = nc * L - N
    if pad:
        kx, vx, fx = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (kx, vx, fx))
    B, H = dims.batch, dims.q_heads
    kc, vc, fc = kx.view(B, H, nc, L, -1), vx.view(B, H, nc, L, -1), fx.view(B, H, nc, L, -1)
    ks, vs = [], []
    hk = hv = None
    for t in range(L):  # the recurrence runs over the L positions of every chunk at once
        f = fc[:, :, :, t]
        hk = (1 - f) * kc[:, :, :, t] if hk is None else f * hk + (1 - f) * kc[:, :, :, t]
        hv = (1 - f) * vc[:, :, :, t] if hv is None else f * hv + (1 - f) * vc[:, :, :, t]
        ks.append(hk)
        vs.append(hv)
    k_own = torch.stack(ks, 3).view(B, H, nc * L, -1)[:, :, :N]
    v_own = torch.stack(vs, 3).view(B, H, nc * L, -1)[:, :, :N]
    k_end, v_end = hk, hv  # (B, H, nc, D): each chunk's final state
    qx = q.to(cd) * s
    own = (qx * k_own).sum(-1, keepdim=True)
    outs = []
    for a in range(0, N, _QUERY_SLAB):
        b = min(N, a + _QUERY_SLAB)
        cross = qx[:, :, a:b] @ k_end.transpose(-1, -2)
        chunk_of_q = torch.arange(a, b, device=q.device)[:, None] // L
        cross = cross.masked_fill(torch.arange(nc, device=q.device)[None, :] >= chunk_of_q, float("-inf"))
        o = own[:, :, a:b]
        m = torch.maximum(cross.amax(-1, keepdim=True), o)
        pc, po = torch.exp(cross - m), torch.exp(o - m)
        outs.append((pc @ v_end + po * v_own[:, :, a:b]) / (pc.sum(-1, keepdim=True) + po))
    return torch.cat(outs, 2).to(q.dtype)


register_function(
    "rat",
    paper="RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling (Wei et al., 2025)",
    summary="gated recurrence inside chunks of min(n/8, 16), softmax across chunk states",
    supports={"gqa", "backward", "bf16", "causal"},
    fn=rat_attention,
    ref=_ref.rat_attention,
    kwargs=lambda n: {"chunk_size": max(2, min(16, n // 8))},
    extras=lambda q, k, v: {"forget": torch.sigmoid(k.mean(-1, keepdim=True))},
)

"""Estimate-then-select: a cheap estimate of the attention map, then a selection on it.

* :class:`LinearEstimate` (SEA): a kernelised linear-attention estimate of each query's mass per key block.
* :class:`QuantizedEstimate` (SALE): low-bit quantised ``q . k`` logits, block scores, block selection.
* :class:`AnchorStripes` (AnchorAttention): an anchor from the initial and local blocks, key stripes near it.
* :class:`VerticalSlash` (MInference): vertical and slash lines estimated from the last queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError, bad
from ..layout import BlockLayout, TokenSelect, ceil_div
from ..records import register
from ._core import (
    SELECTOR_SUPPORTS,
    BlockSelector,
    Selection,
    Selector,
    check_block,
    check_budget,
    expand_kv,
    pool,
    query_blocks,
    top_blocks,
)
from .block_topk import _check_qk, select_blocks
from .moba import token_block_gate


def _elu_plus_one(x, is_query):
    return torch.nn.functional.elu(x) + 1


@dataclass(frozen=True)
class LinearEstimate(BlockSelector):
    r"""SEA: estimate the attention map with kernelised linear attention, keep each query's top-k key blocks.

    .. math:: \hat a_{iJ} = \frac{\phi(q_i) \cdot \sum_{j \in J} \phi(k_j)}{\phi(q_i) \cdot \sum_j \phi(k_j)}

    (``phi`` = ``feature_map``, default ``elu + 1``; a trained :class:`~attnkit.linear.Hedgehog` map fitted with
    :func:`~attnkit.linear.fit_hedgehog` is SEA's distilled estimator). SEA's top-k is per query on a
    compressed map; here the compression is per key block (our choice, so the sparse step runs on tiles), the
    own block is always kept under ``causal``. The estimate costs ``O(N x N / block x F)``.
    """

    feature_map: object = "elu+1"
    granularity = "token-block"
    paper = "SEA: Sparse Linear Attention with Estimated Attention Mask"

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        if isinstance(self.feature_map, str) and self.feature_map != "elu+1":
            want = "'elu+1' or a feature map object (attnkit.linear.Hedgehog, ...)"
            raise PatternError(bad("feature_map", want, repr(self.feature_map)))
        fm = _elu_plus_one if self.feature_map == "elu+1" else self.feature_map
        fq, fk = fm(q.float(), True), fm(k.float(), False)
        if key_padding_mask is not None:
            fk = fk * key_padding_mask[:, None, :, None]
        b = self.block_size
        sums = pool(fk, b) * b  # block sums of phi(k) (padding rows are zero)
        return token_block_gate(fq, k, b, self.budget, causal, key_padding_mask, keys=sums)


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token quantisation of the last dim to ``bits`` (dequantised values: the estimate's inputs)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    return (x / s).round().clamp(-qmax, qmax) * s


@dataclass(frozen=True)
class QuantizedEstimate(BlockSelector):
    r"""SALE: fine-grained logits from ``bits``-bit quantised ``q`` and ``k``, then block selection.

    The estimate ``s~_ij = scale q~_i . k~_j`` is turned into a *relative attention score* per tile,
    ``RAS_IJ = mean_{i in I} sum_{j in J} exp(s~_ij - m_i) / sum_j exp(s~_ij - m_i)`` (the estimated share of
    each query's mass in the tile; the abstract does not define the score, this is our reading), and each query
    block keeps its ``budget`` best key blocks (own block always, causal). On a GPU the estimate runs on int4
    tensor cores; here it is emulated in float32, so it costs as much as a dense product: SALE's speed-up does
    not carry over to this CPU path, its quality does.
    """

    bits: int = 4
    paper = "SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise PatternError(bad("bits", "an int in [2, 8]", repr(self.bits)))

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        B, H, Nq, D = q.shape
        Nk, b = k.shape[2], self.block_size
        qq, kq = quantize(q.float(), self.bits), expand_kv(quantize(k.float(), self.bits), H)
        nkb = ceil_div(Nk, b)
        off = Nk - Nq if causal else 0
        ras = []
        for i0 in range(0, Nq, b):
            i1 = min(Nq, i0 + b)
            s = qq[:, :, i0:i1] @ kq.transpose(-1, -2) * D**-0.5
            if causal:
                s = s.masked_fill(torch.arange(Nk)[None, :] > off + torch.arange(i0, i1)[:, None], float("-inf"))
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            p = torch.zeros(B, H, i1 - i0, nkb * b)
            p[..., :Nk] = s.softmax(-1).nan_to_num(0.0)
            ras.append(p.view(B, H, i1 - i0, nkb, b).sum(-1).mean(2))
        return select_blocks(torch.stack(ras, 2), Nq, Nk, b, self.budget, causal, key_padding_mask)


@dataclass(frozen=True)
class AnchorStripes(BlockSelector):
    r"""AnchorAttention: an anchor score from the initial and local keys, then key *stripes* whose estimated
    score comes close to it.

    For query block ``I`` the anchor is ``a_I = mean_{i in I} max_{j in init or local} s_ij`` (exact scores
    against the first ``init`` keys and the query's own block). Every visible key gets the approximate score
    ``s~_Ij = scale mean(q_I) . k_j``; the keys with the smallest gap ``a_I - s~_Ij`` (difference-aware) are kept
    as stripes: the ``budget`` fraction of the visible keys (or, with ``theta``, every key with
    ``s~_Ij >= a_I - theta``). The initial and local keys are always kept. The stripes are run at token grain
    (a :class:`~attnkit.layout.TokenSelect` ``cols`` term over the tiles that contain them).
    """

    init: int = 64
    theta: float | None = None
    granularity = "block-token"
    paper = "AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity"

    def __post_init__(self):
        super().__post_init__()
        check_block(self.init, "init")

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        B, H, Nq, D = q.shape
        Nk, b = k.shape[2], self.block_size
        nqb, nkb = ceil_div(Nq, b), ceil_div(Nk, b)
        off = Nk - Nq if causal else 0
        kx = expand_kv(k, H).float()
        qf = q.float()
        scale = D**-0.5
        qpos = off + torch.arange(Nq)
        blk_first, last = query_blocks(nqb, b, Nq, off)
        # Exact anchor: init keys and the query's own block (the local keys).
        init = kx[:, :, : self.init]
        s_init = qf @ init.transpose(-1, -2) * scale
        if causal:
            s_init = s_init.masked_fill(torch.arange(init.shape[2])[None, :] > qpos[:, None], float("-inf"))
        qpad = torch.zeros(B, H, nqb * b, D)
        qpad[:, :, :Nq] = qf
        loc_start = (blk_first // b * b).clamp(max=max(Nk - b, 0))
        loc_idx = (loc_start[:, None] + torch.arange(b)).clamp(max=Nk - 1)  # (nqb, b)
        kl = kx[:, :, loc_idx.reshape(-1)].view(B, H, nqb, b, D)
        s_loc = torch.einsum("bhiqd,bhikd->bhiqk", qpad.view(B, H, nqb, b, D), kl) * scale
        if causal:
            qp = (off + torch.arange(nqb * b)).view(nqb, b, 1)
            s_loc = s_loc.masked_fill(loc_idx[:, None, :] > qp, float("-inf"))
        anchor = s_init.amax(-1)
        anchor_b = torch.zeros(B, H, nqb * b).fill_(float("-inf"))
        anchor_b[:, :, :Nq] = anchor
        anchor = torch.maximum(anchor_b.view(B, H, nqb, b), s_loc.amax(-1))
        anchor = anchor.masked_fill(torch.isinf(anchor), 0.0)
        rows_real = (Nq - torch.arange(nqb) * b).clamp(max=b)
        a_I = anchor.sum(-1) / rows_real  # padded rows hold 0
        qm = qpad.view(B, H, nqb, b, D).sum(3) / rows_real[:, None]
        approx = qm @ kx.transpose(-1, -2) * scale  # (B, H, nqb, Nk)
        visible = (torch.arange(Nk)[None, :] <= last[:, None]) if causal else torch.ones(nqb, Nk, dtype=torch.bool)
        visible = visible[None, None].expand(B, H, nqb, Nk)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, :]
        forced = torch.zeros(nqb, Nk, dtype=torch.bool)
        forced[:, : self.init] = True
        forced |= (torch.arange(Nk)[None, :] >= loc_start[:, None]) & (
            torch.arange(Nk)[None, :] < loc_start[:, None] + b
        )
        forced = forced[None, None] & visible
        gap = approx - a_I[..., None]
        if self.theta is not None:
            cols = (gap >= -self.theta) & visible | forced
        else:
            cols = top_blocks(gap, visible, forced, self.budget)
        pad = torch.zeros(B, H, nqb, nkb * b, dtype=torch.bool)
        pad[..., :Nk] = cols
        blocks = pad.view(B, H, nqb, nkb, b).any(-1)
        layout = BlockLayout.from_blocks(
            blocks, Nq, Nk, b, causal=causal, q_offset=off, select=TokenSelect(cols=cols.reshape(B * H, nqb, Nk))
        )
        return Selection(
            layout=layout, q_len=Nq, kv_len=Nk, stats={"stripes_per_block": float(cols.sum(-1).float().mean())}
        )


@dataclass(frozen=True)
class VerticalSlash(Selector):
    r"""MInference's vertical-slash pattern, its indices estimated online from the last queries.

    The last ``last_q`` queries attend (exactly) to every key; summing their weights over queries gives a score
    per key column (*vertical*) and, along diagonals ``d = i - j``, a score per offset (*slash*). The
    ``budget`` (fraction of the keys, split evenly) keeps the best verticals and slashes; the first
    ``sink`` keys and the ``local`` nearest diagonals are always kept, as MInference does. Causal prefill only
    (the pattern is defined on the causal triangle).
    """

    budget: float | int = 0.125
    last_q: int = 64
    sink: int = 4
    local: int = 64
    block_size: int = 64
    paper = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"

    def __post_init__(self):
        check_budget(self.budget)
        for name in ("last_q", "sink", "local", "block_size"):
            check_block(getattr(self, name), name)

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        if not causal:
            raise PatternError(bad("causal", "True (vertical-slash is a causal prefill pattern)", causal))
        B, H, Nq, D = q.shape
        Nk, b = k.shape[2], self.block_size
        off = Nk - Nq
        kx = expand_kv(k, H).float()
        L = min(self.last_q, Nq)
        s = q[:, :, -L:].float() @ kx.transpose(-1, -2) * D**-0.5
        qpos = off + torch.arange(Nq - L, Nq)
        s = s.masked_fill(torch.arange(Nk)[None, :] > qpos[:, None], float("-inf"))
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        a = s.softmax(-1).nan_to_num(0.0)  # (B, H, L, Nk)
        vert = a.sum(2)
        # Slash score of offset d: sum over the last queries of a[i, pos_i - d].
        d = qpos[:, None] - torch.arange(Nk)[None, :]  # (L, Nk), >= 0 where visible
        slash = torch.zeros(B, H, Nk + Nq)
        slash.scatter_add_(2, d.clamp(min=0, max=Nk + Nq - 1).reshape(1, 1, -1).expand(B, H, -1), a.reshape(B, H, -1))
        slash = slash[..., :Nk]
        # The budget is split evenly between verticals and slashes; a budget of 1 keeps every column (exact).
        n_v = Nk if self.budget == 1.0 else max(1, ceil_div(int(self.budget * Nk), 2))
        forced_v = torch.zeros(Nk, dtype=torch.bool)
        forced_v[: self.sink] = True
        forced_s = torch.zeros(Nk, dtype=torch.bool)
        forced_s[: self.local] = True
        allowed = torch.ones(B, H, Nk, dtype=torch.bool)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, :]
        cols = top_blocks(vert, allowed, forced_v.expand(B, H, Nk) & allowed, min(Nk, n_v + self.sink))
        sl = top_blocks(slash, torch.ones_like(allowed), forced_s.expand(B, H, Nk), min(Nk, n_v + self.local))
        nqb, nkb = ceil_div(Nq, b), ceil_div(Nk, b)
        # Tiles: those holding a selected column below the diagonal, and those a selected diagonal crosses.
        first, last = query_blocks(nqb, b, Nq, off)
        cpad = torch.zeros(B, H, nkb * b, dtype=torch.bool)
        cpad[..., :Nk] = cols
        blocks = cpad.view(B, H, 1, nkb, b).any(-1).expand(B, H, nqb, nkb).clone()
        # Diagonal d crosses tile (I, J) when first_I - (J+1) b + 1 <= d <= last_I - J b.
        spre = torch.cat([torch.zeros(B, H, 1), sl.float().cumsum(-1)], -1)  # prefix counts over offsets
        J = torch.arange(nkb)
        lo = (first[:, None] - (J[None, :] + 1) * b + 1).clamp(0, Nk)
        hi = (last[:, None] - J[None, :] * b).clamp(-1, Nk - 1)
        cnt = spre[..., (hi + 1).clamp(min=0)] - spre[..., lo]
        blocks |= (cnt > 0) & (hi >= lo)
        diags = torch.zeros(B, H, 2 * Nk, dtype=torch.bool)
        diags[..., Nk - 1 : 2 * Nk - 1] = sl  # index kv_len - 1 + d
        layout = BlockLayout.from_blocks(
            blocks,
            Nq,
            Nk,
            b,
            causal=True,
            q_offset=off,
            select=TokenSelect(
                cols=cols[:, :, None].expand(B, H, nqb, Nk).reshape(B * H, nqb, Nk),
                diags=diags.view(B * H, -1),
            ),
        )
        return Selection(layout=layout, q_len=Nq, kv_len=Nk)


register(
    "sea",
    family="B",
    kind="selector",
    paper=LinearEstimate.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: LinearEstimate(
        block_size=block, budget=budget
    ),
    summary="linear-attention (elu+1) estimate of each query's block mass, top-k blocks",
    source=LinearEstimate,
)
register(
    "sale",
    family="B",
    kind="selector",
    paper=QuantizedEstimate.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: QuantizedEstimate(
        block_size=block, budget=budget
    ),
    summary="4-bit q.k estimate, relative attention score per tile, top-k blocks",
    source=QuantizedEstimate,
    tags={"slow"},
)
register(
    "anchor_attention",
    family="B",
    kind="selector",
    paper=AnchorStripes.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: AnchorStripes(
        block_size=block, budget=budget, init=block
    ),
    summary="anchor from initial + local keys, key stripes nearest the anchor",
    source=AnchorStripes,
)
register(
    "minference_vertical_slash",
    family="B",
    kind="selector",
    paper=VerticalSlash.paper,
    exact=False,
    supports={"gqa", "backward", "bf16", "padding", "causal"},
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: VerticalSlash(
        budget=budget, last_q=block, local=block, block_size=block
    ),
    summary="vertical and slash lines estimated from the last 64 queries",
    source=VerticalSlash,
)

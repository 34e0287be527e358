r"""Token pruning and merging inside a BERT encoder (family F), ranked by the [CLS] query's attention.

Published for the vision encoders (CLIP / SigLIP ViTs) of vision-language models; here the tokens are the
**text tokens of all-MiniLM-L6-v2** (a 6-layer ``BertModel``) and the ranking query is its ``[CLS]`` token, which
the registered paper strings say ("[text tokens, MiniLM [CLS]]"). Image *partitions* (HiRED) become contiguous
chunks of the text, image *windows* (MustDrop, VFlowOpt) become runs of adjacent tokens, and an image patch's
pixel entropy (VFlowOpt) becomes the token's self-information in its passage (see :class:`VFlowOpt`).

:func:`pruned_encode` runs the encoder layer by layer. After a layer a method names, tokens **leave the
sequence** (or are merged into one): every later layer computes fewer tokens, so time and memory fall; nothing
is masked. ``[CLS]`` and ``[SEP]`` always stay. Batches with padding work: each row keeps its own count
(``specials + round(keep * content)``, content = the row's real tokens but ``[CLS]``/``[SEP]``) and rows are
re-packed to the longest, with a key-padding mask.

The ``[CLS]`` attention of layer :math:`l` is computed from that layer's own query/key projections of its input
hidden states, only the ``[CLS]`` row (:math:`O(N)` per head; the model keeps its fast SDPA attention):

.. math::

    a_j = \frac{1}{H}\sum_h \operatorname{softmax}_j\Big(\frac{q_{h,\mathrm{cls}}\cdot k_{h,j}}{\sqrt{d}}
          + \beta_j\Big), \qquad \beta_j = \log s_j\ \text{(size bias, merging methods that use it)},

with padding keys at :math:`-\infty`. A merged token stands for :math:`s_j` original tokens. Where a method
uses **proportional attention** (``size_bias=True``), every later layer's attention adds :math:`\log s_j` to
the logits of key :math:`j` (ToMe's rule: a merged token draws the attention its members would together);
otherwise merged tokens are plain tokens.

The sentence embedding (:attr:`Encoded.embedding`) is sentence-transformers' masked mean pooling over the
tokens **left at the end**, each weighted by its merge size :math:`s_j` (a pruned token contributes nothing,
a merged token counts for its members), then L2 normalisation. At ``keep = 1`` every method equals the dense
encoder bit for bit (no token leaves, nothing is re-packed).

Methods (frozen dataclasses; ``layer`` is the 0-based layer after which tokens leave; default 3 of MiniLM's
0..5, the shallowest layer at which VTC-CLS meets the issue's target, embedding cosine >= 0.95 at keep 0.5):

- :class:`VTCCLS`, :class:`HiRED`, :class:`FlowCut` prune;
- :class:`VMTC`, :class:`MustDrop`, :class:`VFlowOpt` merge (and prune);
- :class:`RandomKeep`: the baseline (uniformly random content tokens), to read the others against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import ShapeError, UnsupportedError, bad
from ..records import register


def _check_keep(keep):
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= keep <= 1.0:
        raise ShapeError(bad("keep", "a fraction in [0, 1] of the content tokens", repr(keep)))


def _check_layer(name, value, n_layers):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_layers:
        raise ShapeError(bad(name, f"a layer index in [0, {n_layers})", repr(value)))


# ----------------------------------------------------------------------------------------------- state


@dataclass
class _State:
    """The live sequence: hidden states, which slots are real, merge sizes, original positions, which tokens are
    [CLS]/[SEP] (never dropped), and extras (per token (B, N) or per row (B,))."""

    h: torch.Tensor  # (B, N, D)
    real: torch.Tensor  # (B, N) bool
    size: torch.Tensor  # (B, N) float
    pos: torch.Tensor  # (B, N) long
    special: torch.Tensor  # (B, N) bool
    extra: dict

    @property
    def content(self):
        return self.real & ~self.special


def _pack(st: _State, keep: torch.Tensor) -> _State:
    """Rows keep their ``keep`` (B, N) slots, in order, re-packed to the longest row and padded at the end."""
    counts = keep.sum(1)
    M = int(counts.max())
    B = keep.shape[0]
    idx = torch.zeros(B, M, dtype=torch.long)
    valid = torch.arange(M)[None, :] < counts[:, None]
    for b in range(B):
        sel = keep[b].nonzero().flatten()
        idx[b, : len(sel)] = sel

    def g(t):
        return t.gather(1, idx if t.dim() == 2 else idx[..., None].expand(-1, -1, t.shape[-1]))

    return _State(
        h=g(st.h),
        real=g(st.real) & valid,
        size=torch.where(valid, g(st.size), torch.ones(())),
        pos=g(st.pos),
        special=g(st.special) & valid,
        extra={k: (g(v) if v.dim() > 1 else v) for k, v in st.extra.items()},  # (B,) per-row values stay
    )


def _merge(st: _State, dst: torch.Tensor, weight: torch.Tensor | None = None) -> _State:
    """Each slot ``j`` goes into slot ``dst[b, j]`` (itself when it stays; ``-1``: it leaves without a target).
    A slot that receives others becomes the weighted mean of itself and them (``weight``: default the merge
    sizes, ToMe's size-weighted average); sizes add up; slots that went elsewhere leave the sequence."""
    me = torch.arange(dst.shape[1])[None, :].expand_as(dst)
    gone = dst < 0
    real = st.real & ~gone
    dst = torch.where(gone, me, dst)
    w = st.size if weight is None else weight
    w = torch.where(real, w, torch.zeros(()))
    moved = real & (dst != me)
    num = torch.zeros_like(st.h).scatter_add_(1, dst[..., None].expand_as(st.h), st.h * w[..., None])
    den = torch.zeros_like(w).scatter_add_(1, dst, w)
    got = torch.zeros_like(w).scatter_add_(1, dst, moved.to(w.dtype)) > 0
    size = torch.zeros_like(st.size).scatter_add_(1, dst, torch.where(real, st.size, torch.zeros(())))
    # Only slots that received others change: the rest stay bit-exact.
    h = torch.where(got[..., None], num / den.clamp_min(1e-30)[..., None], st.h)
    size = torch.where(got, size, st.size)
    stays = real & ~moved
    if bool((stays == st.real).all()):
        return st
    return _pack(_State(h, real, size, st.pos, st.special, st.extra), stays)


def _bias(st: _State, size_bias: bool):
    """The additive key mask of the next layer (B, 1, 1, N), or None when every slot is real and unbiased (the
    model's own mask-free fast path, so that keep = 1 stays bit-exact)."""
    if bool(st.real.all()) and not (size_bias and bool((st.size != 1).any())):
        return None
    b = torch.zeros(st.real.shape, dtype=st.h.dtype)
    if size_bias:
        b = b + st.size.to(st.h.dtype).log()
    b = b.masked_fill(~st.real, torch.finfo(st.h.dtype).min)
    return b[:, None, None, :]


# ---------------------------------------------------------------------------------- attention scores


def _heads(lin, h, H):
    B, N, _ = h.shape
    return lin(h).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, d)


def cls_attention(layer, h, real, size=None, *, size_bias=False, per_head=False):
    r"""The [CLS] query's attention of BERT ``layer`` over the tokens of ``h`` (B, N, D): softmax of
    :math:`q_{\mathrm{cls}} k_j / \sqrt d` (+ :math:`\log s_j` with ``size_bias``) over the real keys, averaged over
    heads (``per_head``: (B, H, N)). Only the [CLS] row is computed."""
    att = layer.attention.self
    H = att.num_attention_heads
    q = _heads(att.query, h[:, :1], H)  # (B, H, 1, d)
    k = _heads(att.key, h, H)
    s = (q @ k.transpose(-1, -2))[:, :, 0] * att.scaling  # (B, H, N)
    if size_bias and size is not None:
        s = s + size.to(s.dtype).log()[:, None, :]
    s = s.masked_fill(~real[:, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return p if per_head else p.mean(1)


def _topk_rows(score, cand, n_keep):
    """Per row, the ``n_keep[b]`` candidates with the highest score, as a (B, N) bool."""
    out = torch.zeros_like(cand)
    s = score.masked_fill(~cand, float("-inf"))
    for b in range(score.shape[0]):
        k = int(n_keep[b])
        if k:
            out[b, s[b].topk(k).indices] = True
    return out


def _keep_only(st: _State, chosen):
    """Keep the specials and the ``chosen`` content; nothing is re-packed when every real token stays."""
    keep = (st.special | (chosen & st.content)) & st.real
    if bool((keep == st.real).all()):
        return st
    return _pack(st, keep)


# ------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class VTCCLS:
    r"""VTC-CLS (Wang et al., *[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs*, 2024).

    After ``layer``, keep the ``keep`` fraction of content tokens with the largest [CLS] attention. With
    ``start`` (<= ``layer``), the score is the paper's ensemble, the **sum** of the head-mean [CLS] attention
    of layers ``start..layer`` (its public code sums them),
    :math:`S_j = \sum_{l=\mathrm{start}}^{\mathrm{layer}} a^{(l)}_j`; default: the pruning layer alone."""

    layer: int = 3
    keep: float = 0.5
    start: int | None = None

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        if self.start is not None:
            _check_layer("start", self.start, L)
            if self.start > self.layer:
                raise ShapeError(bad("start", f"a layer <= layer={self.layer}", self.start))
        first = self.layer if self.start is None else self.start
        return set(range(first, self.layer + 1))

    def step(self, l, layer, h_in, st, n_target):
        a = cls_attention(layer, h_in, st.real)
        st.extra["_acc"] = st.extra.get("_acc", torch.zeros_like(a)) + a
        if l < self.layer:
            return st
        score = st.extra.pop("_acc")
        return _keep_only(st, _topk_rows(score, st.content, n_target))


def _allocate(total, weights, caps):
    """Integers ``n_p <= caps_p`` summing to ``min(total, sum caps)``, proportional to ``weights`` (largest
    remainder; a share above a cap is capped and the rest handed to the others in proportion)."""
    n = [0] * len(weights)
    free = list(range(len(weights)))
    left = min(total, sum(caps))
    while left > 0 and free:
        w = [max(float(weights[i]), 0.0) for i in free]
        tw = sum(w)
        share = [left * (wi / tw) if tw > 0 else left / len(free) for wi in w]
        room = [caps[i] - n[i] for i in free]
        if any(s > r for s, r in zip(share, room, strict=True)):
            for i, s, r in zip(free, share, room, strict=True):
                if s > r:
                    n[i] += r
                    left -= r
            free = [i for i in free if n[i] < caps[i]]
            continue
        base = [int(math.floor(s)) for s in share]
        rem = left - sum(base)
        for j in sorted(range(len(free)), key=lambda j: (-(share[j] - base[j]), j))[:rem]:
            base[j] += 1
        for i, x in zip(free, base, strict=True):
            n[i] += x
        left = 0
    return n


def _partition_ids(content, parts):
    """Partition id (0..parts-1) of each content token: equal contiguous chunks of the row's content; -1 else."""
    out = torch.full(content.shape, -1, dtype=torch.long)
    for b in range(content.shape[0]):
        idx = content[b].nonzero().flatten()
        if len(idx):
            out[b, idx] = (torch.arange(len(idx)) * parts) // len(idx)
    return out


@dataclass(frozen=True)
class HiRED:
    r"""HiRED (Arif et al., *HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
    VLMs*, AAAI 2025).

    The token budget :math:`K` (``keep`` of the content tokens) is split over ``parts`` partitions, here equal
    contiguous chunks of the text (the paper's image sub-partitions), in proportion to the [CLS] attention each
    receives in an initial layer ``alloc_layer``: :math:`K_p \propto \sum_{j\in p} a^{(\mathrm{alloc})}_j`
    (integers by largest remainder, capped at the partition's size, the excess handed on). Then, after
    ``layer`` (the paper: the final layer of the encoder), the top :math:`K_p` tokens of each partition by that
    layer's [CLS] attention stay."""

    layer: int = 3
    keep: float = 0.5
    parts: int = 4
    alloc_layer: int = 0

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        _check_layer("alloc_layer", self.alloc_layer, L)
        if self.alloc_layer > self.layer:
            raise ShapeError(bad("alloc_layer", f"a layer <= layer={self.layer}", self.alloc_layer))
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 1:
            raise ShapeError(bad("parts", "an int >= 1", repr(self.parts)))
        return {self.alloc_layer, self.layer}

    def step(self, l, layer, h_in, st, n_target):
        a = cls_attention(layer, h_in, st.real)
        if l == self.alloc_layer:
            st.extra["_part"] = _partition_ids(st.content, self.parts)
            st.extra["_alloc"] = a
        if l < self.layer:
            return st
        part, alloc = st.extra.pop("_part"), st.extra.pop("_alloc")
        chosen = torch.zeros_like(st.content)
        for b in range(a.shape[0]):
            cand = st.content[b]
            masks = [cand & (part[b] == p) for p in range(self.parts)]
            nb = _allocate(int(n_target[b]), [float(alloc[b][m].sum()) for m in masks], [int(m.sum()) for m in masks])
            for m, k in zip(masks, nb, strict=True):
                if k:
                    chosen[b, a[b].masked_fill(~m, float("-inf")).topk(k).indices] = True
        return _keep_only(st, chosen)


@dataclass(frozen=True)
class FlowCut:
    r"""FlowCut (Tong et al., *FlowCut: Rethinking Redundancy via Information Flow for Efficient VLMs*, 2025).

    Scores accumulate over layers instead of one layer's attention (the [CLS] token relays the information
    flow). In every layer :math:`l \le` ``layer`` while more than the target remain, per content token
    :math:`j` (the rule of the paper's public code):

    .. math::

        S^{(l)}_j = \Big(\frac{a_j}{\sum_i a_i} + \frac{m_j}{\sum_i m_i}\Big)\,\lVert \bar v_j \rVert_1, \quad
        m_j = \frac1H\sum_h \operatorname{softmax}_j(v_{h,\mathrm{cls}}\cdot v_{h,j}), \quad
        \bar v_j = \frac1H\sum_h v_{h,j},

    (sums over content tokens; the value similarity is unscaled, as in the code) and the running score is
    :math:`C \leftarrow \tfrac12 C + \tfrac12 S^{(l)}` (:math:`C = S^{(0)}` first). Tokens are pruned every second
    layer counting back from ``layer`` (``r = layer - l`` even): the number pruned adapts to how concentrated
    the [CLS] attention is, :math:`\frac{N - T}{\sqrt r}\,(1 - (H(a)/\log N)^2)` (:math:`N` content tokens,
    :math:`T` the target, :math:`H` the entropy of the normalised [CLS] attention), and at ``r = 0`` down to
    :math:`T`; the top of :math:`C` stay."""

    layer: int = 3
    keep: float = 0.5

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        return set(range(self.layer + 1))

    def step(self, l, layer, h_in, st, n_target):
        cand = st.content
        if bool((cand.sum(1) <= n_target).all()):
            return st
        att = layer.attention.self
        a = cls_attention(layer, h_in, st.real)
        v = _heads(att.value, h_in, att.num_attention_heads)  # (B, H, N, d)
        m = (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0]
        m = torch.softmax(m.masked_fill(~st.real[:, None], float("-inf")), -1).mean(1)
        S = flowcut_score(a, m, v.mean(1).abs().sum(-1), cand)
        st.extra["flow"] = S if "flow" not in st.extra else 0.5 * st.extra["flow"] + 0.5 * S
        r = self.layer - l
        if r % 2:
            return st
        n_keep = torch.zeros_like(n_target)
        for b in range(a.shape[0]):
            N, T = int(cand[b].sum()), int(n_target[b])
            n_keep[b] = N if N <= T else max(N - flowcut_prune_count(a[b][cand[b]], r, T), T)
        return _keep_only(st, _topk_rows(st.extra["flow"], cand, n_keep))


def flowcut_score(a, m, vnorm, cand):
    """FlowCut's per-layer score over the content tokens ``cand`` (0 elsewhere)."""
    z = torch.zeros(())
    a, m = torch.where(cand, a, z), torch.where(cand, m, z)
    return (a / a.sum(-1, keepdim=True) + m / m.sum(-1, keepdim=True)) * torch.where(cand, vnorm, z)


def flowcut_prune_count(a, r, target):
    """How many of the content tokens (their [CLS] attention ``a``) FlowCut prunes with ``r`` layers left."""
    N = a.numel()
    if r == 0:
        return N - target
    p = a / a.sum()
    ent = -(p * p.clamp_min(1e-30).log()).sum()
    ratio = float(ent) / math.log(N) if N > 1 else 1.0
    return int(round((N - target) / r**0.5 * (1 - ratio**2)))


@dataclass(frozen=True)
class VMTC:
    r"""VMTC, Visual-Modality Token Compression (Yang et al., *Enhancing Instruction-Following Capability of
    Visual-Language Models by Reducing Image Redundancy*, 2024).

    The primary tokens are kept and the redundant ones condensed by clustering and merging. The abstract gives
    no more and no code was found, so the rule here is our documented choice: after ``layer``, the primary
    tokens are the ``keep`` fraction of content tokens with the largest [CLS] attention; they are the cluster
    centres; each other content token joins the centre whose **key** (that layer's key projection, all heads)
    is most cosine-similar; each cluster becomes one token, the size-weighted mean of its members' output
    states (ToMe's merge). ``size_bias`` (default on, our choice, since merged tokens go on through the
    encoder): later layers add :math:`\log s` to a merged key's logits (proportional attention)."""

    layer: int = 3
    keep: float = 0.5
    size_bias: bool = True

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        return {self.layer}

    def step(self, l, layer, h_in, st, n_target):
        a = cls_attention(layer, h_in, st.real, st.size, size_bias=self.size_bias)
        primary = _topk_rows(a, st.content, n_target)
        if bool((primary == st.content).all()):
            return st
        return _merge(st, vmtc_assign(layer.attention.self.key(h_in), primary, st.content))


def vmtc_assign(keys, primary, content):
    """Merge target of every slot: a non-primary content token goes to its most key-similar primary token;
    every other slot stays (itself)."""
    kn = torch.nn.functional.normalize(keys, dim=-1)
    sim = (kn @ kn.transpose(-1, -2)).masked_fill(~primary[:, None, :], float("-inf"))
    best = sim.argmax(-1)
    me = torch.arange(keys.shape[1])[None, :].expand_as(best)
    return torch.where(content & ~primary, best, me)


@dataclass(frozen=True)
class MustDrop:
    r"""MustDrop, its vision-encoding stage (Liu et al., *Multi-Stage Vision Token Dropping: Towards Efficient
    Multimodal Large Language Model*, 2024).

    After ``merge_layer`` (the paper's code: the first layer), the content tokens are cut into non-overlapping
    windows of ``window`` adjacent tokens (the paper's 3x3 patch windows; a short remainder is left alone); a
    window's similarity is the mean pairwise cosine similarity of its output states (self-pairs excluded). The
    windows at or above ``threshold`` (0.8 in the code) are merged, each into one token (its last: the
    size-weighted mean, no size bias, as the code), most similar first and never more than the budget allows.
    Then, after ``layer``, its importance filter (the code's key-token set by [CLS] attention) keeps the
    budget's top content tokens. The paper's prefill and decode stages belong to a decoder and are not here."""

    layer: int = 3
    keep: float = 0.5
    merge_layer: int = 0
    window: int = 3
    threshold: float = 0.8
    size_bias: bool = False

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        _check_layer("merge_layer", self.merge_layer, L)
        if self.merge_layer >= self.layer:
            raise ShapeError(bad("merge_layer", f"a layer < layer={self.layer}", self.merge_layer))
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ShapeError(bad("window", "an int >= 2", repr(self.window)))
        return {self.merge_layer, self.layer}

    def step(self, l, layer, h_in, st, n_target):
        if l == self.merge_layer:
            return _merge(
                st, mustdrop_windows(st.h, st.content, n_target, window=self.window, threshold=self.threshold)
            )
        a = cls_attention(layer, h_in, st.real, st.size, size_bias=self.size_bias)
        return _keep_only(st, _topk_rows(a, st.content, torch.minimum(n_target, st.content.sum(1))))


def mustdrop_windows(h, content, n_target, *, window, threshold):
    """Merge target per slot: the windows (``window`` adjacent content tokens) merged go into their last token;
    every other slot stays. At most ``(content - n_target) // (window - 1)`` windows merge per row."""
    B, N, _ = h.shape
    dst = torch.arange(N)[None, :].repeat(B, 1)
    for b in range(B):
        idx = content[b].nonzero().flatten()
        nw = len(idx) // window
        if nw == 0:
            continue
        win = idx[: nw * window].view(nw, window)
        x = torch.nn.functional.normalize(h[b, win], dim=-1)  # (nw, w, D)
        sims = x @ x.transpose(-1, -2)
        sim = (sims.sum((-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)) / (window * (window - 1))
        allowed = max(0, (len(idx) - int(n_target[b])) // (window - 1))
        r = min(int((sim >= threshold).sum()), allowed)
        for w_ in sim.topk(r).indices if r else ():
            dst[b, win[w_]] = win[w_, -1]
    return dst


@dataclass(frozen=True)
class VFlowOpt:
    r"""VFlowOpt (Yang et al., *VFlowOpt: A Token Pruning Framework for LMMs with Visual Information
    Flow-Guided Optimization*, ICCV 2025): its importance map and recycling, in stages.

    Importance (the paper's public code): the *global* tokens are those whose received attention (head-mean,
    averaged over the real queries) exceeds ``t`` times its mean; a token's context relevance is the mean,
    over the global queries, of the head-mean attention they give it. To it is added ``alpha`` times a softmax
    of the token's information: for an image patch the entropy of its pixels; here (documented choice) the
    token's self-information in its passage, :math:`-\log_2(c_j / n)` (:math:`c_j` occurrences of its id among the
    :math:`n` real tokens), the expected-surprise analogue of a patch's entropy. This needs full attention rows
    of the global queries: one (B, N, N) head-mean map at each pruning layer (O(N^2), as in the paper).

    Progressive pruning with recycling: after each of ``layers``, the lowest-importance content tokens leave so
    that ``keep ** ((i + 1) / len(layers))`` of the original content remains after stage ``i``; the pruned are
    not discarded but grouped by runs of ``cell`` adjacent original positions (the paper's a x a grid cells),
    and each group is recycled into one token, the importance-weighted mean of its members written in place of
    its most important member (which stays). The number pruned is chosen so that kept + recycled hits the
    stage's target exactly. The paper's flow-guided search of ``t``, ``alpha`` and the stages is not run here
    (they are fields)."""

    layers: tuple = (1, 3)
    keep: float = 0.5
    t: float = 1.0
    alpha: float = 0.5
    cell: int = 4
    size_bias: bool = False

    def _stages(self, L):
        _check_keep(self.keep)
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ShapeError(bad("layers", "a non-empty tuple of layer indices", repr(self.layers)))
        for x in self.layers:
            _check_layer("layers", x, L)
        if isinstance(self.cell, bool) or not isinstance(self.cell, int) or self.cell < 1:
            raise ShapeError(bad("cell", "an int >= 1", repr(self.cell)))
        return set(self.layers)

    def step(self, l, layer, h_in, st, n_target):
        stages = sorted(set(self.layers))
        j = stages.index(l)
        n_now = st.content.sum(1)
        if j < len(stages) - 1:
            target = torch.round(self.keep ** ((j + 1) / len(stages)) * st.extra["_n0"]).long()
        else:
            target = n_target
        target = torch.minimum(target, n_now)
        if bool((target == n_now).all()):
            return st
        A = head_mean_attention(layer, h_in, st.real, st.size, size_bias=self.size_bias)
        imp = vflowopt_importance(A, st.real, st.content, st.extra["info"], t=self.t, alpha=self.alpha)
        return _merge(st, vflowopt_recycle(imp, st.content, st.pos, target, cell=self.cell), weight=imp * st.size)


def head_mean_attention(layer, h, real, size=None, *, size_bias=False):
    """The head-mean attention map (B, N, N) of BERT ``layer`` on ``h``, padding keys masked."""
    att = layer.attention.self
    H = att.num_attention_heads
    q, k = _heads(att.query, h, H), _heads(att.key, h, H)
    s = (q @ k.transpose(-1, -2)) * att.scaling
    if size_bias and size is not None:
        s = s + size.to(s.dtype).log()[:, None, None, :]
    s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1).mean(1)


def vflowopt_importance(A, real, content, info, *, t, alpha):
    """VFlowOpt's importance of each slot (B, N): global-query attention + alpha * softmax(info) over content."""
    z = torch.zeros(())
    rows = real[..., None].to(A.dtype)
    received = (A * rows).sum(1) / rows.sum(1)  # mean over the real queries
    mean = torch.where(real, received, z).sum(-1, keepdim=True) / real.sum(-1, keepdim=True)
    glob = real & (received > t * mean)
    glob = torch.where(glob.any(-1, keepdim=True), glob, real)
    g = glob[..., None].to(A.dtype)
    rel = (A * g).sum(1) / g.sum(1)
    e = torch.softmax(info.masked_fill(~content, float("-inf")), -1)
    return torch.where(content, rel + alpha * e, z)


def vflowopt_recycle(imp, content, pos, target, *, cell):
    """Merge target per slot (``-1``: leaves): prune the least important content tokens, recycling each group
    (same ``pos // cell``) into its most important member, so that exactly ``target`` content tokens remain."""
    B, N = imp.shape
    dst = torch.arange(N)[None, :].repeat(B, 1)
    for b in range(B):
        idx = content[b].nonzero().flatten()
        n_rm = len(idx) - int(target[b])
        if n_rm <= 0:
            continue
        order = idx[imp[b, idx].argsort(stable=True)]  # least important first
        seen, d, f = set(), 0, 0  # f: tokens that vanish = pruned - groups so far
        while f < n_rm and d < len(order):
            c = int(pos[b, order[d]]) // cell
            if c in seen:
                f += 1
            else:
                seen.add(c)
            d += 1
        groups = {}
        for j in order[:d].tolist():
            groups.setdefault(int(pos[b, j]) // cell, []).append(j)
        heads = []
        for members in groups.values():
            m = torch.tensor(members)
            head = int(m[imp[b, m].argmax()])
            dst[b, m] = head
            heads.append(head)
        if f < n_rm:  # every pruned token recycled and still too many: the least important recycled leave
            hd = torch.tensor(heads)
            for x in hd[imp[b, hd].argsort()[: n_rm - f]].tolist():
                dst[b, dst[b] == x] = -1
    return dst


@dataclass(frozen=True)
class RandomKeep:
    """The baseline: after ``layer``, a uniformly random ``keep`` fraction of content tokens stays (``seed``)."""

    layer: int = 3
    keep: float = 0.5
    seed: int = 0

    def _stages(self, L):
        _check_keep(self.keep)
        _check_layer("layer", self.layer, L)
        return {self.layer}

    def step(self, l, layer, h_in, st, n_target):
        gen = torch.Generator().manual_seed(self.seed)
        return _keep_only(st, _topk_rows(torch.rand(st.real.shape, generator=gen), st.content, n_target))


PRUNERS = (VTCCLS, HiRED, FlowCut, VMTC, MustDrop, VFlowOpt, RandomKeep)


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class Encoded:
    """What :func:`pruned_encode` returns: the final hidden states of the tokens left ``(B, M, D)``, which are
    real (``mask``), their merge sizes and original positions (a merged token: the slot it was written to),
    the sequence length each layer computed, and the encode's seconds."""

    hidden: torch.Tensor
    mask: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    tokens_per_layer: list
    seconds: float

    @property
    def embedding(self) -> torch.Tensor:
        """Size-weighted masked mean pooling over the tokens left, L2-normalised (B, D)."""
        w = (self.sizes * self.mask).to(self.hidden.dtype)[..., None]
        return torch.nn.functional.normalize((self.hidden * w).sum(1) / w.sum(1), dim=-1)

    @property
    def kept(self) -> torch.Tensor:
        """Tokens left per row (B,)."""
        return self.mask.sum(1)


def _bert(model):
    enc = getattr(model, "encoder", None)
    if enc is None or not hasattr(enc, "layer") or not hasattr(model, "embeddings"):
        raise UnsupportedError(
            bad("model", "a BertModel (model.embeddings, model.encoder.layer)", type(model).__name__)
        )
    if getattr(model.config, "is_decoder", False):
        raise UnsupportedError(bad("model", "a bidirectional encoder", "a decoder configuration"))
    return enc.layer


def _self_information(ids, real):
    """Per token, ``-log2(count of its id among the row's real tokens / real tokens)``."""
    out = torch.zeros(ids.shape)
    for b in range(ids.shape[0]):
        r = ids[b][real[b]]
        _, inv, cnt = r.unique(return_inverse=True, return_counts=True)
        out[b, real[b]] = -(cnt[inv].double() / len(r)).log2().float()
    return out


def pruned_encode(model, enc, *, pruner=None, special_ids=None) -> Encoded:
    """Encode ``enc`` (a tokenizer's batch: ``input_ids`` (B, N), optional ``attention_mask`` with right padding,
    optional ``token_type_ids``) with ``pruner`` making tokens leave after its layers; None: dense, layer by
    layer.

    ``[CLS]`` (position 0) and ``[SEP]`` (``special_ids``, default the config's ``sep_token_id`` or 102) always
    stay. Each row keeps ``specials + round(keep * content)`` tokens; padded rows keep their own counts."""
    layers = _bert(model)
    if not hasattr(enc, "keys") or "input_ids" not in enc:
        raise ShapeError(bad("enc", "a tokenizer batch with input_ids (B, N)", type(enc).__name__))
    ids = enc["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ShapeError(bad("enc['input_ids']", "a (B, N >= 2) tensor", tuple(getattr(ids, "shape", ()))))
    real = enc.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    if real.shape != ids.shape:
        raise ShapeError(bad("enc['attention_mask']", f"shape {tuple(ids.shape)}", tuple(real.shape)))
    if not bool(real[:, 0].all()):
        raise ShapeError(bad("enc['attention_mask']", "[CLS] real at position 0 (right padding)", "left padding"))
    if pruner is not None and not (hasattr(pruner, "step") and hasattr(pruner, "_stages")):
        raise ShapeError(bad("pruner", "one of " + ", ".join(c.__name__ for c in PRUNERS), type(pruner).__name__))
    stages = set() if pruner is None else pruner._stages(len(layers))
    sep = special_ids
    if sep is None:
        sep = (getattr(model.config, "sep_token_id", None) or 102,)
    special = torch.zeros_like(real)
    special[:, 0] = True
    for s in sep:
        special |= ids == s
    special &= real
    content = real & ~special
    n_target = torch.round(getattr(pruner, "keep", 1.0) * content.sum(1).double()).long()
    size_bias = bool(getattr(pruner, "size_bias", False))
    counts = []
    t0 = time.perf_counter()
    with torch.no_grad():
        h = model.embeddings(input_ids=ids, token_type_ids=enc.get("token_type_ids"))
        B, N = ids.shape
        st = _State(h, real, torch.ones(B, N), torch.arange(N)[None].repeat(B, 1), special, {})
        if isinstance(pruner, VFlowOpt):
            st.extra["info"] = _self_information(ids, real)
            st.extra["_n0"] = content.sum(1).double()
        for l, block in enumerate(layers):
            counts.append(st.h.shape[1])
            h_in = st.h
            out = block(h_in, _bias(st, size_bias))
            st.h = out[0] if isinstance(out, tuple) else out
            if l in stages:
                st = pruner.step(l, block, h_in, st, n_target)
    return Encoded(st.h, st.real, st.size, st.pos, counts, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- registry


def _factory(cls):
    def make(n, *, model=None, budget=0.5):
        return cls(keep=float(budget))

    return make


for _name, _cls, _paper, _summary in (
    (
        "vtc_cls",
        VTCCLS,
        "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS, 2024) "
        "[text tokens, MiniLM [CLS]]",
        "encoder tokens leave after a layer, top-k by the [CLS] query's attention (optionally summed over layers)",
    ),
    (
        "hired",
        HiRED,
        "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution VLMs (2024) "
        "[text tokens, MiniLM [CLS]]",
        "budget split over text chunks by early [CLS] attention, then top-k per chunk",
    ),
    (
        "flowcut",
        FlowCut,
        "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (2025) "
        "[text tokens, MiniLM [CLS]]",
        "multi-layer [CLS]-relay scores (attention + value similarity, x value norm), progressive adaptive pruning",
    ),
    (
        "vmtc",
        VMTC,
        "Enhancing Instruction-Following Capability of VLMs by Reducing Image Redundancy (VMTC, 2024) "
        "[text tokens, MiniLM [CLS]]",
        "[CLS]-top tokens kept as centres; the rest merged into their most key-similar centre",
    ),
    (
        "mustdrop",
        MustDrop,
        "Multi-Stage Vision Token Dropping: Towards Efficient MLLM (MustDrop, 2024), encoder stage "
        "[text tokens, MiniLM [CLS]]",
        "similar adjacent-token windows merged early, then a [CLS]-attention filter",
    ),
    (
        "vflowopt",
        VFlowOpt,
        "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization (2025) "
        "[text tokens, MiniLM [CLS]]",
        "importance = global-query attention + information; progressive pruning with recycled tokens",
    ),
):
    register(
        _name,
        family="F",
        kind="pruner",
        paper=_paper,
        exact=False,
        supports=("padding",),
        factory=_factory(_cls),
        summary=_summary,
        source=_cls,
    )

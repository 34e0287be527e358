"""What every dynamic selector shares: the :class:`Selection` it returns, the runner, budgets and top-k.

A selector looks at ``q`` and ``k`` (sometimes ``v``) and decides which pairs to compute; the kernels then
compute exactly those pairs. Selection is split from attention so that each can be timed on its own:

.. code-block:: python

    sel = selector.select(q, k, v, causal=True)      # no gradient, the selector's cost
    out = sparse_attention(q, k, v, sel, causal=True)  # the kernel's cost, differentiable in q, k, v

``sparse_attention(q, k, v, selector)`` does both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PatternError, ShapeError, bad, check_memory
from ..layout import BlockLayout, TokenSelect, ceil_div, tile

#: What a 1-D selector supports (its record's ``supports``): causal and cross lengths, GQA, padding, bf16 and the
#: backward through the selection.
SELECTOR_SUPPORTS = frozenset({"gqa", "backward", "bf16", "padding", "cross", "causal"})


@dataclass(eq=False)
class Selection:
    """The pairs a selector chose, in one of three forms the kernels run.

    * ``layout``: a per-batch, per-head :class:`~attnkit.layout.BlockLayout` (blocks, optionally refined at
      token grain by its ``select``), run by the ``tiled`` kernel;
    * ``layout`` with ``q_order`` / ``k_order`` ``(B, H, N)``: the layout is over the sequences permuted by
      these orders (cluster-sorted tokens, 2-D regions made contiguous); outputs are permuted back;
    * ``indices`` ``(B, H, ceil(Nq / query_block), K)`` long, ``-1`` = none: the keys of each query (or of each
      block of ``query_block`` queries), run by :func:`gather_attention`; ``key_bias`` ``(B, H, Nk)`` is
      added to the logits when the mechanism has one (Dynamic Mask Attention).

    ``q_offset`` (block-shared indices under ``causal``): query ``i`` drops keys after ``q_offset + i``.
    ``padding_applied``: the selection already excludes padded keys (the kernel need not mask them).
    ``stats`` holds what the selector wants to report (chosen budget, clusters, ...). ``causal`` is set by
    :func:`attnkit.attention` when it makes the selection (whether it was chosen under the causal cut).
    """

    layout: BlockLayout | None = None
    q_order: torch.Tensor | None = None
    k_order: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    query_block: int = 1
    key_bias: torch.Tensor | None = None
    q_len: int = 0
    kv_len: int = 0
    padding_applied: bool = False
    q_offset: int | None = None
    stats: dict = field(default_factory=dict)
    causal: bool | None = None

    def check_indices(self, batch: int, heads: int) -> None:
        """Raise :class:`~attnkit.errors.ShapeError` unless ``indices`` (a caller's, maybe hand-made) is an
        integer ``(batch or 1, heads, ceil(q_len / query_block), K)`` tensor of key ids in ``[-1, kv_len)``."""
        idx, qb = self.indices, self.query_block
        if isinstance(qb, bool) or not isinstance(qb, int) or qb < 1:
            raise ShapeError(bad("selection.query_block", "an int >= 1", repr(qb)))
        rows = -(-self.q_len // qb)
        want = f"an integer (batch or 1, {heads}, {rows}, K) tensor"
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ShapeError(bad("selection.indices", want, getattr(idx, "dtype", type(idx).__name__)))
        if idx.dim() != 4 or idx.shape[0] not in (1, batch) or tuple(idx.shape[1:3]) != (heads, rows):
            raise ShapeError(bad("selection.indices", want, tuple(idx.shape)))
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= self.kv_len):
            raise ShapeError(
                bad("selection.indices", f"key ids in [-1, {self.kv_len})", f"[{int(idx.min())}, {int(idx.max())}]")
            )
        srt = idx.sort(-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ShapeError(bad("selection.indices", "each key at most once per row", "a repeated id"))

    def dense_mask(self, heads: int) -> torch.Tensor:
        """``(B or 1, heads, Nq, Nk)`` bool: the pairs computed, in the original token order (O(N^2); tests;
        over the memory budget, :class:`~attnkit.errors.MemoryBudgetError` before allocating)."""
        B = self.indices.shape[0] if self.indices is not None else self.layout.batch
        check_memory("dense_mask", B * heads * self.q_len * self.kv_len, "run the selection with attention instead")
        if self.indices is not None:
            B, H, R, K = self.indices.shape
            m = torch.zeros(B, H, R, self.kv_len + 1, dtype=torch.bool)
            m.scatter_(-1, torch.where(self.indices >= 0, self.indices, self.kv_len), True)
            m = m[..., : self.kv_len].repeat_interleave(self.query_block, 2)[:, :, : self.q_len]
            if self.q_offset is not None:
                m = m & torch.ones(self.q_len, self.kv_len, dtype=torch.bool).tril(self.q_offset)
            return m if heads <= H else m.expand(B, heads, self.q_len, self.kv_len)
        m = self.layout.dense_mask()
        if self.q_order is not None:
            B, H = self.q_order.shape[:2]
            m = m.expand(B, H, *m.shape[2:])
            out = torch.zeros_like(m)
            # m is in permuted coordinates: row r is query q_order[r], column c is key k_order[c].
            qo = self.q_order[..., :, None].expand_as(m)
            tmp = torch.zeros_like(m).scatter_(2, qo, m)
            ko = self.k_order[..., None, :].expand_as(m)
            out = out.scatter_(3, ko, tmp)
            m = out
        if m.shape[1] == 1 and heads > 1:
            m = m.expand(m.shape[0], heads, *m.shape[2:])
        elif heads > m.shape[1]:
            m = m.repeat_interleave(heads // m.shape[1], 1)
        return m

    def density(self, causal: bool, exact: bool = True) -> float:
        """Fraction of the visible pairs (the causal triangle when ``causal``) that are computed.

        ``exact=False`` needs no ``N x N`` mask: the pairs of the layout's tiles (token-grain refinements
        ignored), or the gathered keys per query block (the causal cut inside the block ignored)."""
        return selection_density(self, causal) if exact else _tile_density(self, causal)


def visible_pairs(n: int, m: int, causal: bool) -> float:
    """Pairs ``n`` queries can see among ``m`` keys: with ``causal`` the queries are the last ``n`` of ``m``
    positions, so query ``t`` sees ``m - n + t + 1`` keys."""
    return n * (n + 1) / 2 + n * (m - n) if causal else n * m


def _tile_density(sel: Selection, causal: bool) -> float:
    visible = visible_pairs(sel.q_len, sel.kv_len, causal)
    if sel.layout is None:
        return float((sel.indices >= 0).sum() * sel.query_block) / (
            sel.indices.shape[0] * sel.indices.shape[1] * visible
        )
    return sel.layout.pairs / (sel.layout.groups * visible)


def selection_density(sel: Selection, causal: bool) -> float:
    n, m = sel.q_len, sel.kv_len
    visible = visible_pairs(n, m, causal)
    if sel.indices is None and sel.layout.select is None:
        return sel.layout.pairs / (sel.layout.groups * visible)
    mask = sel.dense_mask(1)
    if causal:
        mask = mask & torch.ones(n, m, dtype=torch.bool).tril(m - n)
    return float(mask.sum()) / (mask.shape[0] * mask.shape[1] * visible)


class Selector:
    """Base of the dynamic selectors. Subclasses implement :meth:`select`.

    Class attributes: ``granularity`` (``"block"``, ``"token-block"``, ``"token"``), ``causal_ok``,
    ``trainable`` (it has parameters trained by its own fitting function), ``paper``.
    """

    granularity = "block"
    causal_ok = True
    paper = ""

    def select(self, q, k, v=None, *, causal: bool = True, key_padding_mask=None) -> Selection:
        raise NotImplementedError


@dataclass(frozen=True)
class BlockSelector(Selector):
    """A selector over blocks of ``block_size`` tokens with a ``budget`` (fraction in ``(0, 1]`` of the
    visible key blocks, or an int number of blocks); checks both."""

    block_size: int = 64
    budget: float | int = 0.125

    def __post_init__(self):
        check_block(self.block_size)
        check_budget(self.budget)


def check_budget(budget, name: str = "budget"):
    """A budget is a fraction in ``(0, 1]`` of the visible key blocks, or an int >= 1 of blocks."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PatternError(bad(name, "a fraction in (0, 1] or an int >= 1", repr(budget)))
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise PatternError(bad(name, "a fraction in (0, 1]", budget))
    if isinstance(budget, int) and budget < 1:
        raise PatternError(bad(name, "an int >= 1 (a number of blocks)", budget))
    return budget


def check_block(block, name: str = "block_size", pair: bool = False):
    """A block is an int >= 1; with ``pair`` also ``(block_q, block_k)``, two of them."""
    if pair and isinstance(block, tuple) and len(block) == 2:
        for b in block:
            check_block(b, name)
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        want = "an int >= 1" + (" or a pair (block_q, block_k) of them" if pair else "")
        raise PatternError(bad(name, want, repr(block)))


ALLOCATIONS = ("row", "head", "layer")


def check_allocation(allocate: str):
    if allocate not in ALLOCATIONS:
        raise PatternError(bad("allocate", f"one of {ALLOCATIONS}", repr(allocate)))


def allocate_blocks(scores, allowed, forced, budget, allocate: str = "row") -> torch.Tensor:
    """Bool ``(B, H, nqb, nkb)``: the blocks a ``budget`` buys, ``forced`` first, spent per ``allocate`` scope.

    * ``"row"``: each query block keeps its ``budget`` best visible key blocks (:func:`top_blocks`);
    * ``"head"``: each (batch, head) spends ``budget`` of all its visible blocks on its best blocks across every
      query block, so rows whose scores are spread get more blocks than rows with one clear winner;
    * ``"layer"``: the same across every head of a batch row as well.

    A fractional budget is that share of the visible blocks of the scope (rounded up); an int is that many blocks
    per query block on average. Forced blocks count toward it and are kept even beyond it. Scores must be
    comparable across the scope (each row's distribution over key blocks, or its log, say) for
    ``"head"`` and ``"layer"``.
    """
    if allocate == "row":
        return top_blocks(scores, allowed, forced, budget)
    B, H, nqb, nkb = scores.shape
    allowed = allowed.expand(B, H, nqb, nkb)
    forced = torch.zeros_like(allowed) if forced is None else forced.expand(B, H, nqb, nkb) & allowed
    groups = B * H if allocate == "head" else B
    rows = nqb * (H if allocate == "layer" else 1)
    visible = allowed.reshape(groups, -1).count_nonzero(-1)
    if isinstance(budget, float):
        want = torch.ceil(visible.double() * budget).long()
    else:
        want = torch.full_like(visible, budget * rows)
    take = torch.maximum(torch.minimum(want, visible), forced.reshape(groups, -1).count_nonzero(-1))
    # Forced blocks rank first (+inf) and count toward the budget; blocks that are not allowed never rank (NaN).
    s = scores.float().masked_fill(~allowed, float("nan")).masked_fill_(forced, float("inf")).reshape(groups, -1)
    out = torch.stack([_largest(s[g], int(take[g])) for g in range(groups)])
    return out.view(B, H, nqb, nkb)


_SAMPLE = 1 << 14  # entries of x sampled to bracket the k-th value (a strided view, no copy)


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the 1-D float32 ``x`` (``+inf`` first, ``-inf`` last, NaN never),
    exact, in O(n).

    A strided sample brackets the k-th largest finite value between two sample values ``lo <= hi`` (its rank in
    the sample, widened by four standard deviations); the entries above ``hi`` are taken, and only those in
    ``[lo, hi]`` go through ``topk``. Everything over all of ``x`` is a comparison or a count: a full ``topk`` of
    300k among 2.4M block scores took 70-100 ms at 16k, selecting the finite entries (``x[isfinite(x)]``) alone
    13 ms. When the bracket misses (a sample unlike the whole), the exact histogram of :func:`_largest_binned`
    decides."""
    x = x.contiguous()
    top = x == float("inf")
    n_inf = int(top.count_nonzero())
    k_fin = k - n_inf
    if k_fin <= 0:
        return top if k_fin == 0 else _first(top, k)
    n_fin = int((x > float("-inf")).count_nonzero()) - n_inf  # NaN compares False
    if k_fin >= n_fin:  # every finite entry, then -inf ones in index order
        return top | torch.isfinite(x) | _first(x == float("-inf"), k_fin - n_fin)
    step = max(1, x.numel() // _SAMPLE)
    s = x[::step]
    s = s[torch.isfinite(s)].sort(descending=True).values
    if step == 1 or s.numel() < 64:
        return _largest_binned(x, top, k_fin)
    r = k_fin * s.numel() / n_fin  # the k-th value's expected rank in the sample
    w = 4 * math.sqrt(r + 1) + 8
    hi = float(s[max(0, int(r - w))])
    lo = float(s[min(s.numel() - 1, int(r + w))])
    over = x > hi
    need = k_fin - (int(over.count_nonzero()) - n_inf)
    cand = ((x >= lo) & (x <= hi)).nonzero()[:, 0]
    if need <= 0 or need > cand.numel():
        return _largest_binned(x, top, k_fin)
    top |= over
    top[cand[x[cand].topk(need).indices]] = True
    return top


def _largest_binned(x: torch.Tensor, top: torch.Tensor, k_fin: int) -> torch.Tensor:
    """``top`` (the ``+inf`` entries) and the ``k_fin`` largest finite entries of ``x``, by a histogram: the int32
    pattern of a float, with the bits of negatives flipped, orders like the float; its top 12 bits bin the
    entries on a log-like scale, and only the bin holding the k-th entry goes through ``topk``."""
    where = torch.isfinite(x).nonzero()[:, 0]
    xf = x[where].contiguous()
    bits = xf.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float's value
    b = (key >> 20) + 2048  # 4096 bins
    above = torch.bincount(b, minlength=4096).flip(0).cumsum(0).flip(0)  # finite entries in bins >= i
    edge = int((above >= k_fin).nonzero().max())
    over = b > edge
    cand = (b == edge).nonzero()[:, 0]
    top[where[over]] = True
    top[where[cand[xf[cand].topk(k_fin - int(over.count_nonzero())).indices]]] = True
    return top


def _first(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` True entries of ``mask`` (index order)."""
    return mask & (mask.cumsum(0, dtype=torch.int32) <= k)


def budget_count(visible: torch.Tensor, budget) -> torch.Tensor:
    """Blocks to keep per row: ``ceil(budget * visible)`` (at least 1) or the int budget, at most ``visible``."""
    if isinstance(budget, float):
        k = torch.ceil(visible.double() * budget).long().clamp(min=1)
    else:
        k = torch.full_like(visible, budget)
    return torch.minimum(k, visible)


def _ranked(scores, allowed, forced, budget):
    """``(top, keep)``: each row's best ``allowed`` entries (``forced`` first), ``(..., K)`` indices and whether
    each is within the row's count. Forced entries count toward the budget and are kept even beyond it; ties go
    to the lower index."""
    k = budget_count(allowed.sum(-1), budget)
    s = scores.float().masked_fill(~allowed, float("-inf"))
    if forced is not None:
        forced = forced & allowed
        k = torch.maximum(k, forced.sum(-1))
        s = s.masked_fill(forced, float("inf"))
    K = int(k.max()) if k.numel() else 0
    top = s.topk(K, dim=-1, sorted=True).indices
    return top, torch.arange(K) < k[..., None]


def top_blocks(scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor | None, budget) -> torch.Tensor:
    """Bool ``(..., n)``: the ``budget`` best ``allowed`` entries of each row of ``scores``, ``forced`` first."""
    top, keep = _ranked(scores, allowed, forced, budget)
    return torch.zeros_like(allowed).scatter_(-1, top, keep) & allowed


def top_keys(scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor | None, budget) -> torch.Tensor:
    """The same choice as :func:`top_blocks` as indices ``(..., K)``, ``-1`` past each row's count."""
    top, keep = _ranked(scores, allowed, forced, budget)
    return torch.where(keep, top, -1)


def query_blocks(nqb: int, block: int, q_len: int, offset: int):
    """``(first, last)``: absolute positions of the first and last query of each block (query 0 is at
    ``offset``; the last block may be short)."""
    first = offset + torch.arange(nqb) * block
    last = offset + torch.clamp((torch.arange(nqb) + 1) * block, max=q_len) - 1
    return first, last


def pool(x: torch.Tensor, block: int, how: str = "mean", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``(B, H, N, D)`` over consecutive blocks of ``block`` tokens -> ``(B, H, ceil(N / block), D)``.

    The last block may be short; ``valid`` ``(B, N)`` excludes padded tokens (a block with none pools to 0)."""
    B, H, N, D = x.shape
    nb = ceil_div(N, block)
    if valid is None and N % block == 0:  # whole blocks, no padding: a view, no copy
        xv = x.reshape(B, H, nb, block, D)
        return xv.mean(3) if how == "mean" else xv.amax(3) if how == "max" else xv.amin(3)
    xp = x.new_zeros(B, H, nb * block, D)
    xp[:, :, :N] = x
    w = x.new_zeros(B, 1, nb * block, 1)
    w[:, :, :N] = 1.0 if valid is None else valid[:, None, :, None].to(x.dtype)
    xv = xp.view(B, H, nb, block, D)
    wv = w.view(B, 1, nb, block, 1)
    if how == "mean":
        return (xv * wv).sum(3) / wv.sum(3).clamp(min=1)
    fill = float("-inf") if how == "max" else float("inf")
    r = xv.masked_fill(wv == 0, fill)
    r = r.amax(3) if how == "max" else r.amin(3)
    return r.masked_fill(~torch.isfinite(r), 0.0)


def block_visibility(nqb: int, nkb: int, block, q_len: int, kv_len: int, causal: bool) -> torch.Tensor:
    """``(nqb, nkb)`` bool: key block ``J`` has a key visible to some query of block ``I`` (``block``: an int or
    ``(block_q, block_k)``)."""
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool)
    bq, bk = tile(block)
    _, last = query_blocks(nqb, bq, q_len, kv_len - q_len)  # queries are the last q_len positions
    return (torch.arange(nkb) * bk)[None, :] <= last[:, None]


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat the ``Hkv`` heads of a key-side tensor ``(B, Hkv, ...)`` to ``heads`` query heads (GQA)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of ``(B, Hq, ...)`` over the query heads of each of ``groups`` GQA groups -> ``(B, groups, ...)``."""
    B, H = x.shape[:2]
    return x.view(B, groups, H // groups, *x.shape[2:]).mean(2)


def layout_from_rows(rows: torch.Tensor, q_len: int, kv_len: int, block: int, causal: bool, q_offset: int):
    """A layout from per-token block choices ``rows`` ``(B, H, Nq, nkb)``: the tiles are the union over each
    query block's tokens, and a :class:`~attnkit.layout.TokenSelect` keeps each token to its own choice."""
    B, H, Nq, nkb = rows.shape
    nqb = ceil_div(Nq, block)
    pad = rows.new_zeros(B, H, nqb * block, nkb)
    pad[:, :, :Nq] = rows
    blocks = pad.view(B, H, nqb, block, nkb).any(3)
    return BlockLayout.from_blocks(
        blocks,
        q_len,
        kv_len,
        block,
        causal=causal,
        q_offset=q_offset,
        select=TokenSelect(rows=rows.reshape(B * H, Nq, nkb)),
    )




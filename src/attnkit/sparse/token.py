"""Token-level selectors: each query chooses its own keys (Sparsifiner, Dynamic Mask Attention)."""

from __future__ import annotations

import torch

from ..errors import PatternError, ShapeError, bad
from ..layout import ceil_div
from ..records import register
from ._core import SELECTOR_SUPPORTS, Selection, Selector, check_budget, expand_kv, query_blocks, top_keys


def _visible(Nq: int, Nk: int, causal: bool) -> torch.Tensor:
    if not causal:
        return torch.ones(Nq, Nk, dtype=torch.bool)
    return torch.arange(Nk)[None, :] <= (Nk - Nq + torch.arange(Nq))[:, None]


class Sparsifiner(Selector, torch.nn.Module):
    r"""Sparsifiner's connectivity predictor: a low-rank estimate of every pair, top-k keys per query.

    ``c_ij = (q_i W_q^h) . (k_j W_k^h)`` with ``W_q^h, W_k^h`` of shape ``(head_dim, rank)`` per head; each query
    keeps its ``budget`` best visible keys (fraction of its visible keys or an int; under ``causal`` the
    query's own key is always kept, so no row is empty). :func:`fit_sparsifiner` trains the predictor by
    distillation from the dense attention (KL), as the paper does; initialised to a truncated identity, an
    untrained predictor ranks keys by the first ``rank`` dimensions of ``q . k``. Cost ``O(N^2 rank)``.
    """

    granularity = "token"
    paper = "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers"

    def __init__(self, heads: int, head_dim: int, rank: int = 16, budget: float | int = 0.125):
        torch.nn.Module.__init__(self)
        for name, val in (("heads", heads), ("head_dim", head_dim), ("rank", rank)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise PatternError(bad(name, "an int >= 1", repr(val)))
        check_budget(budget)
        eye = torch.eye(head_dim, rank)
        self.wq = torch.nn.Parameter(eye.expand(heads, head_dim, rank).clone())
        self.wk = torch.nn.Parameter(eye.expand(heads, head_dim, rank).clone())
        self.heads, self.head_dim, self.rank, self.budget = heads, head_dim, rank, budget

    def connectivity(self, q, k) -> torch.Tensor:
        """Predicted logits ``(B, heads, Nq, Nk)``."""
        if tuple(q.shape[1:2]) + tuple(q.shape[3:]) != (self.heads, self.head_dim):
            raise ShapeError(bad("q", f"{self.heads} heads of dim {self.head_dim}", tuple(q.shape)))
        a = torch.einsum("bhnd,hdr->bhnr", q.float(), self.wq)
        b = torch.einsum("bhnd,hdr->bhnr", expand_kv(k, self.heads).float(), self.wk)
        return a @ b.transpose(-1, -2) * self.head_dim**-0.5

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        Nq, Nk = q.shape[2], k.shape[2]
        vis_all = _visible(Nq, Nk, causal)
        rows = []
        step = max(1, (1 << 24) // max(1, q.shape[0] * self.heads * Nk))  # connectivity in chunks of queries
        off = Nk - Nq if causal else 0
        for i0 in range(0, Nq, step):
            i1 = min(Nq, i0 + step)
            vis = vis_all[i0:i1][None, None]
            if key_padding_mask is not None:
                vis = vis & key_padding_mask[:, None, None, :]
            c = self.connectivity(q[:, :, i0:i1], k)
            # Under causal the query's own key is always kept, so no row is empty.
            own = torch.arange(Nk)[None, :] == (off + torch.arange(i0, i1))[:, None] if causal else None
            rows.append(top_keys(c, vis.expand(q.shape[0], self.heads, i1 - i0, Nk), own, self.budget))
        K = max(r.shape[-1] for r in rows)
        idx = torch.cat([torch.nn.functional.pad(r, (0, K - r.shape[-1]), value=-1) for r in rows], 2)
        return Selection(indices=idx, q_len=Nq, kv_len=Nk)


def fit_sparsifiner(
    model: Sparsifiner, samples, *, steps: int = 100, lr: float = 1e-2, causal: bool = True
) -> list[float]:
    """Distil the predictor from dense attention: minimise ``KL(softmax(q k^T / sqrt d) || softmax(c))`` over
    the visible keys of each ``(q, k)`` in ``samples`` (Adam). Returns the loss per step."""
    if not samples:
        raise PatternError(bad("samples", "a non-empty list of (q, k) pairs", samples))
    with torch.no_grad():  # the targets and their entropies once per sample, not once per step
        targets = []
        for q, k in samples:
            vis = _visible(q.shape[2], k.shape[2], causal)
            t = q.float() @ expand_kv(k, q.shape[1]).float().transpose(-1, -2) * q.shape[-1] ** -0.5
            t = t.masked_fill(~vis, float("-inf")).softmax(-1)
            targets.append((vis, t, (t * t.clamp(min=1e-30).log()).sum(-1).mean()))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        q, k = samples[step % len(samples)]
        vis, t, neg_entropy = targets[step % len(samples)]
        logp = model.connectivity(q, k).masked_fill(~vis, float("-inf")).log_softmax(-1)
        loss = neg_entropy - (t * logp.masked_fill(~vis, 0.0)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


class DynamicMask(Selector, torch.nn.Module):
    r"""Dynamic Mask Attention (DMA): a content-aware key mask computed from the *values*, and position-aware
    skipping of the masked keys.

    Per key head ``h`` and key ``j``: ``z_j = exp(A_h softplus(v_j . w_h + b_h))`` with ``A_h = -exp(a_h) < 0``,
    so ``z_j`` lies in ``(0, 1]``. ``z`` is added to the logits of every query (a learned, query-independent
    importance) and each block of ``query_block`` queries keeps its own block (causal, the local context) and
    the ``budget`` keys with the largest ``z`` before it; all other keys are skipped, not computed. The mask
    shared within a query block is our choice (the abstract gives no kernel detail): it lets the gathered keys
    serve a whole block. ``a``, ``w``, ``b`` are parameters trained with the model (they get gradients through
    the bias). With ``budget`` covering every key the result is dense attention plus the bias.
    """

    granularity = "token"
    paper = "Trainable Dynamic Mask Sparse Attention"

    def __init__(self, kv_heads: int, v_dim: int, budget: float | int = 0.125, query_block: int = 64, seed: int = 0):
        torch.nn.Module.__init__(self)
        check_budget(budget)
        if isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1:
            raise PatternError(bad("query_block", "an int >= 1", repr(query_block)))
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(kv_heads, v_dim, generator=g) * v_dim**-0.5)
        self.b = torch.nn.Parameter(torch.zeros(kv_heads))
        self.a = torch.nn.Parameter(torch.zeros(kv_heads))
        self.kv_heads, self.v_dim, self.budget, self.query_block = kv_heads, v_dim, budget, query_block

    def importance(self, v) -> torch.Tensor:
        """``z`` ``(B, kv_heads, Nk)``, differentiable in the parameters and ``v``."""
        if v.shape[1] != self.kv_heads or v.shape[3] != self.v_dim:
            raise ShapeError(bad("v", f"{self.kv_heads} heads of dim {self.v_dim}", tuple(v.shape)))
        x = torch.einsum("bhnd,hd->bhn", v.float(), self.w) + self.b[:, None]
        return torch.exp(-self.a.exp()[:, None] * torch.nn.functional.softplus(x))

    def key_bias(self, v, heads: int) -> torch.Tensor:
        """The logit bias ``z`` for ``heads`` query heads, ``(B, heads, Nk)``."""
        return expand_kv(self.importance(v), heads)

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        if v is None:
            raise PatternError(bad("v", "the values (DMA's mask is computed from them)", None))
        B, Hq, Nq, _ = q.shape
        Nk, qb = k.shape[2], self.query_block
        z = self.key_bias(v, Hq)
        R = ceil_div(Nq, qb)
        off = Nk - Nq if causal else 0
        first, last = query_blocks(R, qb, Nq, off)
        j = torch.arange(Nk)
        if causal:
            local = (j[None, :] >= first[:, None]) & (j[None, :] <= last[:, None])
            vis = (j[None, :] < first[:, None]) | local
        else:
            local, vis = None, torch.ones(R, Nk, dtype=torch.bool)
        vis = vis[None, None].expand(B, Hq, R, Nk)
        if key_padding_mask is not None:
            vis = vis & key_padding_mask[:, None, None, :]
        scores = z[:, :, None, :].expand(B, Hq, R, Nk)
        idx = top_keys(scores, vis, None if local is None else local[None, None], self.budget)
        return Selection(indices=idx, query_block=qb, key_bias=z, q_len=Nq, kv_len=Nk, q_offset=off if causal else None)


_SELECTOR = SELECTOR_SUPPORTS | {"trainable"}


def _sparsifiner(n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64, predictor=None):
    # A fitted predictor's weights at this budget; without one, the untrained (truncated identity) predictor.
    sel = Sparsifiner(heads, head_dim, rank=max(1, head_dim // 4), budget=budget)
    if predictor is not None:
        sel.load_state_dict(predictor.state_dict())
    return sel


def _fit_sparsifiner(q, k, v, *, tokens: int = 1024):
    """The connectivity predictor distilled from dense attention (:func:`fit_sparsifiner`'s defaults: 100 Adam
    steps at lr 1e-2) on the first ``tokens`` held-out tokens. It has no positional part, so one fit serves every
    length; the dense target is ``tokens x tokens`` per head (at 4k, 150 M floats per tensor)."""
    q, k = q[:, :, :tokens], k[:, :, :tokens]
    model = Sparsifiner(q.shape[1], q.shape[3], rank=max(1, q.shape[3] // 4))
    fit_sparsifiner(model, [(q, k)])
    return {"predictor": model.eval()}


register(
    "sparsifiner",
    family="B",
    kind="selector",
    paper=Sparsifiner.paper,
    exact=False,
    supports=_SELECTOR,
    factory=_sparsifiner,
    summary="low-rank connectivity predictor (fit_sparsifiner distils it), top-k keys per query (token level)",
    source=Sparsifiner,
    tags={"slow"},
    fit=_fit_sparsifiner,
)
# Dynamic Mask Attention's parameters are trained with the model (language-model loss): no fit here, the
# benchmark runs it at initialisation.
register(
    "dynamic_mask",
    family="B",
    kind="selector",
    paper=DynamicMask.paper,
    exact=False,
    supports=_SELECTOR,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: DynamicMask(
        kv_heads, head_dim, budget=budget, query_block=block
    ),
    summary="key mask and bias from the values, top-k keys per query block (token level)",
    source=DynamicMask,
    tags={"slow"},
)

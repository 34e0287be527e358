r"""``Attention``: the multi-head attention layer over ``(B, N, dim)`` for any registered mechanism, with a cache.

.. math::
    Q = x W_q,\quad K = c W_k,\quad V = c W_v \quad (c = x \text{ or the cross-attention context}),\qquad
    \mathrm{out} = \mathrm{concat}_h\,
        \mathrm{mech}\big(\mathrm{rope}(Q_h), \mathrm{rope}(K_{g(h)}), V_{g(h)}\big)\, W_o

with ``kv_heads`` key/value heads shared by groups of ``heads / kv_heads`` query heads (grouped-query attention;
``kv_heads = 1`` is multi-query attention), an optional RMS normalisation of each head's query and key before
the rotation (QK-norm), and ``mech`` any of:

* ``None``: dense softmax attention (causal when ``causal=True``);
* a static :class:`~attnkit.patterns.Pattern` (sliding window, dilated, A-shape, neighbourhood...), intersected
  with the causal mask when ``causal=True``;
* a dynamic :class:`~attnkit.sparse.Selector` (MoBA, routing, top-k blocks...), selecting under the causal cut;
* a family-C :class:`~attnkit.records.Mechanism` (linear attention, RetNet, Lightning, sigmoid and softplus
  attention...);
* the name of any of these in the registry (``"sliding_window"``, ``"moba"``, ``"retnet"``), made by its record
  for sequences of about ``max_seq_len`` tokens (selectors with this layer's head sizes).

Decode. ``layer(x, cache=layer.make_cache(batch, max_len))`` takes the next tokens of a sequence whose earlier
tokens the cache holds (a prompt, then one token at a time) and returns their outputs. Softmax mechanisms
cache K and V with ``kv_heads`` heads (:class:`~attnkit.layers.cache.KVCache`; never expanded to the query
heads) and run the new queries at absolute positions (``q_offset``), so a pattern masks by position as in the
uncached forward; linear mechanisms carry their recurrent state (:class:`~attnkit.layers.cache.StateCache`).
A mechanism whose record claims ``decode`` gives, token by token, what the uncached forward gives (tested for
every one in the registry). A content-based selector also runs on a cache, but it chooses per call from the
queries it is given, so its decode is its own approximation, not the uncached forward. A per-head cache
(``make_cache(..., per_head=True)``, :class:`~attnkit.layers.cache.HeadKVCache`) lets an evicting policy keep
different tokens in each KV head.

Conventions: projections are ``nn.Linear`` with PyTorch's default (Kaiming-uniform) initialisation, as in
x-transformers and torchtune, named ``q_proj, k_proj, v_proj, o_proj`` (Llama's names, so a Hugging Face
checkpoint maps one to one); RoPE is applied to self-attention only (a cross-attention context has no
positions shared with the queries); ``dropout`` drops the layer's output (the kernels do not drop attention
weights).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import linear as _linear  # noqa: F401  (registers the family-C records a name may refer to)
from .. import patterns as _patterns  # noqa: F401
from .. import reference as _reference
from .. import sparse as _sparse  # noqa: F401
from ..api import attention
from ..distributed import context_parallel_attention, context_parallel_linear_attention, local_positions
from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..linear.engine import linear_attention
from ..patterns.base import Pattern
from ..records import Mechanism, all_records
from ..scores import Normalizer, ScoreMod
from ..sparse import BlockTopK
from ..sparse._core import Selector
from ._headutil import head_sizes
from .cache import Cache, HeadKVCache, KVCache, StateCache
from .rope import Rotary

_MECHANISM_KINDS = ("pattern", "selector", "function")


def resolve(mechanism, *, heads: int, kv_heads: int, head_dim: int, n: int = 2048):
    """The object a ``mechanism=`` argument names: None, a Pattern, a Selector or a Mechanism, made from its
    record when it is a registry name (a selector with these head sizes)."""
    if isinstance(mechanism, str):
        recs = all_records()
        rec = recs.get(mechanism)
        if rec is None or rec.kind not in _MECHANISM_KINDS:
            names = sorted(r.name for r in recs.values() if r.kind in _MECHANISM_KINDS)
            raise ShapeError(
                bad("mechanism", f"a pattern, selector or function in the registry, one of {names}", repr(mechanism))
            )
        opts = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim} if rec.kind == "selector" else {}
        mechanism = rec.make(n, **opts)
    if mechanism is None or isinstance(mechanism, (Pattern, Selector, Mechanism)):
        return mechanism
    raise ShapeError(
        bad("mechanism", "None, a Pattern, a Selector, a Mechanism or a registry name", type(mechanism).__name__)
    )


def _padding(mech: Mechanism, kpm) -> dict:
    """``{"key_padding_mask": kpm}`` when there is one; a mechanism without padding support refuses it."""
    if kpm is None:
        return {}
    if "key_padding_mask" not in inspect.signature(mech.fn).parameters:
        raise UnsupportedError(bad("key_padding_mask", f"None: {mech.fn.__name__} takes no key padding", "a mask"))
    return {"key_padding_mask": kpm}


_CP_LINEAR = ("feature_map", "decay", "normalize", "scale", "chunk_size")


def _check_context_parallel(m, score, balance) -> None:
    """What a context-parallel layer can run, refused at construction rather than at the first forward."""
    if balance not in ("contiguous", "zigzag"):
        raise ShapeError(bad("cp_balance", "'contiguous' or 'zigzag'", repr(balance)))
    if isinstance(score, Normalizer):
        raise UnsupportedError(bad("score", "a ScoreMod or None with process_group", type(score).__name__))
    if _is_linear(m):
        extra = sorted(set(m.kwargs) - set(_CP_LINEAR) - {"causal", "mode"})
        if not m.kwargs.get("causal", True) or extra or balance != "contiguous":
            raise UnsupportedError(
                bad("mechanism", "causal linear attention on contiguous shards with process_group", m.kwargs)
            )
    elif isinstance(m, Mechanism) or (isinstance(m, Selector) and not isinstance(m, BlockTopK)):
        name = m.fn.__name__ if isinstance(m, Mechanism) else type(m).__name__
        raise UnsupportedError(
            bad("mechanism", "None, a static Pattern, a BlockTopK selector or causal linear attention with "
                "process_group", name)
        )


def _is_linear(mech) -> bool:
    return isinstance(mech, Mechanism) and mech.fn is linear_attention


def _is_softmax_function(mech) -> bool:
    return isinstance(mech, Mechanism) and mech.fn is attention


class Attention(nn.Module):
    """Multi-head (grouped-query) attention over ``(B, N, dim)`` with any mechanism; see the module docstring.

    Args:
        dim: model width.
        heads: query heads.
        kv_heads: key/value heads (default ``heads``); must divide ``heads``.
        head_dim: channels per head (default ``dim // heads``).
        mechanism: None (dense), a Pattern, a Selector, a family-C Mechanism, or a registry name.
        score: a :class:`~attnkit.scores.ScoreMod` (ALiBi, softcap...) or a
            :class:`~attnkit.scores.Normalizer` (sigmoid, softplus) for the softmax mechanisms.
        rope: None, True (RoPE with base 10,000), or a :class:`~attnkit.layers.Rotary`.
        qk_norm: RMS-normalise each head's query and key (with a learned gain) before RoPE.
        bias: biases in the projections.
        dropout: dropout on the output, in training.
        causal: query ``i`` sees only keys ``j <= i`` (self-attention only).
        context_dim: width of the cross-attention context (default ``dim``).
        max_seq_len: the sequence length a registry name's record sizes its mechanism for.
        backend: the :func:`attnkit.attention` backend (``"auto"``).
        process_group: a ``torch.distributed`` group: the layer runs context-parallel
            (:func:`attnkit.distributed.context_parallel_attention`, or the linear form for a linear mechanism).
            Each rank passes its shard of the sequence ``(B, n_r, dim)``; RoPE uses the shard's global positions.
            ``torch.distributed.group.WORLD`` for the default group.
        cp_balance: how the sequence is sharded with ``process_group``: ``"contiguous"`` or ``"zigzag"``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        mechanism=None,
        score=None,
        rope=None,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = True,
        context_dim: int | None = None,
        max_seq_len: int = 2048,
        backend: str = "auto",
        process_group=None,
        cp_balance: str = "contiguous",
    ):
        super().__init__()
        kv_heads, head_dim = head_sizes(dim, heads, kv_heads, head_dim)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShapeError(bad("dropout", "a number in [0, 1)", repr(dropout)))
        if score is not None and not isinstance(score, (ScoreMod, Normalizer)):
            raise ShapeError(bad("score", "a ScoreMod, a Normalizer or None", type(score).__name__))
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.backend = bool(causal), backend
        cdim = dim if context_dim is None else context_dim
        check_count("context_dim", cdim, 1)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.rotary = Rotary(head_dim) if rope is True else rope
        if self.rotary is not None and not (isinstance(self.rotary, Rotary) and self.rotary.head_dim == head_dim):
            raise ShapeError(bad("rope", f"None, True or a Rotary(head_dim={head_dim})", repr(rope)))
        self.dropout = nn.Dropout(dropout)
        self.score = score
        self.mechanism = resolve(mechanism, heads=heads, kv_heads=kv_heads, head_dim=head_dim, n=max_seq_len)
        self.process_group, self.cp_balance = process_group, cp_balance
        if process_group is not None:
            _check_context_parallel(self.mechanism, self.score, cp_balance)
        if score is not None and isinstance(self.mechanism, Mechanism):
            raise ShapeError(bad("score", "None with a family-C mechanism (it has its own weights)", repr(score)))
        if _is_linear(self.mechanism) and self.causal != self.mechanism.kwargs.get("causal", True):
            raise ShapeError(
                bad("causal", f"{self.mechanism.kwargs.get('causal', True)}, as the linear mechanism is", causal)
            )
        # A family-C mechanism may build learnable parts per head shape (Hedgehog's feature map); build them now
        # and register them, so they train and are saved with the layer.
        self.mechanism_parts = nn.ModuleDict()
        if isinstance(self.mechanism, Mechanism):
            args = self.mechanism._args(torch.empty(1, heads, 1, head_dim, device="meta"))
            for key, val in args.items():
                if isinstance(val, nn.Module):
                    self.mechanism_parts[key] = val

    def extra_repr(self) -> str:
        mech = "dense" if self.mechanism is None else type(self.mechanism).__name__
        sizes = f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"
        return f"{sizes}, mechanism={mech}, causal={self.causal}"

    # -- caches -------------------------------------------------------------------------------------------------

    @property
    def decodes_exactly(self) -> bool:
        """Whether a cached decode gives what the uncached forward gives (by construction; tested per record)."""
        m = self.mechanism
        return (
            self.causal
            and not isinstance(m, Selector)
            and (not isinstance(m, Mechanism) or _is_linear(m) or _is_softmax_function(m))
        )

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None, per_head: bool = False) -> Cache:
        """A cache for ``max_len`` tokens of ``batch`` sequences: a :class:`StateCache` for a linear mechanism,
        a :class:`HeadKVCache` with ``per_head=True``, else a preallocated :class:`KVCache`."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        m = self.mechanism
        if isinstance(m, Mechanism) and not (_is_linear(m) or _is_softmax_function(m)):
            raise UnsupportedError(
                bad("mechanism", "a softmax or linear-attention mechanism for a decode cache", m.fn.__name__)
            )
        if _is_linear(m):
            return StateCache()
        w = self.k_proj.weight
        cls = HeadKVCache if per_head else KVCache
        return cls(batch, self.kv_heads, max_len, self.head_dim, dtype=dtype or w.dtype, device=device or w.device)

    # -- forward ------------------------------------------------------------------------------------------------

    def project(self, x, context=None, positions=None):
        """``(q, k, v)`` as ``(B, heads, N, head_dim)`` / ``(B, kv_heads, Nk, head_dim)``, normed and rotated."""
        B, N, _ = x.shape
        c = x if context is None else context
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(c).view(B, c.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(c).view(B, c.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``.

        Args:
            context: ``(B, Nk, context_dim)`` for cross attention (keys and values from it; not causal).
            key_padding_mask: bool ``(B, Nk)``, True where the key is real (with a cache: ``(B, N)`` for the new
                tokens; earlier ones are remembered).
            cache: from :meth:`make_cache`; ``x`` holds the tokens after those cached.
            positions: ``(N,)`` or ``(B, N)`` absolute positions for RoPE (default: from the cache's length;
                pass them for left-padded batches).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(bad("x", f"(B, N, {self.dim})", tuple(x.shape)))
        if context is not None:
            if cache is not None:
                raise UnsupportedError(bad("cache", "None with a cross-attention context", type(cache).__name__))
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.k_proj.in_features:
                raise ShapeError(bad("context", f"({x.shape[0]}, Nk, {self.k_proj.in_features})", tuple(context.shape)))
        start = 0 if cache is None else cache.length
        if self.process_group is not None:
            if cache is not None or context is not None:
                what, got = ("cache", type(cache).__name__) if cache is not None else ("context", "a context")
                raise UnsupportedError(bad(what, "None in a context-parallel layer (self-attention, no decode)", got))
            if positions is None:
                positions = local_positions(x.shape[1], balance=self.cp_balance, group=self.process_group)
        elif positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v = self.project(x, context, positions)
        if self.process_group is not None:
            out = self._attend_parallel(q, k, v, key_padding_mask)
        else:
            out = self._attend(q, k, v, key_padding_mask, cache, cross=context is not None)
        B, _, N, _ = out.shape
        return self.dropout(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))

    def _attend_parallel(self, q, k, v, kpm):
        m, group = self.mechanism, self.process_group
        if _is_linear(m):
            kw = {key: val for key, val in m._args(q).items() if key in _CP_LINEAR}
            return context_parallel_linear_attention(q, k, v, key_padding_mask=kpm, group=group, **kw)
        return context_parallel_attention(
            q, k, v, pattern=m, causal=self.causal, score=self.score, key_padding_mask=kpm,
            balance=self.cp_balance, group=group,
        )

    def _attend(self, q, k, v, kpm, cache, *, cross=False):
        m, start = self.mechanism, 0 if cache is None else cache.length
        if cache is not None and not self.causal:
            raise UnsupportedError(bad("cache", "None for a non-causal layer", type(cache).__name__))
        if _is_linear(m):
            if cache is None:
                return m(q, k, v, key_padding_mask=kpm)
            if not isinstance(cache, StateCache):
                raise ShapeError(
                    bad("cache", "the StateCache of make_cache() for a linear mechanism", type(cache).__name__)
                )
            out, cache.state = m(q, k, v, key_padding_mask=kpm, initial_state=cache.state, return_state=True)
            cache.length += k.shape[2]
            return out
        if isinstance(m, Mechanism) and not _is_softmax_function(m):
            if cache is not None:
                raise UnsupportedError(bad("cache", f"None: {m.fn.__name__} has no decode form", type(cache).__name__))
            return m(q, k, v, **_padding(m, kpm))
        if cache is not None:
            if isinstance(cache, StateCache) or not isinstance(cache, KVCache):
                raise ShapeError(bad("cache", "the KVCache of make_cache()", type(cache).__name__))
            if isinstance(cache, HeadKVCache):
                return self._attend_per_head(q, k, v, kpm, cache)
            k, v, kpm = cache.append(k, v, kpm)
        causal = self.causal and not cross
        if isinstance(m, Mechanism):  # sigmoid / softplus attention: attention() with its own pattern
            return m(q, k, v, key_padding_mask=kpm, q_offset=start)
        kw = {"normalizer": self.score} if isinstance(self.score, Normalizer) else {"score": self.score}
        if isinstance(m, Selector):
            return attention(
                q, k, v, pattern=m, key_padding_mask=kpm, causal=causal and m.causal_ok, backend=self.backend, **kw
            )
        return attention(
            q, k, v, pattern=m, key_padding_mask=kpm, q_offset=start, causal=causal, backend=self.backend, **kw
        )

    def reference(self, x, *, dtype=torch.float64, context=None, key_padding_mask=None, positions=None):
        """The float64 oracle (:func:`attnkit.reference.attention_layer`) on this layer's weights, in ``dtype``;
        a selector's choice is made by the selector on the oracle's own ``q, k`` (the choice is not what is
        under test, the attention over it is). Dropout is not applied."""
        weights = {name: t.detach() for name, t in self.state_dict().items() if not name.startswith("mechanism_parts")}
        rot = self.rotary
        rotary = None if rot is None else (rot.inv_freq.to(torch.float64), rot.rotated, rot.magnitude)
        m, kpm, causal = self.mechanism, key_padding_mask, self.causal and context is None
        kw, attend = {"key_padding_mask": kpm}, None
        if isinstance(m, Mechanism):

            def attend(q, k, v):
                return m.reference(q, k, v, dtype=dtype, **_padding(m, kpm))
        elif isinstance(m, Selector):

            def attend(q, k, v):
                sel = m.select(q, k, v, causal=causal and m.causal_ok, key_padding_mask=kpm)
                return _reference.selected_attention(
                    q, k, v, sel, causal=causal and m.causal_ok, key_padding_mask=kpm, dtype=dtype
                )
        else:
            kw["pattern"] = m
            if causal:
                n, nk = x.shape[1], x.shape[1] if context is None else context.shape[1]
                kw["mask"] = torch.ones(n, nk, dtype=torch.bool, device=x.device).tril()
            kw["normalizer" if isinstance(self.score, Normalizer) else "score"] = self.score
        return _reference.attention_layer(
            x,
            weights,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            context=context,
            positions=positions,
            rotary=rotary,
            norm_eps=None if self.q_norm is None else self.q_norm.eps,
            attend=attend,
            dtype=dtype,
            **kw,
        )

    def _attend_per_head(self, q, k, v, kpm, cache: HeadKVCache):
        # Each (batch, kv head) keeps its own tokens: run it as a batch row of its own, its query group as heads.
        uniform = cache.uniform
        start = cache.length
        k_all, v_all, mask = cache.append(k, v, kpm)
        B, Hkv, L, D = k_all.shape
        g, n = self.heads // Hkv, q.shape[2]
        qf = q.reshape(B * Hkv, g, n, D)
        kf, vf = k_all.reshape(B * Hkv, 1, L, D), v_all.reshape(B * Hkv, 1, L, v_all.shape[-1])
        m = self.mechanism if uniform else None
        if not uniform and not (m is None or getattr(self.mechanism, "causal", False)):
            raise UnsupportedError(
                bad(
                    "mechanism",
                    "dense causal attention over a cache whose heads evicted keys",
                    type(self.mechanism).__name__,
                )
            )
        out = attention(
            qf,
            kf,
            vf,
            pattern=m,
            key_padding_mask=mask.reshape(B * Hkv, L),
            q_offset=start if uniform else L - n,
            causal=True,
            backend=self.backend,
        )
        return out.reshape(B, self.heads, n, -1)

r"""BAM's soft mixture of attention experts ("BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts", Zhang, Gritsch, Gnaneshwar, Guo, Cairuz, Venkitesh, Foerster, Blunsom, Ruder, Üstün and
Locatelli, 2024).

``E`` attention experts, each a multi-head attention with its own projections (in BAM, upcycled from ``E``
branch-trained dense models), mixed per token by a softmax router over all of them (soft routing):

.. math::
    \mathrm{BAM}(x)_t = \sum_{e=1}^{E} p_e(x_t)\, \mathrm{MHA}_e(x)_t,\qquad p(x_t) = \mathrm{softmax}(W_r x_t),\qquad
    \mathrm{MHA}_e(x) = \mathrm{concat}_h\, \mathrm{softmax}\!\big(Q^{e}_h K^{e\top}_h / \sqrt d\big) V^{e}_h\, W_O^{e}

with :math:`Q^e = x W_Q^e` and either expert key/value projections :math:`K^e = x W_K^e, V^e = x W_V^e` (the
paper's best-quality variant, "KV experts") or one key/value projection shared by every expert
(``shared_kv=True``, :math:`K^e = K, V^e = V`: the inference-efficient variant; the KV cache is then the size of
a single attention's).

Implementation: the ``E x H`` expert heads run as one :func:`attnkit.attention` call. With shared K/V they are
grouped-query attention (the ``E`` experts of head ``h`` are the query group of key/value head ``h``), so the
cache holds ``H`` heads; with expert K/V every expert head has its own key/value head. The router weight scales
each expert's heads before one stacked output projection (:math:`\sum_e p_e A_e W_O^e = [p_1 A_1, \dots]
[W_O^1; \dots]`).

Choices where the paper is silent or out of scope here: the router is a bias-free linear map of the token
(randomly initialised, as in the paper's upcycling); soft routing over all experts (the paper's choice for
attention; it compares top-k routing and finds soft routing better), so no load-balance loss; projections have
no biases; BAM's parallel attention + FFN block and the upcycling from dense checkpoints
(:meth:`BAMAttention.from_dense`, which copies given layers' weights into the experts) belong to the model, not to
this layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from ..reference import heads as ref
from ._headutil import check_input, check_padding, head_sizes
from .cache import KVCache


class BAMAttention(nn.Module):
    """Soft mixture of ``experts`` attention experts over ``(B, N, dim)``; see the module docstring.

    Args:
        dim: model width. heads: heads per expert. experts: number of attention experts ``E``.
        shared_kv: one key/value projection for every expert (else one per expert).
        head_dim: channels per head (default ``dim // heads``).
        dropout: dropout on the output, in training. causal: query ``i`` sees keys ``j <= i``.
        backend: the :func:`attnkit.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        experts: int = 2,
        shared_kv: bool = False,
        head_dim: int | None = None,
        dropout: float = 0.0,
        causal: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        _, head_dim = head_sizes(dim, heads, None, head_dim)
        check_count("experts", experts, 1)
        if not isinstance(shared_kv, bool):
            raise ShapeError(bad("shared_kv", "a bool", repr(shared_kv)))
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShapeError(bad("dropout", "a number in [0, 1)", repr(dropout)))
        self.dim, self.heads, self.experts, self.head_dim = dim, heads, experts, head_dim
        self.shared_kv, self.causal, self.backend = shared_kv, bool(causal), backend
        self.kv_heads = heads if shared_kv else experts * heads
        inner = heads * head_dim
        self.router = nn.Linear(dim, experts, bias=False)
        self.q_proj = nn.Linear(dim, experts * inner, bias=False)  # rows (expert, head, channel)
        self.k_proj = nn.Linear(dim, self.kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(experts * inner, dim, bias=False)  # columns (expert, head, channel)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (
            f"experts={self.experts}, heads={self.heads}, head_dim={self.head_dim}, shared_kv={self.shared_kv}, "
            f"causal={self.causal}"
        )

    @classmethod
    def from_dense(cls, layers, **kw) -> BAMAttention:
        """Upcycle: a BAM layer whose experts start from dense :class:`~attnkit.layers.Attention` layers (same
        ``dim``, ``heads``, ``head_dim``, MHA without biases); with ``shared_kv`` the key/value weights are their
        average, as the paper merges non-expert parameters."""
        layers = list(layers)
        if not layers:
            raise ShapeError(bad("layers", "at least one dense Attention layer", 0))
        a = layers[0]
        self = cls(a.dim, a.heads, experts=len(layers), head_dim=a.head_dim, causal=a.causal, **kw)
        for i, la in enumerate(layers):
            if (la.dim, la.heads, la.kv_heads, la.head_dim) != (
                a.dim,
                a.heads,
                a.heads,
                a.head_dim,
            ) or la.q_proj.bias is not None:
                raise ShapeError(
                    bad(f"layers[{i}]", f"MHA without biases like layers[0] (dim={a.dim}, heads={a.heads})", la)
                )
        inner = a.heads * a.head_dim
        with torch.no_grad():
            for e, la in enumerate(layers):
                self.q_proj.weight[e * inner : (e + 1) * inner] = la.q_proj.weight
                self.o_proj.weight[:, e * inner : (e + 1) * inner] = la.o_proj.weight
                if not self.shared_kv:
                    self.k_proj.weight[e * inner : (e + 1) * inner] = la.k_proj.weight
                    self.v_proj.weight[e * inner : (e + 1) * inner] = la.v_proj.weight
            if self.shared_kv:
                self.k_proj.weight.copy_(torch.stack([la.k_proj.weight for la in layers]).mean(0))
                self.v_proj.weight.copy_(torch.stack([la.v_proj.weight for la in layers]).mean(0))
        return self

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A :class:`KVCache` of ``H`` key/value heads (shared K/V) or ``E x H`` (expert K/V)."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        w = self.k_proj.weight
        return KVCache(batch, self.kv_heads, max_len, self.head_dim, dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x, *, key_padding_mask=None, cache=None, positions=None):
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``. ``key_padding_mask`` bool ``(B, N)`` (True = real key; with a
        cache, for the new tokens); ``cache`` from :meth:`make_cache`; ``positions`` is accepted for the layer
        protocol and unused (no positional encoding in this layer)."""
        check_input(x, self.dim)
        check_padding(key_padding_mask, x)
        B, N, _ = x.shape
        E, H, D = self.experts, self.heads, self.head_dim
        q = self.q_proj(x).view(B, N, E, H, D)
        k = self.k_proj(x).view(B, N, self.kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.kv_heads, D).transpose(1, 2)
        # Shared K/V: query heads ordered (head, expert), so the E experts of head h form its GQA group.
        q = q.permute(0, 3, 2, 1, 4) if self.shared_kv else q.permute(0, 2, 3, 1, 4)
        q = q.reshape(B, E * H, N, D)
        start, kpm = 0, key_padding_mask
        if cache is not None:
            if not isinstance(cache, KVCache) or cache.k.shape[1] != self.kv_heads:
                raise ShapeError(bad("cache", "the KVCache of make_cache()", type(cache).__name__))
            start = cache.length
            k, v, kpm = cache.append(k, v, kpm)
        o = attention(q, k, v, key_padding_mask=kpm, q_offset=start, causal=self.causal, backend=self.backend)
        o = o.view(B, *((H, E) if self.shared_kv else (E, H)), N, D)
        o = o.permute(0, 3, 2, 1, 4) if self.shared_kv else o.permute(0, 3, 1, 2, 4)  # (B, N, E, H, D)
        p = torch.softmax(self.router(x), -1)
        o = (o * p[..., None, None].to(o.dtype)).reshape(B, N, E * H * D)
        return self.dropout(self.o_proj(o))

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, **forward_kw):
        """The float64 oracle (:func:`attnkit.reference.heads.bam`, one expert at a time)."""
        if forward_kw:
            raise ShapeError(bad("forward_kw", "only key_padding_mask for the reference", sorted(forward_kw)))
        E, inner = self.experts, self.heads * self.head_dim
        wk, wv = self.k_proj.weight, self.v_proj.weight
        if not self.shared_kv:
            wk, wv = wk.view(E, inner, self.dim), wv.view(E, inner, self.dim)
        return ref.bam(
            x.to(dtype),
            wr=self.router.weight,
            wq=self.q_proj.weight.view(E, inner, self.dim),
            wk=wk,
            wv=wv,
            wo=self.o_proj.weight.view(self.dim, E, inner).transpose(0, 1),
            experts=E,
            heads=self.heads,
            shared_kv=self.shared_kv,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dtype=dtype,
        )


_PAPER = (
    "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts "
    "(Zhang, Gritsch, Gnaneshwar, Guo, Cairuz, Venkitesh, Foerster, Blunsom, Ruder, Üstün, Locatelli, 2024)"
)
for _name, _shared, _what in (("bam", False, "expert K/V"), ("bam_shared_kv", True, "K/V shared by every expert")):
    register(
        _name,
        family="D",
        kind="layer",
        paper=_PAPER,
        exact=True,
        supports={"causal", "decode", "backward", "padding"},
        factory=lambda n, *, dim=64, heads=4, experts=2, _s=_shared: BAMAttention(
            dim, heads, experts=experts, shared_kv=_s
        ),
        summary=f"soft mixture of attention experts ({_what}), a softmax router weighing every expert per token",
        source=BAMAttention,
    )

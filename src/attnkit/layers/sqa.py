r"""SQA: Sparse Query Attention ("Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism
with Query Heads Reduction", Filipek, 2025, arXiv 2510.01817).

A model sized for ``H`` heads of ``d = dim / H`` channels keeps the head size but uses only ``H_q < H`` query
heads (and ``H_kv <= H_q`` key/value heads, grouped as in GQA):

.. math::
    Q = x W_q \in \mathbb{R}^{N \times H_q d},\quad K = x W_k,\ V = x W_v \in \mathbb{R}^{N \times H_{kv} d},\qquad
    \mathrm{SQA}(x) = \mathrm{concat}_{h \le H_q}\, \mathrm{softmax}\!\big(Q_h K_{g(h)}^\top / \sqrt d\big)
        V_{g(h)}\, W_o,\quad W_o \in \mathbb{R}^{H_q d \times \mathrm{dim}}

The score and value products cost :math:`4 B H_q N^2 d` FLOPs (dense, non-causal) instead of
:math:`4 B H N^2 d`: the attention FLOPs scale with ``H_q / H`` (GQA and MQA cut ``H_kv``, which shrinks the KV
cache but not these FLOPs). The output projection shrinks with ``H_q`` too.

The paper's variants (:data:`VARIANTS`, ``variant=`` or the class methods), for ``H`` total heads:

* ``"standard"`` (SQA): ``H_q = H/2``, ``H_kv = H/4``;
* ``"symmetric"`` (sSQA): ``H_q = H_kv = H/2``;
* ``"extreme"`` (xSQA): ``H_q = H_kv = H/4``;
* ``"extreme_mqa"`` (xSMQA): ``H_q = H/4``, ``H_kv = 1``.

Where the paper allows ``H_kv > H_q`` (keys repeated for queries) this layer refuses it: grouped-query attention
needs ``H_kv`` to divide ``H_q``. The head size stays ``dim / H`` as in the paper (and RxNN's implementation,
``RxAI-dev/RxNN docs/research/sparse_query_attention.md``, read for the variant table). Everything else (caches,
RoPE, patterns) is :class:`~attnkit.layers.Attention` with ``heads = H_q``.
"""

from __future__ import annotations

import torch

from ..api import explain
from ..errors import ShapeError, bad, check_count
from ..records import register
from ..reference import heads as ref
from ._headutil import linear_weights
from .attention import Attention

#: variant -> (H / H_q, H / H_kv); None for H_kv = 1.
VARIANTS = {"standard": (2, 4), "symmetric": (2, 2), "extreme": (4, 4), "extreme_mqa": (4, None)}


def variant_heads(variant: str, heads: int) -> tuple[int, int]:
    """``(q_heads, kv_heads)`` of an SQA variant for ``heads`` total heads."""
    if variant not in VARIANTS:
        raise ShapeError(bad("variant", f"one of {sorted(VARIANTS)}", repr(variant)))
    fq, fkv = VARIANTS[variant]
    need = fq if fkv is None else max(fq, fkv)
    if heads % need:
        raise ShapeError(bad("heads", f"a multiple of {need} for the {variant!r} variant", heads))
    return heads // fq, 1 if fkv is None else heads // fkv


class SparseQueryAttention(Attention):
    """Sparse Query Attention over ``(B, N, dim)``; see the module docstring.

    Args:
        dim: model width. heads: the total heads ``H`` the model is sized for (head size ``dim / H``).
        q_heads: query heads ``H_q`` (``1 <= H_q <= H``). kv_heads: key/value heads (a divisor of ``H_q``).
        variant: one of :data:`VARIANTS`, instead of ``q_heads``/``kv_heads``.
        **kw: :class:`~attnkit.layers.Attention` options (``causal``, ``bias``, ``rope``, ``mechanism``...).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        q_heads: int | None = None,
        kv_heads: int | None = None,
        variant: str | None = None,
        head_dim: int | None = None,
        **kw,
    ):
        check_count("dim", dim, 1)
        check_count("heads", heads, 1)
        if variant is not None:
            if q_heads is not None or kv_heads is not None:
                raise ShapeError(bad("variant", "None when q_heads or kv_heads are given", repr(variant)))
            q_heads, kv_heads = variant_heads(variant, heads)
        q_heads = max(1, heads // 2) if q_heads is None else q_heads
        check_count("q_heads", q_heads, 1)
        if q_heads > heads:
            raise ShapeError(bad("q_heads", f"at most heads={heads}", q_heads))
        kv_heads = q_heads if kv_heads is None else kv_heads
        check_count("kv_heads", kv_heads, 1)
        if q_heads % kv_heads:
            raise ShapeError(bad("kv_heads", f"a divisor of q_heads={q_heads}", kv_heads))
        if head_dim is None:
            if dim % heads:
                raise ShapeError(bad("heads", f"a divisor of dim={dim} (or give head_dim)", heads))
            head_dim = dim // heads
        super().__init__(dim, q_heads, kv_heads=kv_heads, head_dim=head_dim, **kw)
        self.total_heads, self.q_heads, self.variant = heads, q_heads, variant

    @classmethod
    def symmetric(cls, dim: int, heads: int, **kw) -> SparseQueryAttention:
        """sSQA: ``H_q = H_kv = H / 2``."""
        return cls(dim, heads, variant="symmetric", **kw)

    @classmethod
    def extreme(cls, dim: int, heads: int, **kw) -> SparseQueryAttention:
        """xSQA: ``H_q = H_kv = H / 4``."""
        return cls(dim, heads, variant="extreme", **kw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", total_heads={self.total_heads}"

    def attention_flops(self, n: int, *, batch: int = 1) -> float:
        """The attention FLOPs (scores and weighted values) of a forward over ``n`` tokens, as
        :func:`attnkit.explain` counts them."""
        check_count("n", n, 1)
        w = self.q_proj.weight
        q = torch.randn(batch, self.heads, n, self.head_dim, dtype=w.dtype)
        k = torch.randn(batch, self.kv_heads, n, self.head_dim, dtype=w.dtype)
        return explain(q, k, k, causal=self.causal).flops

    def forward(self, x, *, key_padding_mask=None, cache=None, positions=None, context=None):
        """As :meth:`Attention.forward`."""
        return super().forward(x, context=context, key_padding_mask=key_padding_mask, cache=cache, positions=positions)

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, **forward_kw):
        """The float64 oracle: :func:`attnkit.reference.heads.mha` with ``H_q`` query heads for plain attention;
        with RoPE, QK-norm, a mechanism, a score or a context, the attention layer's own oracle
        (:func:`attnkit.reference.attention_layer`), SQA being that layer with fewer query heads."""
        plain = self.rotary is None and self.q_norm is None and self.mechanism is None and self.score is None
        if forward_kw or not plain:
            return super().reference(x, dtype=dtype, key_padding_mask=key_padding_mask, **forward_kw)
        return ref.mha(
            x.to(dtype),
            **linear_weights(self, dtype),
            heads=self.heads,
            kv_heads=self.kv_heads,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dtype=dtype,
        )


_SUPPORTS = {"causal", "decode", "backward", "padding", "gqa"}
for _name, _variant, _label in (
    ("sqa", "standard", "SQA"),
    ("sqa_symmetric", "symmetric", "sSQA"),
    ("sqa_extreme", "extreme", "xSQA"),
):
    register(
        _name,
        family="D",
        kind="layer",
        paper="Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query Heads "
        "Reduction (Filipek, 2025)",
        exact=True,
        supports=_SUPPORTS,
        factory=lambda n, *, dim=64, heads=4, _v=_variant: SparseQueryAttention(dim, heads, variant=_v, max_seq_len=n),
        summary=f"{_label}: fewer query heads than the model's heads, attention FLOPs in proportion to H_q / H",
        source=SparseQueryAttention,
    )

r"""The Minimal Transformer's attention ("Reducing the Transformer Architecture to a Minimum", Bermeitinger,
Hrycej, Pavone, Kath and Handschuh, 2024).

The paper reduces attention's parameters in three steps: (b) the query and key matrices only ever appear as the
product :math:`W_Q W_K^\top`, so they collapse into one matrix :math:`W_{QK}` of the size of one of them; (c) the
value and output projections can be omitted (the output stays in the span of the input embeddings); (d) a
symmetric similarity, :math:`s(x_i, x_j) = s(x_j, x_i)`, needs only half of the parameters. (Dropping the MLPs,
step (a), belongs to the block.) Head ``h`` works on its slice :math:`x^{(h)}` of ``d_h = dim / H`` channels:

.. math::
    \text{collapsed:}\quad s^h_{ij} = x_i\, W^h\, x^{(h)\top}_j \quad (W^h \in \mathbb{R}^{\mathrm{dim} \times d_h};\
        \text{all heads together: one } \mathrm{dim} \times \mathrm{dim} \text{ matrix, the size of } W_Q)

    \text{shared (Q = K):}\quad s^h_{ij} = (x_i W^h)(x_j W^h)^\top \quad (\text{symmetric, positive semi-definite})

    \text{symmetric:}\quad s^h_{ij} = x^{(h)}_i\, S^h\, x^{(h)\top}_j,\quad S^h = S^{h\top} \quad
        (d_h(d_h + 1)/2 \text{ parameters per head, stored as a triangle})

    \mathrm{out}^h_i = \sum_j \mathrm{softmax}_j\big(s^h_{ij} / \sqrt{d_h}\big)\, x^{(h)}_j,\qquad
    \mathrm{out} = \mathrm{concat}_h\, \mathrm{out}^h

With ``vo=True`` the values are :math:`x W_V` and the output goes through :math:`W_O` as usual. Each variant is a
dot product of a query vector with a key vector (``q = x W^h`` / ``x^{(h)} S^h``, ``k = x^{(h)}`` or ``x W^h``),
so it runs through :func:`attnkit.attention` on every backend and decodes with a plain KV cache.

Choices where the paper is silent (its experiments are single-layer classifiers on MNIST/CIFAR-10; the public
re-implementation ``Abdessamad-Badaoui/Reducing_the_Transformer_Architecture_to_a_Minimum`` was read): the
per-head slicing of the keys and values (the paper's argument is written for one head); the symmetric matrix is a
general symmetric one (that re-implementation uses :math:`L L^\top`, which is the positive semi-definite case and
is what ``"shared"`` gives); the score scale stays :math:`1/\sqrt{d_h}`; weights start as PyTorch's default for
a linear map of the same fan-in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from ..reference import heads as ref
from ._headutil import check_input, check_padding
from .cache import KVCache

MODES = ("collapsed", "shared", "symmetric")


class MinimalAttention(nn.Module):
    """Minimal-Transformer attention over ``(B, N, dim)``; see the module docstring.

    Args:
        dim: model width. heads: heads (``dim`` must be a multiple).
        mode: ``"collapsed"`` (one ``W_QK``), ``"shared"`` (Q = K) or ``"symmetric"`` (a symmetric ``S`` per head).
        vo: keep the value and output projections (default False: the paper's "no W_V, W_O").
        dropout: dropout on the output, in training. causal: query ``i`` sees keys ``j <= i``.
        backend: the :func:`attnkit.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mode: str = "collapsed",
        vo: bool = False,
        dropout: float = 0.0,
        causal: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        check_count("dim", dim, 1)
        check_count("heads", heads, 1)
        if dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim={dim}", heads))
        if mode not in MODES:
            raise ShapeError(bad("mode", f"one of {MODES}", repr(mode)))
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShapeError(bad("dropout", "a number in [0, 1)", repr(dropout)))
        self.dim, self.heads, self.head_dim, self.mode = dim, heads, dim // heads, mode
        self.causal, self.backend = bool(causal), backend
        dh = self.head_dim
        if mode == "symmetric":
            b = 1 / math.sqrt(dh)
            self.triangle = nn.Parameter(torch.empty(heads, dh * (dh + 1) // 2).uniform_(-b, b))
            self.register_buffer("_tri", torch.triu_indices(dh, dh), persistent=False)
        else:
            b = 1 / math.sqrt(dim)
            self.weight = nn.Parameter(torch.empty(heads, dim, dh).uniform_(-b, b))
        self.v_proj = nn.Linear(dim, dim, bias=False) if vo else None
        self.o_proj = nn.Linear(dim, dim, bias=False) if vo else None
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, mode={self.mode!r}, vo={self.v_proj is not None}, causal={self.causal}"

    def similarity(self) -> torch.Tensor:
        """The symmetric ``S`` ``(heads, d_h, d_h)`` of ``mode="symmetric"``."""
        if self.mode != "symmetric":
            raise UnsupportedError(bad("mode", "'symmetric' for a symmetric similarity matrix", repr(self.mode)))
        dh, (i, j) = self.head_dim, self._tri
        upper = (
            self.triangle.new_zeros(self.heads, dh * dh)
            .index_copy(1, i * dh + j, self.triangle)
            .view(self.heads, dh, dh)
        )
        return upper + upper.transpose(-1, -2) - torch.diag_embed(upper.diagonal(dim1=-2, dim2=-1))

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A :class:`KVCache` of ``heads`` heads of ``d_h`` channels (keys: the slices, or ``x W`` for Q = K)."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        p = next(self.parameters())
        return KVCache(batch, self.heads, max_len, self.head_dim, dtype=dtype or p.dtype, device=device or p.device)

    def project(self, x):
        """``(q, k, v)`` ``(B, heads, N, d_h)``."""
        B, N, _ = x.shape
        xs = x.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        if self.mode == "symmetric":
            q, k = xs @ self.similarity(), xs
        else:
            q = torch.einsum("bnc,hcd->bhnd", x, self.weight)
            k = q if self.mode == "shared" else xs
        v = xs if self.v_proj is None else self.v_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, *, key_padding_mask=None, cache=None, positions=None):
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``; ``positions`` is accepted for the layer protocol and unused."""
        check_input(x, self.dim)
        check_padding(key_padding_mask, x)
        q, k, v = self.project(x)
        start, kpm = 0, key_padding_mask
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ShapeError(bad("cache", "the KVCache of make_cache()", type(cache).__name__))
            start = cache.length
            k, v, kpm = cache.append(k, v, kpm)
        o = attention(q, k, v, key_padding_mask=kpm, q_offset=start, causal=self.causal, backend=self.backend)
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.dim)
        return self.dropout(o if self.o_proj is None else self.o_proj(o))

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, **forward_kw):
        """The float64 oracle (:func:`attnkit.reference.heads.minimal`, scores built as bilinear forms)."""
        if forward_kw:
            raise ShapeError(bad("forward_kw", "only key_padding_mask for the reference", sorted(forward_kw)))
        w = self.similarity() if self.mode == "symmetric" else self.weight

        def c(m):
            return None if m is None else m.weight.to(dtype)

        return ref.minimal(
            x.to(dtype),
            mode=self.mode,
            heads=self.heads,
            w=w.to(dtype),
            wv=c(self.v_proj),
            wo=c(self.o_proj),
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dtype=dtype,
        )


_PAPER = "Reducing the Transformer Architecture to a Minimum (Bermeitinger, Hrycej, Pavone, Kath, Handschuh, 2024)"
for _name, _mode, _what in (
    ("minimal_collapsed", "collapsed", "one collapsed W_QK matrix"),
    ("minimal_shared_qk", "shared", "shared query/key projection (Q = K)"),
    ("minimal_symmetric", "symmetric", "a symmetric similarity matrix per head (half the parameters)"),
):
    register(
        _name,
        family="D",
        kind="layer",
        paper=_PAPER,
        exact=True,
        supports={"causal", "decode", "backward", "padding"},
        factory=lambda n, *, dim=64, heads=4, vo=False, _m=_mode: MinimalAttention(dim, heads, mode=_m, vo=vo),
        summary=f"Minimal Transformer attention: {_what}, no value/output projections",
        source=MinimalAttention,
    )

r"""RCMHA: Relative Convolutional Multi-Head Attention ("RCMHA: Relative Convolutional Multi-Head Attention for
Natural Language Modelling", Sugiharto, Aradea and Mubarok, 2023).

Two changes to multi-head attention: a depthwise convolution over the sequence on the query, key and value
projections (as Primer's Multi-DConv-Head attention), and Transformer-XL's relative positional scores:

.. math::
    Q = \mathrm{dwconv}_q(x W_q),\quad K = \mathrm{dwconv}_k(x W_k),\quad V = \mathrm{dwconv}_v(x W_v),\qquad
    \mathrm{dwconv}(y)_{t,c} = b_c + \sum_{m=0}^{K_s - 1} w_{c,m}\, y_{t - K_s + 1 + m,\, c}

    s^h_{ij} = \tfrac{1}{\sqrt d}\Big[\underbrace{(Q^h_i + u^h) \cdot K^h_j}_{\text{content}}
        + \underbrace{(Q^h_i + v^h) \cdot W_R^h\, \phi(i - j)}_{\text{position}}\Big],\qquad
    \phi(r) = [\sin r\omega_f, \cos r\omega_f]_f,\ \omega_f = 10000^{-2f/d_r}

    \mathrm{out} = \mathrm{concat}_h\, \mathrm{softmax}_j(s^h_{ij})\, V^h_j\, W_o

The convolution is causal (each channel sees the current and ``kernel_size - 1`` previous positions, zeros before
the start), so the layer decodes: :class:`RCMHACache` holds the keys and values plus the last
``kernel_size - 1`` pre-convolution projections.

Relative scores through :func:`attnkit.attention`. With sinusoidal :math:`\phi`, the angle-difference identities
split the position term into a query part and a key part, so the whole score is one dot product of augmented
vectors of ``d + 1 + d_r`` channels:

.. math::
    \tilde q_i = [\,Q_i,\ 1,\ a^s_i \odot \sin i\omega + a^c_i \odot \cos i\omega,\
        a^c_i \odot \sin i\omega - a^s_i \odot \cos i\omega\,],\qquad
    \tilde k_j = [\,K_j,\ u \cdot K_j,\ \cos j\omega,\ \sin j\omega\,]

with :math:`[a^s_i, a^c_i] = W_R^{h\top}(Q_i + v)`. This is exact (the oracle builds :math:`\phi(i-j)` for every pair
instead) and runs on every backend, with gradients, a KV cache and any sequence length.

Choices where the paper is silent (its code, ``hermansh-id/rcmha`` ``rcmha/attention.py``, was read): the code
uses labml's variant of Transformer-XL, a learned embedding per distance up to 4,096 plus a learned per-distance
bias; this layer uses Transformer-XL's own sinusoidal encoding with a learned projection ``W_R``, which has no
length limit and factorises as above (the per-distance scalar bias is left out). The code's convolution kernel
is shared by the heads (``d`` channels); this layer gives every one of the ``heads * d`` channels its own kernel,
as Primer's MDHA does. Kernel size 3 and no bias in the linear projections, as in the code; ``u`` and ``v`` start
at N(0, 0.02), ``W_R`` as PyTorch's default linear map. Inputs at padded positions (``key_padding_mask`` False) are
zeroed before the convolution, so padding never leaks into a real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from ..reference import heads as ref
from ._headutil import check_input, check_padding, check_positions, head_sizes
from .cache import KVCache


class RCMHACache(KVCache):
    """A :class:`KVCache` of the augmented keys and the values, plus ``tail``: the last ``kernel_size - 1``
    pre-convolution projections ``(B, kernel_size - 1, 3 * heads * d)`` (zeros before the first token)."""

    def __init__(
        self, batch, kv_heads, max_len, head_dim, *, v_dim, tail_width, kernel_size, dtype=torch.float32, device=None
    ):
        super().__init__(batch, kv_heads, max_len, head_dim, v_dim=v_dim, dtype=dtype, device=device)
        self.tail = torch.zeros(batch, kernel_size - 1, tail_width, dtype=dtype, device=device)

    def tensors(self):
        return [self.k, self.v, self.tail]

    def reset(self) -> None:
        super().reset()
        self.tail.zero_()


class RCMHA(nn.Module):
    """Relative convolutional multi-head attention over ``(B, N, dim)``; see the module docstring.

    Args:
        dim: model width. heads: heads. head_dim: channels per head (default ``dim // heads``).
        kernel_size: the depthwise convolution's width (``>= 1``; 1 is a per-channel scale).
        rel_dim: channels of the sinusoidal relative encoding (even; default ``head_dim`` rounded up to even).
        dropout: dropout on the output, in training. causal: query ``i`` sees keys ``j <= i``.
        backend: the :func:`attnkit.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        head_dim: int | None = None,
        kernel_size: int = 3,
        rel_dim: int | None = None,
        dropout: float = 0.0,
        causal: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        _, head_dim = head_sizes(dim, heads, None, head_dim)
        check_count("kernel_size", kernel_size, 1)
        rel_dim = head_dim + head_dim % 2 if rel_dim is None else rel_dim
        check_count("rel_dim", rel_dim, 2)
        if rel_dim % 2:
            raise ShapeError(bad("rel_dim", "an even number (sin and cos pairs)", rel_dim))
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShapeError(bad("dropout", "a number in [0, 1)", repr(dropout)))
        self.dim, self.heads, self.head_dim, self.kernel_size, self.rel_dim = dim, heads, head_dim, kernel_size, rel_dim
        self.causal, self.backend = bool(causal), backend
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        # Depthwise causal convolutions, one kernel per channel, for q, k and v stacked: (3 * inner, 1, K).
        self.conv = nn.Conv1d(3 * inner, 3 * inner, kernel_size, groups=3 * inner, bias=True)
        self.r_proj = nn.Linear(rel_dim, inner, bias=False)  # W_R
        self.u = nn.Parameter(torch.randn(heads, head_dim) * 0.02)
        self.v = nn.Parameter(torch.randn(heads, head_dim) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, rel_dim={self.rel_dim}, "
            f"causal={self.causal}"
        )

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> RCMHACache:
        """An :class:`RCMHACache` for ``max_len`` tokens."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        w = self.q_proj.weight
        return RCMHACache(
            batch,
            self.heads,
            max_len,
            self.head_dim + 1 + self.rel_dim,
            v_dim=self.head_dim,
            tail_width=3 * self.heads * self.head_dim,
            kernel_size=self.kernel_size,
            dtype=dtype or w.dtype,
            device=device or w.device,
        )

    def _conv(self, y, cache):
        K = self.kernel_size
        if cache is not None:
            prev = cache.tail.to(y.dtype)
        else:
            prev = y.new_zeros(y.shape[0], K - 1, y.shape[2])
        full = torch.cat([prev, y], 1)
        if cache is not None and K > 1:
            cache.tail.copy_(full[:, -(K - 1) :].detach())
        return F.conv1d(full.transpose(1, 2), self.conv.weight, self.conv.bias, groups=full.shape[2]).transpose(1, 2)

    def forward(self, x, *, key_padding_mask=None, cache=None, positions=None):
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``. ``key_padding_mask`` bool ``(B, N)`` (True = real; with a cache,
        for the new tokens); ``cache`` from :meth:`make_cache`; ``positions`` ``(N,)`` absolute positions of the
        new tokens (default: from the cache's length)."""
        check_input(x, self.dim)
        check_padding(key_padding_mask, x)
        if cache is not None and not isinstance(cache, RCMHACache):
            raise ShapeError(bad("cache", "the RCMHACache of make_cache()", type(cache).__name__))
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        start = 0 if cache is None else cache.length
        pos = check_positions(positions, N, start, x.device)
        y = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        if key_padding_mask is not None:
            y = y * key_padding_mask[..., None].to(y.dtype)
        q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in self._conv(y, cache).chunk(3, -1))
        # Augmented query and key (module docstring): [content, u-bias channel, relative position].
        f = self.rel_dim // 2
        omega = 10000.0 ** (-2 * torch.arange(f, device=x.device, dtype=torch.float64) / self.rel_dim)
        ang = (pos.to(torch.float64)[:, None] * omega).to(q.dtype)  # (N, f)
        s, c = ang.sin(), ang.cos()
        a = torch.einsum("bhnd,hdr->bhnr", q + self.v[:, None], self.r_proj.weight.view(H, D, self.rel_dim))
        a_s, a_c = a[..., :f], a[..., f:]
        q_t = torch.cat([q, torch.ones_like(q[..., :1]), a_s * s + a_c * c, a_c * s - a_s * c], -1)
        k_t = torch.cat(
            [k, (k * self.u[:, None]).sum(-1, keepdim=True), c.expand(B, H, N, f), s.expand(B, H, N, f)], -1
        )
        kpm = key_padding_mask
        if cache is not None:
            k_t, v, kpm = cache.append(k_t, v, kpm)
        o = attention(
            q_t, k_t, v, key_padding_mask=kpm, q_offset=start, causal=self.causal, scale=D**-0.5, backend=self.backend
        )
        return self.dropout(self.o_proj(o.transpose(1, 2).reshape(B, N, H * D)))

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, positions=None, **forward_kw):
        """The float64 oracle (:func:`attnkit.reference.heads.rcmha`, with :math:`\\phi(i - j)` for every pair)."""
        if forward_kw:
            raise ShapeError(
                bad("forward_kw", "only key_padding_mask and positions for the reference", sorted(forward_kw))
            )
        inner = self.heads * self.head_dim
        w, b = self.conv.weight[:, 0], self.conv.bias
        convs = [(w[i * inner : (i + 1) * inner], b[i * inner : (i + 1) * inner]) for i in range(3)]
        return ref.rcmha(
            x.to(dtype),
            wq=self.q_proj.weight,
            wk=self.k_proj.weight,
            wv=self.v_proj.weight,
            wo=self.o_proj.weight,
            cq=convs[0],
            ck=convs[1],
            cv=convs[2],
            wr=self.r_proj.weight,
            u=self.u,
            vb=self.v,
            heads=self.heads,
            rel_dim=self.rel_dim,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            positions=positions,
            dtype=dtype,
        )


register(
    "rcmha",
    family="D",
    kind="layer",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (Sugiharto, Aradea, "
    "Mubarok, 2023)",
    exact=True,
    supports={"causal", "decode", "backward", "padding"},
    factory=lambda n, *, dim=64, heads=4, kernel_size=3: RCMHA(dim, heads, kernel_size=kernel_size),
    summary="causal depthwise-convolved Q/K/V and Transformer-XL relative position scores, factorised into "
    "augmented queries and keys",
    source=RCMHA,
)

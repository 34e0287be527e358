r"""``DifferentialAttention``: the differential attention layer of Diff Transformer (Ye et al., 2024).

.. math::
    [Q_1; Q_2] = x W_q,\quad [K_1; K_2] = x W_k,\quad V = x W_v,\qquad
    \mathrm{head}_h = \big(\mathrm{softmax}(Q_1 K_1^\top / \sqrt d)
        - \lambda\,\mathrm{softmax}(Q_2 K_2^\top / \sqrt d)\big) V

.. math::
    \lambda = e^{\lambda_{q1}\cdot\lambda_{k1}} - e^{\lambda_{q2}\cdot\lambda_{k2}} + \lambda_{\mathrm{init}},\qquad
    \lambda_{\mathrm{init}} = 0.8 - 0.6\, e^{-0.3\,\ell},\qquad
    \mathrm{out} = \mathrm{concat}_h\big((1-\lambda_{\mathrm{init}})\,\mathrm{RMSNorm}(\mathrm{head}_h)\big) W_o

Each of the ``heads`` differential heads has two query/key halves of ``head_dim = d`` channels (default
``dim / (2 heads)``, the paper's ``d = d_model / 2h``: a Diff Transformer with ``h`` heads has the parameters of a
Transformer with ``2h``) and one value of ``2d`` channels. Both softmax maps run through :func:`attnkit.attention`
(``A_1 V - \lambda A_2 V`` is the same product), so any static pattern (a sliding window, dilated, A-shape...)
masks both maps alike; with ``kv_heads < heads`` the head ``h`` uses key/value head ``h // (heads / kv_heads)``,
its ``K_1`` for ``Q_1`` and ``K_2`` for ``Q_2`` (grouped-query attention). RoPE rotates each half (``Rotary(d)``).

**Depth convention.** ``layer_idx`` is the 0-based index of the layer in the stack, and
``lambda_init = 0.8 - 0.6 exp(-0.3 * layer_idx)``. The paper writes ``0.8 - 0.6 exp(-0.3 (l - 1))`` with
``l in [1, L]``; its official code (``unilm/Diff-Transformer``, ``lambda_init_fn(depth)``, "depth means current
layer index") and transformers' DiffLlama (``lambda_init_fn(layer_idx)``) both take the 0-based index without
the ``- 1``, so all three give ``lambda_init = 0.2`` for the first layer. Community ports that write
``exp(-0.3 (depth - 1))`` *and* pass a 0-based index are one layer off (``0.8 - 0.6 e^{0.3} = -0.01`` for
the first layer). ``lambda_init=`` overrides the schedule.

Details where the paper is silent, taken from the official code: ``lambda`` is one scalar per layer (the four
``lambda_*`` vectors have ``d`` entries, drawn from ``N(0, 0.1^2)``); the per-head normalisation is an RMSNorm
over the head's ``2d`` channels with one learned gain shared by the heads, ``eps = 1e-5``; the two maps of head
``h`` are the query channels ``[2hd, 2hd + d)`` and ``[2hd + d, 2(h+1)d)`` (the official ``view(..., 2h, d)``
pairing). ``norm=False`` drops both the RMSNorm and the ``1 - lambda_init`` factor (the factor rescales the
normalised output; without the norm it has no purpose), which makes the layer with ``lambda = 0`` plain attention
of the first half.

Decode: ``make_cache`` returns one :class:`~attnkit.layers.cache.KVCache` whose keys hold ``[K_1, K_2]``
(``2d`` channels) and whose values hold ``V``: each token's keys and values are stored once, with ``kv_heads``
heads, and both maps read them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import patterns as _patterns  # noqa: F401  (registers the patterns a name may refer to)
from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad
from ..patterns.base import Pattern
from ..records import all_records, register
from ..reference.differential import differential_attention
from ._headutil import head_sizes
from .cache import KVCache
from .rope import Rotary


def lambda_init_fn(layer_idx: int) -> float:
    """``0.8 - 0.6 exp(-0.3 * layer_idx)`` for the 0-based ``layer_idx`` (the paper's ``l - 1``)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def _pattern(mechanism, n: int):
    if isinstance(mechanism, str):
        rec = all_records().get(mechanism)
        if rec is None or rec.kind != "pattern":
            names = sorted(r.name for r in all_records().values() if r.kind == "pattern")
            raise ShapeError(bad("mechanism", f"a pattern in the registry, one of {names}", repr(mechanism)))
        mechanism = rec.make(n)
    if mechanism is None or isinstance(mechanism, Pattern):
        return mechanism
    raise ShapeError(bad("mechanism", "None, a static Pattern or a pattern's registry name", type(mechanism).__name__))


class DifferentialAttention(nn.Module):
    """Multi-head differential attention over ``(B, N, dim)``; see the module docstring for the math.

    Args:
        dim: model width.
        heads: differential heads (each has two softmax maps).
        kv_heads: key/value heads (default ``heads``); must divide ``heads``.
        head_dim: channels of each query/key half ``d`` (default ``dim // (2 heads)``); values have ``2d``.
        layer_idx: 0-based index of the layer in its stack, for ``lambda_init``.
        lambda_init: overrides ``0.8 - 0.6 exp(-0.3 layer_idx)``.
        lambda_std: standard deviation of the ``lambda_*`` vectors' initialisation (0.1).
        mechanism: None (dense) or a static :class:`~attnkit.patterns.Pattern` (or its registry name), applied
            to both maps and intersected with the causal mask when ``causal``.
        rope: None, True (RoPE with base 10,000 on each ``d``-channel half) or a ``Rotary(head_dim)``.
        norm: the per-head RMSNorm times ``1 - lambda_init`` (the paper's GroupNorm); False drops both.
        bias: biases in the projections.
        dropout: dropout on the output, in training.
        causal: query ``i`` sees only keys ``j <= i``.
        max_seq_len: the sequence length a registry name's record sizes its pattern for.
        backend: the :func:`attnkit.attention` backend (``"auto"``).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        layer_idx: int = 0,
        lambda_init: float | None = None,
        lambda_std: float = 0.1,
        mechanism=None,
        rope=None,
        norm: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = True,
        max_seq_len: int = 2048,
        backend: str = "auto",
    ):
        super().__init__()
        kv_heads, head_dim = head_sizes(dim, heads, kv_heads, head_dim, split=2)
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or layer_idx < 0:
            raise ShapeError(bad("layer_idx", "an int >= 0 (the 0-based layer index)", repr(layer_idx)))
        if lambda_init is not None and not (isinstance(lambda_init, (int, float)) and math.isfinite(lambda_init)):
            raise ShapeError(bad("lambda_init", "a finite number or None", repr(lambda_init)))
        if not (isinstance(lambda_std, (int, float)) and math.isfinite(lambda_std) and lambda_std >= 0):
            raise ShapeError(bad("lambda_std", "a finite number >= 0", repr(lambda_std)))
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShapeError(bad("dropout", "a number in [0, 1)", repr(dropout)))
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.layer_idx, self.causal, self.backend, self.use_norm = layer_idx, bool(causal), backend, bool(norm)
        self.lambda_init = float(lambda_init_fn(layer_idx) if lambda_init is None else lambda_init)
        d2 = 2 * head_dim
        self.q_proj = nn.Linear(dim, heads * d2, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * d2, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * d2, bias=bias)
        self.o_proj = nn.Linear(heads * d2, dim, bias=bias)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(head_dim) * lambda_std) for _ in range(4)
        )
        self.norm = nn.RMSNorm(d2, eps=1e-5) if norm else None
        self.rotary = Rotary(head_dim) if rope is True else rope
        if self.rotary is not None and not (isinstance(self.rotary, Rotary) and self.rotary.head_dim == head_dim):
            raise ShapeError(bad("rope", f"None, True or a Rotary(head_dim={head_dim})", repr(rope)))
        self.dropout = nn.Dropout(dropout)
        self.mechanism = _pattern(mechanism, max_seq_len)

    def extra_repr(self) -> str:
        mech = "dense" if self.mechanism is None else type(self.mechanism).__name__
        return (
            f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, layer_idx={self.layer_idx}, "
            f"lambda_init={self.lambda_init:.4f}, mechanism={mech}, causal={self.causal}"
        )

    def lambda_full(self, dtype=torch.float32) -> torch.Tensor:
        """The scalar ``lambda`` (computed in float32, or float64 for float64, then cast to ``dtype``)."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        l1 = torch.exp((self.lambda_q1.to(cd) * self.lambda_k1.to(cd)).sum())
        l2 = torch.exp((self.lambda_q2.to(cd) * self.lambda_k2.to(cd)).sum())
        return (l1 - l2 + self.lambda_init).to(dtype)

    # -- caches -------------------------------------------------------------------------------------------------

    decodes_exactly = True

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """One :class:`KVCache` for ``max_len`` tokens: keys ``[K_1, K_2]`` and values, ``2 head_dim`` each."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        w = self.k_proj.weight
        d2 = 2 * self.head_dim
        return KVCache(batch, self.kv_heads, max_len, d2, v_dim=d2, dtype=dtype or w.dtype, device=device or w.device)

    # -- forward ------------------------------------------------------------------------------------------------

    def _check(self, x, key_padding_mask, positions):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(
                bad("x", f"(B, N, {self.dim})", tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
            )
        B, N, _ = x.shape
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, N)
        ):
            raise ShapeError(
                bad(
                    "key_padding_mask",
                    f"a bool tensor ({B}, {N})",
                    (tuple(key_padding_mask.shape), key_padding_mask.dtype),
                )
            )
        if positions is not None and (
            positions.dtype.is_floating_point
            or positions.dtype == torch.bool
            or tuple(positions.shape) not in ((N,), (B, N))
        ):
            raise ShapeError(
                bad("positions", f"an integer tensor ({N},) or ({B}, {N})", (tuple(positions.shape), positions.dtype))
            )

    def project(self, x, positions):
        """``(q1, q2, k1, k2, v)``: queries ``(B, heads, N, d)``, keys ``(B, kv_heads, N, d)``, values
        ``(B, kv_heads, N, 2d)``; the halves rotated."""
        B, N, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, N, self.heads, 2, d).permute(3, 0, 2, 1, 4)
        k = self.k_proj(x).view(B, N, self.kv_heads, 2, d).permute(3, 0, 2, 1, 4)
        v = self.v_proj(x).view(B, N, self.kv_heads, 2 * d).transpose(1, 2)
        q1, q2, k1, k2 = q[0], q[1], k[0], k[1]
        if self.rotary is not None:
            q1, q2, k1, k2 = (self.rotary(t, positions) for t in (q1, q2, k1, k2))
        return q1, q2, k1, k2, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``.

        Args:
            key_padding_mask: bool ``(B, N)``, True where the token is real (with a cache: for the new tokens;
                earlier ones are remembered).
            cache: from :meth:`make_cache`; ``x`` holds the tokens after those cached.
            positions: ``(N,)`` or ``(B, N)`` absolute positions for RoPE (default: from the cache's length).
        """
        self._check(x, key_padding_mask, positions)
        if cache is not None and not isinstance(cache, KVCache):
            raise ShapeError(bad("cache", "the KVCache of make_cache()", type(cache).__name__))
        if cache is not None and not self.causal:
            raise UnsupportedError(bad("cache", "None for a non-causal layer", type(cache).__name__))
        start = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q1, q2, k1, k2, v = self.project(x, positions)
        kpm = key_padding_mask
        if cache is not None:
            if cache.k.shape[-1] != 2 * self.head_dim or cache.k.shape[1] != self.kv_heads:
                raise ShapeError(
                    bad(
                        "cache",
                        f"a KVCache with {self.kv_heads} heads of {2 * self.head_dim} channels",
                        tuple(cache.k.shape),
                    )
                )
            kk, v, kpm = cache.append(torch.cat((k1, k2), dim=-1), v, kpm)
            k1, k2 = kk[..., : self.head_dim], kk[..., self.head_dim :]
        kw = {
            "pattern": self.mechanism,
            "key_padding_mask": kpm,
            "q_offset": start,
            "causal": self.causal,
            "backend": self.backend,
        }
        a1 = attention(q1, k1, v, **kw)
        a2 = attention(q2, k2, v, **kw)
        out = a1 - self.lambda_full(a1.dtype) * a2
        if self.norm is not None:
            out = self.norm(out) * (1 - self.lambda_init)
        B, _, N, _ = out.shape
        return self.dropout(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))

    # -- oracle -------------------------------------------------------------------------------------------------

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, positions=None, cache=None):
        """:func:`attnkit.reference.differential.differential_attention` on this layer's weights in ``dtype``
        (float64: the oracle; ``x.dtype``: the naive implementation of the 2x-naive rule). No cache."""
        if cache is not None:
            raise UnsupportedError(
                bad("cache", "None for the reference (it runs the whole sequence)", type(cache).__name__)
            )
        self._check(x, key_padding_mask, positions)
        N = x.shape[1]
        rope = None
        if self.rotary is not None:
            pos = torch.arange(N, device=x.device) if positions is None else positions
            rope = self.rotary.angles(pos, dtype)
        mask = None if self.mechanism is None else self.mechanism.dense_mask(N, N, 0, self.heads, device=x.device)[None]
        lin = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return differential_attention(
            x,
            wq=self.q_proj.weight,
            wk=self.k_proj.weight,
            wv=self.v_proj.weight,
            wo=self.o_proj.weight,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            lambda_q1=self.lambda_q1,
            lambda_k1=self.lambda_k1,
            lambda_q2=self.lambda_q2,
            lambda_k2=self.lambda_k2,
            lambda_init=self.lambda_init,
            norm_weight=None if self.norm is None else self.norm.weight,
            norm=self.norm is not None,
            eps=1e-5,
            biases=None if self.q_proj.bias is None else tuple(m.bias for m in lin),
            rope=rope,
            mask=mask,
            key_padding_mask=key_padding_mask,
            causal=self.causal,
            dtype=dtype,
        )


def _factory(n, *, dim=64, heads=4, kv_heads=None, layer_idx=0, window=None, rope=True):
    mech = None if window is None else _patterns.SlidingWindow(left=max(0, min(window, n) - 1), right=0)
    return DifferentialAttention(dim, heads, kv_heads=kv_heads, layer_idx=layer_idx, mechanism=mech, rope=rope)


register(
    "differential",
    family="D",
    kind="layer",
    paper="Differential Transformer (Ye et al., 2024)",
    exact=True,
    supports={"causal", "decode", "backward", "bf16", "gqa", "padding"},
    factory=_factory,
    summary="two softmax maps from split query/key halves subtracted with a learned scalar lambda, per-head RMSNorm",
    source=DifferentialAttention,
)

r"""Multi-head latent attention (MLA; DeepSeek-V2, 2024) with a latent decode cache, naive and absorbed.

.. math::
    c_j = \mathrm{RMSNorm}(W_{DKV} x_j) \in \mathbb{R}^{r}, \qquad
    k^R_j = \mathrm{rope}_j(W_{KR} x_j) \in \mathbb{R}^{d_R} \ \text{(decoupled RoPE key, one for all heads)},\\
    k^C_{h,j} = W_{UK,h}\, c_j \in \mathbb{R}^{d_C}, \qquad v_{h,j} = W_{UV,h}\, c_j \in \mathbb{R}^{d_v},\qquad
    [q^C_{h,i};\, q^R_{h,i}] = W_Q x_i \ \ \text{or}\ \ W_{UQ}\,\mathrm{RMSNorm}(W_{DQ} x_i)
    \ (\texttt{q\_lora\_rank}),\\
    s_{h,ij} = \frac{q^C_{h,i}\cdot k^C_{h,j} + \mathrm{rope}_i(q^R_{h,i})\cdot k^R_j}{\sqrt{d_C + d_R}},\qquad
    \mathrm{out}_i = W_O\,\mathrm{concat}_h \sum_j \mathrm{softmax}_j(s_{h,ij})\, v_{h,j}.

Only ``c_j`` and ``k^R_j`` are cached: :class:`LatentCache` holds ``kv_lora_rank + qk_rope_dim`` values per
token per layer, whatever the number of heads (DeepSeek-V2's 512 + 64 = 576; a GQA cache holds
``2 * kv_heads * head_dim``).

Two modes compute the same function (tested equal in float64 to 1e-10):

* ``naive``: up-project every cached latent to per-head keys ``[k^C_h; k^R]`` and values ``v_h`` and run
  :func:`attnkit.attention` over ``heads`` heads of width ``d_C + d_R`` / ``d_v``. With a cache, each decode step
  re-expands all ``L`` cached latents (``O(L r H (d_C + d_v))``).
* ``absorb``: since :math:`q^C_h\cdot W_{UK,h} c = (W_{UK,h}^\top q^C_h)\cdot c`, fold ``W_UK`` into the query and
  ``W_UV`` into the output: attend in latent space as multi-query attention, queries
  ``[W_{UK,h}^\top q^C_h;\ \mathrm{rope}(q^R_h)]`` (width ``r + d_R``) over one key head ``[c; k^R]`` with values
  ``c`` (width ``r``, so ``D != Dv``), then :math:`o_h = W_{UV,h}\,\tilde o_h`. A decode step reads the cache
  once and never expands it (DeepSeek-V3 ``inference/model.py``'s ``attn_impl="absorb"``).

Choices where the paper is silent or that differ from DeepSeek's code: RoPE uses the ``rotate_half`` channel
layout of :mod:`attnkit.layers.rope` (DeepSeek rotates interleaved pairs; the two are a fixed permutation of
``W_KR``/``W_QR`` apart), base ``rope_base`` with no YaRN; RMSNorm ``eps = 1e-6`` with a learned gain (as
DeepSeek); ``kv_norm=False`` drops the latent norm (X-EcoMLA's ``use_lora_layer_norm=False``, used by the
GQA-to-MLA conversion of :mod:`attnkit.hf.mla`, whose latent must stay a linear function of ``x``); no biases;
PyTorch's default ``nn.Linear`` initialisation; weight names follow the Hugging Face DeepSeek port
(``q_proj`` or ``q_a_proj/q_a_layernorm/q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``). ``qk_rope_dim=0`` is allowed (no positional part: latent-only attention).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad, check_count, check_memory
from ..records import register
from ..reference.mla import mla_attention
from .cache import Cache, check_room
from .rope import Rotary

MODES = ("naive", "absorb", "auto")


class LatentCache(Cache):
    """A preallocated MLA decode cache: ``kv`` ``(B, max_len, kv_lora_rank + qk_rope_dim)`` holding, per token,
    the normalised latent ``c`` then the rotated RoPE key ``k^R``, and a key-padding mask.

    ``append(c, k_rope, mask)`` writes ``n`` new tokens and returns ``(kv, mask)`` views of everything cached
    (``mask`` is None while no key was ever padding). ``bytes_per_token`` is
    ``(kv_lora_rank + qk_rope_dim) * element_size`` (per sequence, per layer).
    """

    def __init__(self, batch, max_len, kv_lora_rank, qk_rope_dim, *, dtype=torch.float32, device=None):
        for name, val in (("batch", batch), ("max_len", max_len), ("kv_lora_rank", kv_lora_rank)):
            check_count(name, val, 1)
        check_count("qk_rope_dim", qk_rope_dim, 0)
        width = kv_lora_rank + qk_rope_dim
        size = torch.empty((), dtype=dtype).element_size()
        check_memory("LatentCache", batch * max_len * width * size, "use a smaller max_len")
        self.kv = torch.zeros(batch, max_len, width, dtype=dtype, device=device)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.rank, self.rope_dim = kv_lora_rank, qk_rope_dim
        self.padded = False
        self.max_len, self.length = max_len, 0

    def tensors(self):
        return [self.kv]

    @property
    def bytes_per_token(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()

    def reset(self) -> None:
        self.length, self.padded = 0, False
        self.mask.fill_(True)

    def append(self, c: torch.Tensor, k_rope: torch.Tensor, mask: torch.Tensor | None = None):
        b, n, r = c.shape
        if (b, r) != (self.kv.shape[0], self.rank) or k_rope.shape != (b, n, self.rope_dim):
            raise ShapeError(
                bad(
                    "c, k_rope",
                    f"({self.kv.shape[0]}, n, {self.rank}) and (.., n, {self.rope_dim})",
                    (tuple(c.shape), tuple(k_rope.shape)),
                )
            )
        check_room(self.length, n, self.max_len)
        a, e = self.length, self.length + n
        self.kv[:, a:e, : self.rank] = c.to(self.kv.dtype)
        self.kv[:, a:e, self.rank :] = k_rope.to(self.kv.dtype)
        if mask is not None:
            self.mask[:, a:e] = mask
            self.padded = self.padded or not bool(mask.all())
        self.length = e
        return self.kv[:, :e], (self.mask[:, :e] if self.padded else None)


class MultiheadLatentAttention(nn.Module):
    """Multi-head latent attention over ``(B, N, dim)``; see the module docstring for the math and choices.

    Args:
        dim: model width.
        heads: query heads (each with its own up-projected key and value).
        kv_lora_rank: ``r``, the width of the cached latent ``c``.
        qk_nope_dim: ``d_C``, the per-head query/key channels without position (may be 0).
        qk_rope_dim: ``d_R``, the decoupled RoPE channels (even; the key part is shared by all heads; may be 0).
        v_dim: ``d_v``, the per-head value channels.
        q_lora_rank: None (a full ``W_Q``) or the rank of the low-rank query ``W_UQ RMSNorm(W_DQ x)``.
        rope_base: the RoPE frequency base.
        mode: ``"naive"`` (expand K/V from the latent), ``"absorb"`` (attend in latent space), or ``"auto"``:
            per call, the form with fewer multiply-adds (per head, ``L`` keys, ``N`` queries: naive
            ``L r (d_C + d_v) + N L (d_C + d_R + d_v)``, absorbed ``N L (2r + d_R) + N r (d_C + d_v)``), which is the
            absorbed form for a decode step and the naive one for a long prefill, as serving engines split them.
        causal: query ``i`` sees keys ``j <= i``.
        kv_norm: RMS-normalise the latent (DeepSeek); False keeps it linear in ``x`` (converted models).
        backend: the :func:`attnkit.attention` backend.

    ``forward(x, *, key_padding_mask=None, cache=None, positions=None)``, ``make_cache(batch, max_len)`` and
    ``reference(x, dtype=torch.float64, **forward_kw)`` (the float64 oracle :func:`attnkit.reference.mla.mla_attention`
    on this layer's weights) as :class:`attnkit.layers.Attention`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_dim: int,
        qk_rope_dim: int,
        v_dim: int,
        q_lora_rank: int | None = None,
        rope_base: float = 10000.0,
        mode: str = "naive",
        causal: bool = True,
        kv_norm: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        check_count("dim", dim, 1)
        check_count("heads", heads, 1)
        check_count("kv_lora_rank", kv_lora_rank, 1)
        check_count("qk_nope_dim", qk_nope_dim, 0)
        check_count("qk_rope_dim", qk_rope_dim, 0)
        check_count("v_dim", v_dim, 1)
        if qk_rope_dim % 2:
            raise ShapeError(bad("qk_rope_dim", "an even number (RoPE rotates pairs of channels)", qk_rope_dim))
        if qk_nope_dim + qk_rope_dim < 1:
            raise ShapeError(bad("qk_nope_dim", "qk_nope_dim + qk_rope_dim >= 1", (qk_nope_dim, qk_rope_dim)))
        if q_lora_rank is not None:
            check_count("q_lora_rank", q_lora_rank, 1)
        if mode not in MODES:
            raise ShapeError(bad("mode", f"one of {MODES}", repr(mode)))
        if not isinstance(rope_base, (int, float)) or not math.isfinite(rope_base) or rope_base <= 1:
            raise ShapeError(bad("rope_base", "a finite number > 1", repr(rope_base)))
        self.dim, self.heads, self.mode, self.causal, self.kv_norm = dim, heads, mode, bool(causal), bool(kv_norm)
        self.kv_lora_rank, self.qk_nope_dim, self.qk_rope_dim, self.v_dim = (
            kv_lora_rank,
            qk_nope_dim,
            qk_rope_dim,
            v_dim,
        )
        self.q_lora_rank, self.backend, self.eps = q_lora_rank, backend, 1e-6
        self.scale = 1.0 / math.sqrt(qk_nope_dim + qk_rope_dim)
        dq = heads * (qk_nope_dim + qk_rope_dim)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=self.eps)
            self.q_b_proj = nn.Linear(q_lora_rank, dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=self.eps) if kv_norm else None
        self.kv_b_proj = nn.Linear(kv_lora_rank, heads * (qk_nope_dim + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, dim, bias=False)
        self.rotary = Rotary(qk_rope_dim, base=rope_base) if qk_rope_dim else None

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_lora_rank={self.kv_lora_rank}, qk_nope_dim={self.qk_nope_dim}, "
            f"qk_rope_dim={self.qk_rope_dim}, v_dim={self.v_dim}, q_lora_rank={self.q_lora_rank}, mode={self.mode}"
        )

    @property
    def decodes_exactly(self) -> bool:
        return self.causal

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> LatentCache:
        """A preallocated :class:`LatentCache` for ``max_len`` tokens of ``batch`` sequences."""
        if not self.causal:
            raise UnsupportedError(
                bad("causal", "True for a decode cache (a non-causal layer sees future tokens)", False)
            )
        w = self.kv_a_proj_with_mqa.weight
        return LatentCache(
            batch, max_len, self.kv_lora_rank, self.qk_rope_dim, dtype=dtype or w.dtype, device=device or w.device
        )

    # -- pieces ---------------------------------------------------------------------------------------------------

    def _rope(self, t, positions):
        return t if self.rotary is None else self.rotary(t, positions)

    def queries(self, x, positions):
        """``(q_nope, rope(q_rope))``, ``(B, heads, N, d_C)`` and ``(B, heads, N, d_R)``."""
        B, N, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, N, self.heads, -1).transpose(1, 2)
        return q[..., : self.qk_nope_dim], self._rope(q[..., self.qk_nope_dim :], positions)

    def latent(self, x, positions):
        """``(c, rope(k_rope))``, ``(B, N, r)`` and ``(B, N, d_R)``: what the cache holds."""
        kv = self.kv_a_proj_with_mqa(x)
        c, kr = kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]
        if self.kv_a_layernorm is not None:
            c = self.kv_a_layernorm(c)
        if self.rotary is not None:
            kr = self.rotary(kr[:, None], positions)[:, 0]
        return c, kr

    def up_weights(self):
        """``(W_UK, W_UV)`` as ``(heads, d_C, r)`` and ``(heads, d_v, r)``."""
        w = self.kv_b_proj.weight.view(self.heads, self.qk_nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_dim], w[:, self.qk_nope_dim :]

    # -- forward ----------------------------------------------------------------------------------------------------

    def _check(self, x, key_padding_mask, cache, positions):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(
                bad("x", f"(B, N, {self.dim})", tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
            )
        B, N, _ = x.shape
        if key_padding_mask is not None and (key_padding_mask.shape != (B, N) or key_padding_mask.dtype != torch.bool):
            raise ShapeError(
                bad(
                    "key_padding_mask",
                    f"a bool tensor ({B}, {N})",
                    (tuple(key_padding_mask.shape), key_padding_mask.dtype),
                )
            )
        if cache is not None:
            if not self.causal:
                raise UnsupportedError(bad("cache", "None for a non-causal layer", type(cache).__name__))
            if not isinstance(cache, LatentCache):
                raise ShapeError(bad("cache", "the LatentCache of make_cache()", type(cache).__name__))
            if cache.kv.shape[0] != B or cache.rank != self.kv_lora_rank or cache.rope_dim != self.qk_rope_dim:
                raise ShapeError(
                    bad(
                        "cache",
                        f"a LatentCache for batch {B}, rank {self.kv_lora_rank} + rope {self.qk_rope_dim}",
                        (cache.kv.shape[0], cache.rank, cache.rope_dim),
                    )
                )
        if positions is not None:
            if (
                not isinstance(positions, torch.Tensor)
                or positions.dtype.is_floating_point
                or positions.dtype == torch.bool
            ):
                raise ShapeError(
                    bad("positions", "an integer tensor", getattr(positions, "dtype", type(positions).__name__))
                )
            if positions.shape not in ((N,), (B, N)):
                raise ShapeError(bad("positions", f"({N},) or ({B}, {N})", tuple(positions.shape)))

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``.

        Args:
            key_padding_mask: bool ``(B, N)``, True where the token is real (with a cache, for the new tokens;
                earlier ones are remembered).
            cache: from :meth:`make_cache`; ``x`` holds the tokens after those cached.
            positions: ``(N,)`` or ``(B, N)`` absolute positions for RoPE (default: from the cache's length).
        """
        self._check(x, key_padding_mask, cache, positions)
        start = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q_nope, q_rope = self.queries(x, positions)
        c, kr = self.latent(x, positions)
        kpm = key_padding_mask
        if cache is not None:
            kv, kpm = cache.append(c, kr, key_padding_mask)
            c, kr = kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]
        else:
            kv = None
        out = (
            self._absorbed(q_nope, q_rope, c, kr, kv, kpm, start)
            if self.absorbs(x.shape[1], c.shape[1])
            else self._naive(q_nope, q_rope, c, kr, kpm, start)
        )
        B, _, N, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1))

    def absorbs(self, n: int, length: int) -> bool:
        """Whether a call with ``n`` queries over ``length`` keys runs the absorbed form (see ``mode``)."""
        if self.mode != "auto":
            return self.mode == "absorb"
        r, dc, dr, dv = self.kv_lora_rank, self.qk_nope_dim, self.qk_rope_dim, self.v_dim
        naive = length * r * (dc + dv) + n * length * (dc + dr + dv)
        return n * length * (2 * r + dr) + n * r * (dc + dv) < naive

    def _naive(self, q_nope, q_rope, c, kr, kpm, start):
        B, L, _ = c.shape
        H = self.heads
        up = self.kv_b_proj(c).view(B, L, H, self.qk_nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = up[..., : self.qk_nope_dim], up[..., self.qk_nope_dim :]
        q = torch.cat((q_nope, q_rope), -1)
        k = torch.cat((k_nope, kr[:, None].expand(B, H, L, self.qk_rope_dim)), -1)
        return attention(
            q, k, v, scale=self.scale, key_padding_mask=kpm, q_offset=start, causal=self.causal, backend=self.backend
        )

    def _absorbed(self, q_nope, q_rope, c, kr, kv, kpm, start):
        w_uk, w_uv = self.up_weights()
        q = torch.cat((torch.einsum("bhnd,hdr->bhnr", q_nope, w_uk), q_rope), -1)  # (B, H, N, r + d_R)
        k = (torch.cat((c, kr), -1) if kv is None else kv)[:, None]  # (B, 1, L, r + d_R): one key head
        o = self.latent_attention(q, k, c[:, None], kpm, start)  # values: the latent itself (B, 1, L, r)
        return torch.einsum("bhnr,hdr->bhnd", o, w_uv)

    def latent_attention(self, q, k, v, kpm, start):
        """Multi-query attention of ``q`` ``(B, H, N, D)`` over one key/value head. When no query's mask depends
        on its position (one decode token, which sees every cached key, or a non-causal layer) the heads are
        folded into the query axis, ``(B, 1, H N, D)``: one single-head call that reads the latent cache once
        (the GQA path of SDPA would expand it ``H`` times), when there are at least ``H N`` keys."""
        B, H, N, _ = q.shape
        if (N == 1 or not self.causal) and H * N <= k.shape[2]:  # the api wants no more queries than keys
            o = attention(
                q.reshape(B, 1, H * N, -1),
                k,
                v,
                scale=self.scale,
                key_padding_mask=kpm,
                causal=False,
                backend=self.backend,
            )
            return o.reshape(B, H, N, -1)
        return attention(
            q, k, v, scale=self.scale, key_padding_mask=kpm, q_offset=start, causal=self.causal, backend=self.backend
        )

    # -- oracle -----------------------------------------------------------------------------------------------------

    def reference_weights(self) -> dict:
        """This layer's weights by name, as :func:`attnkit.reference.mla.mla_attention` takes them."""
        names = ("q_proj",) if self.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        w = {n: getattr(self, n).weight for n in names + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
        if self.q_lora_rank is not None:
            w["q_a_layernorm"] = self.q_a_layernorm.weight
        w["kv_a_layernorm"] = None if self.kv_a_layernorm is None else self.kv_a_layernorm.weight
        return w

    def oracle_kw(self, dtype, key_padding_mask=None, positions=None) -> dict:
        """The keywords of this layer's float64 oracle (its weights, sizes and options), for MLA and TPLA."""
        return {
            "weights": self.reference_weights(),
            "heads": self.heads,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_dim": self.qk_nope_dim,
            "qk_rope_dim": self.qk_rope_dim,
            "v_dim": self.v_dim,
            "inv_freq": self.rotary.inv_freq if self.rotary is not None else torch.zeros(0),
            "positions": positions,
            "key_padding_mask": key_padding_mask,
            "causal": self.causal,
            "kv_norm": self.kv_norm,
            "eps": self.eps,
            "dtype": dtype,
        }

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, positions=None, **_ignored):
        """The naive MLA oracle on this layer's weights cast to ``dtype`` (no cache)."""
        return mla_attention(x, **self.oracle_kw(dtype, key_padding_mask, positions))


def _small(n, dim, heads, mode):
    return MultiheadLatentAttention(
        dim, heads, kv_lora_rank=max(8, dim // 2), qk_nope_dim=16, qk_rope_dim=8, v_dim=16, mode=mode
    )


_PAPER = "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model (2024)"
_SUPPORTS = {"causal", "decode", "backward", "bf16", "padding"}

register(
    "mla",
    family="D",
    kind="layer",
    paper=_PAPER,
    exact=True,
    supports=_SUPPORTS,
    factory=lambda n, *, dim=64, heads=4: _small(n, dim, heads, "naive"),
    summary="multi-head latent attention: a cached low-rank joint KV latent and shared RoPE key; K/V expanded per head",
    source=MultiheadLatentAttention,
)
register(
    "mla_absorb",
    family="D",
    kind="layer",
    paper=_PAPER,
    exact=True,
    supports=_SUPPORTS,
    factory=lambda n, *, dim=64, heads=4: _small(n, dim, heads, "absorb"),
    summary="MLA with W_UK folded into the query and W_UV into the output: multi-query attention over the latent cache",
    source=MultiheadLatentAttention,
)

r"""A pre-norm ``TransformerBlock`` (RMSNorm, attention, RMSNorm, SwiGLU) and a small decoder-only ``Transformer``.

.. math::
    h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad
    y = h + W_2\big(\mathrm{silu}(W_1 \mathrm{RMSNorm}(h)) \odot W_3 \mathrm{RMSNorm}(h)\big)

(Llama's block; SwiGLU from Shazeer, 2020, with hidden width ``round(8/3 * dim)`` up to a multiple of 8 so the
parameter count matches a 4x GELU MLP.) Built only from :class:`~attnkit.layers.Attention` (or any attention
layer with the same ``forward(x, cache=...)`` and ``make_cache``), so any mechanism trains and decodes::

    model = Transformer(vocab=256, dim=128, depth=4, heads=4, mechanism="sliding_window")
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

Initialisation follows Llama / x-transformers: token embeddings ``N(0, 0.02)``, the output head tied to them
by default, linear layers with PyTorch's default; ``state_dict`` names are ``embed``, ``blocks.{i}.attn.*``,
``blocks.{i}.mlp.*``, ``blocks.{i}.attn_norm``, ``blocks.{i}.mlp_norm``, ``norm``, ``head`` and stay stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError, bad, check_count
from .attention import Attention
from .cache import Cache


class SwiGLU(nn.Module):
    """``W_2 (silu(W_1 x) * W_3 x)`` (names ``gate, up, down``)."""

    def __init__(self, dim: int, hidden: int | None = None, *, bias: bool = False):
        super().__init__()
        hidden = hidden or 8 * -(-int(8 * dim / 3) // 8)
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``. ``attn`` is an attention layer (default:
    :class:`Attention` built from ``dim, heads`` and the keywords); ``mlp_hidden`` the SwiGLU width."""

    def __init__(
        self, dim: int, heads: int, *, attn: nn.Module | None = None, mlp_hidden: int | None = None, **attn_kwargs
    ):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, **attn_kwargs) if attn is None else attn
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, *, key_padding_mask=None, cache: Cache | None = None, positions=None):
        kw = {"cache": cache} if cache is not None else {}
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask
        if positions is not None:
            kw["positions"] = positions
        x = x + self.attn(self.attn_norm(x), **kw)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A decoder-only language model of :class:`TransformerBlock` s: ``tokens (B, N) -> logits (B, N, vocab)``.

    Args:
        vocab: vocabulary size.
        dim, depth, heads: width, blocks, query heads.
        mechanism: one mechanism for every block, or a sequence of ``depth`` (hybrid models: a window in most
            blocks, dense in a few); see :class:`Attention`.
        attn: instead, ``attn(i) -> nn.Module`` builds block ``i``'s attention layer (a family-D variant).
        rope: RoPE in every block (default True; base 10,000).
        tie_embeddings: the output head reuses the embedding matrix.
        **attn_kwargs: passed to every :class:`Attention` (``kv_heads``, ``qk_norm``, ``max_seq_len``...).
    """

    def __init__(
        self,
        vocab: int,
        dim: int,
        depth: int,
        heads: int,
        *,
        mechanism=None,
        attn: Callable[[int], nn.Module] | None = None,
        rope=True,
        mlp_hidden: int | None = None,
        tie_embeddings: bool = True,
        **attn_kwargs,
    ):
        super().__init__()
        for name, val in (("vocab", vocab), ("dim", dim), ("depth", depth), ("heads", heads)):
            check_count(name, val, 1)
        mechs = (
            list(mechanism)
            if isinstance(mechanism, Sequence) and not isinstance(mechanism, str)
            else [mechanism] * depth
        )
        if len(mechs) != depth:
            raise ShapeError(bad("mechanism", f"one mechanism or a sequence of depth={depth}", f"{len(mechs)} of them"))
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        blocks = []
        for i in range(depth):
            layer = attn(i) if attn is not None else None
            kw = {} if layer is not None else {"mechanism": mechs[i], "rope": rope, **attn_kwargs}
            blocks.append(TransformerBlock(dim, heads, attn=layer, mlp_hidden=mlp_hidden, **kw))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def make_cache(self, batch: int, max_len: int, **kw) -> list[Cache]:
        """One cache per block (``kw`` as :meth:`Attention.make_cache`)."""
        return [b.attn.make_cache(batch, max_len, **kw) for b in self.blocks]

    def forward(self, tokens: torch.Tensor, *, key_padding_mask=None, cache: list[Cache] | None = None, positions=None):
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ShapeError(bad("tokens", "an integer tensor (B, N)", (tuple(tokens.shape), tokens.dtype)))
        if cache is not None and len(cache) != len(self.blocks):
            raise ShapeError(bad("cache", f"a list of {len(self.blocks)} caches (make_cache)", len(cache)))
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(
                x, key_padding_mask=key_padding_mask, cache=None if cache is None else cache[i], positions=positions
            )
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of ``steps`` tokens with a cache: the prompt in one forward, then one token a step."""
        check_count("steps", steps, 1)
        cache = self.make_cache(tokens.shape[0], tokens.shape[1] + steps)
        logits = self(tokens, cache=cache)
        out = [tokens]
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = self(nxt, cache=cache)
        return torch.cat(out, 1)

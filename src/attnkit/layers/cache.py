"""Per-layer decode caches: preallocated dense K/V, per-head lengths for evicting policies, a recurrent state.

A cache belongs to one layer (``layer.make_cache(batch, max_len)``) and is passed as ``layer(x, cache=c)``;
the layer appends the new tokens' keys and values and attends over everything cached. Every cache says how
much it holds: ``length`` (tokens seen), ``nbytes`` (allocated) and ``bytes_per_token`` (what one more token
costs, per layer), which the layers benchmark reports and the MLA test counts.

K/V are cached with the layer's ``kv_heads`` heads, never expanded to the query heads (torchtune's
``KVCache`` expands first and loses grouped-query attention's saving).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, UnsupportedError, bad, check_count, check_memory


class Cache:
    """What every cache answers (the protocol the layers and the benchmark use)."""

    length: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bytes_per_token(self) -> int:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return []

    def reset(self) -> None:
        self.length = 0


def check_room(length: int, n: int, max_len: int) -> None:
    """Raise ShapeError (naming ``x``) unless ``n`` more tokens fit after ``length`` in ``max_len``."""
    if length + n > max_len:
        raise ShapeError(
            bad("x", f"at most {max_len - length} new tokens (the cache holds max_len={max_len})", f"{n} tokens")
        )


class KVCache(Cache):
    """A preallocated dense K/V cache ``(B, kv_heads, max_len, head_dim)`` with a key-padding mask.

    ``append(k, v, mask)`` writes ``n`` new positions at ``length`` and returns views of everything cached:
    ``(k, v, mask)`` with ``mask`` ``(B, length)`` (True where the key is real) or None when no key was ever
    padding.
    """

    def __init__(self, batch, kv_heads, max_len, head_dim, *, v_dim=None, dtype=torch.float32, device=None):
        for name, val in (("batch", batch), ("kv_heads", kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
            check_count(name, val, 1)
        v_dim = head_dim if v_dim is None else v_dim
        check_count("v_dim", v_dim, 1)
        size = torch.empty((), dtype=dtype).element_size()
        check_memory("KVCache", batch * kv_heads * max_len * (head_dim + v_dim) * size, "use a smaller max_len")
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, max_len, v_dim, dtype=dtype, device=device)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.max_len, self.length = max_len, 0

    def tensors(self):
        return [self.k, self.v]

    @property
    def bytes_per_token(self) -> int:
        return self.k.shape[1] * (self.k.shape[3] + self.v.shape[3]) * self.k.element_size()

    def reset(self) -> None:
        self.length, self.padded = 0, False
        self.mask.fill_(True)

    def append(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        b, h, n, d = k.shape
        if (b, h, d) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ShapeError(
                bad(
                    "k",
                    f"(batch, kv_heads, n, head_dim) = {tuple(self.k.shape[:2])} + (n, {self.k.shape[3]})",
                    tuple(k.shape),
                )
            )
        check_room(self.length, n, self.max_len)
        a, e = self.length, self.length + n
        self.k[:, :, a:e] = k.to(self.k.dtype)
        self.v[:, :, a:e] = v.to(self.v.dtype)
        if mask is not None:
            self.mask[:, a:e] = mask
            self.padded = self.padded or not bool(mask.all())
        self.length = e
        return self.k[:, :, :e], self.v[:, :, :e], (self.mask[:, :e] if self.padded else None)


class HeadKVCache(KVCache):
    """A dense cache whose heads keep different tokens: an evicting policy (H2O, SnapKV) removes entries per
    ``(batch, kv head)``, so each holds ``lengths[b, h]`` keys (compacted to the front) and their absolute
    ``positions``. ``length`` stays the number of tokens seen (the next token's position).

    Attention over it runs every ``(batch, kv head)`` as its own batch row with its own padding mask, so GQA's
    saving is kept. Decoding is one token at a time once the heads differ (their new keys land at different
    slots).
    """

    def __init__(self, batch, kv_heads, max_len, head_dim, *, v_dim=None, dtype=torch.float32, device=None):
        super().__init__(batch, kv_heads, max_len, head_dim, v_dim=v_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, kv_heads, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, kv_heads, max_len, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, kv_heads, max_len, dtype=torch.bool, device=device)

    def reset(self) -> None:
        self.length = 0
        self.lengths.zero_()
        self.mask.fill_(False)

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.length).all())

    def append(self, k, v, mask=None):
        b, h, n, d = k.shape
        if (b, h, d) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ShapeError(bad("k", f"kv (batch, heads, n, dim) matching {tuple(self.k.shape)}", tuple(k.shape)))
        if n > 1 and not self.uniform:
            raise UnsupportedError(
                bad("x", "one token at a time once heads have evicted different keys", f"{n} tokens")
            )
        check_room(int(self.lengths.max()), n, self.max_len)
        real = torch.ones(b, n, dtype=torch.bool, device=k.device) if mask is None else mask
        slot = self.lengths[..., None] + torch.arange(n, device=k.device)  # (B, H, n)
        idx = slot[..., None]
        self.k.scatter_(2, idx.expand(-1, -1, -1, d), k.to(self.k.dtype))
        self.v.scatter_(2, idx.expand(-1, -1, -1, self.v.shape[-1]), v.to(self.v.dtype))
        self.positions.scatter_(2, slot, (self.length + torch.arange(n, device=k.device)).expand(b, h, n))
        self.mask.scatter_(2, slot, real[:, None, :].expand(b, h, n))
        self.lengths += n
        self.length += n
        e = int(self.lengths.max())
        return self.k[:, :, :e], self.v[:, :, :e], self.mask[:, :, :e]

    def evict(self, keep: torch.Tensor) -> None:
        """Keep the entries where ``keep`` ``(B, kv_heads, max(lengths))`` is True, compacted in order."""
        e = int(self.lengths.max())
        if keep.shape != (*self.lengths.shape, e) or keep.dtype != torch.bool:
            raise ShapeError(bad("keep", f"a bool tensor {(*self.lengths.shape, e)}", (tuple(keep.shape), keep.dtype)))
        keep = keep & (torch.arange(e, device=keep.device) < self.lengths[..., None])
        # A stable sort moves the kept slots to the front in their original order.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        for t in (self.k, self.v):
            t[:, :, :e] = t[:, :, :e].gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1]))
        self.positions[:, :, :e] = self.positions[:, :, :e].gather(2, order)
        self.mask[:, :, :e] = self.mask[:, :, :e].gather(2, order) & (
            torch.arange(e, device=keep.device) < keep.sum(-1, keepdim=True)
        )
        self.lengths = keep.sum(-1)


class StateCache(Cache):
    """The recurrent state of a linear mechanism (:class:`attnkit.linear.LinearState`): constant size, so
    ``bytes_per_token`` is 0."""

    def __init__(self):
        self.state = None
        self.length = 0

    def tensors(self):
        s = self.state
        return [] if s is None else [t for t in (s.kv, s.totals) if t is not None]

    @property
    def bytes_per_token(self) -> int:
        return 0

    def reset(self) -> None:
        self.state, self.length = None, 0

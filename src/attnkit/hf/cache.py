"""A transformers ``Cache`` whose KV heads each hold their own number of entries, and really drop evictions.

kvpress fakes head-wise budgets by masking (its own docstring: "does not reduce peak memory"). Here every
layer keeps, per KV head, a ``(B, T_h, D)`` key and value tensor with its own length ``T_h``, plus per-entry
metadata: the real-token position (padding excluded), whether the entry is real (not padding), the position
its key is rotated at, and the policy's score. Eviction gathers the kept entries and frees the rest.

Keys and values of a layer live in one ``(B, H, C, D)`` buffer, with room for :data:`SPARE` entries per head
beyond the longest head: a decode step writes its key in place (no copy of the cache per step), the heads of
equal length are one view (:meth:`_HeadwiseLayer.stacked`: one attention call per layer, not one per head), and
an eviction that leaves more than :data:`SPARE` unused entries shrinks the buffer. ``memory()`` counts the
buffer as allocated (``kv_reserved``) beside the entries held (``kv``).

The cache reports the number of tokens *seen* as its sequence length, so transformers keeps giving new tokens
their absolute positions (generate, manual loops); what is stored is ``lengths()`` and ``memory()``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import UnsupportedError, bad
from ._rope import rerotate

#: Spare entries per head in a layer's key and value buffer: a decode step appends in place, and the buffer is
#: reallocated once every ``SPARE`` steps of growth (an evicting policy's never grows at decode).
SPARE = 16


#: Per-entry metadata a layer keeps beside its keys and values, and its dtype.
_META = {"pos": torch.int32, "rope": torch.int32, "valid": torch.bool, "score": torch.float32}


class _HeadwiseLayer(CacheLayerMixin):
    """One decoder layer's entries, one tensor per KV head. See :class:`HeadwiseCache`.

    Keys, values and each metadata field live in one buffer per layer, ``(B, H, C, ...)``; the per-head lists
    (``k``, ``v``, ``pos``, ``rope``, ``valid``, ``score``: ``(B, T_h, ...)`` each) are views of them, so what
    policies read per head and what the attention reads for all heads at once are the same memory.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: HeadwiseCache):
        super().__init__()
        self._owner = owner
        self._kb: torch.Tensor | None = None  # (B, H, C, D): every head's keys, C >= max T_h
        self._vb: torch.Tensor | None = None
        self._mb: dict[str, torch.Tensor] = {}  # field -> (B, H, C)
        self._n: list[int] = []  # entries held per head
        self._lists: dict[str, list[torch.Tensor]] = {}  # the per-head views, made when first read
        self.real: torch.Tensor | None = None  # (B,) real tokens seen
        self.seen = 0
        self._staged = None
        self.q_pos = None  # (B, Q) real positions of the current step's queries
        self.q_delta: list[torch.Tensor | None] = []  # per head (B, Q) rotation applied to this step's queries
        # re-rotating policies: (B, H) shift of every rotation in a head (a key at index j with i invalid entries
        # before it is rotated at j - i + shift; None is 0). Logits depend only on differences of rotations, so
        # an eviction of the middle moves the tail without re-rotating it and rotates the few first entries on
        # by the same count instead; a gather resets it to 0
        self._shift: torch.Tensor | None = None
        self._first: tuple | None = None  # (a, the first a keys (B, H, a, D), at least float32, their rotations)

    # -- transformers' interface ----------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def stage(self, valid: torch.Tensor | None, position_ids: torch.Tensor | None):
        """Padding and position ids of the next ``update`` (the attention module's pre-hook calls this)."""
        self._staged = (valid, position_ids)

    def update(self, key_states, value_states, *args, **kwargs):
        owner = self._owner
        if not owner.active:
            raise UnsupportedError(
                bad("past_key_values", "a HeadwiseCache used while its attnkit policy is applied", "a stale cache")
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, Q, _ = key_states.shape
        dev = key_states.device
        valid, rope_in = self._staged if self._staged is not None else (None, None)
        self._staged = None
        valid = torch.ones(B, Q, dtype=torch.bool, device=dev) if valid is None else valid.to(dev, torch.bool)
        if rope_in is None:
            rope_in = torch.arange(self.seen, self.seen + Q, device=dev)[None].expand(B, Q)
        rope_in = rope_in.to(dev).expand(B, Q)
        if self.real is None:
            self.real = torch.zeros(B, dtype=torch.long, device=dev)
        steps = valid.long().cumsum(1)
        pos = (self.real[:, None] + steps - 1).clamp_min(0)
        self.q_pos = pos
        self.real = self.real + steps[:, -1]
        ks, rope = key_states, rope_in[:, None, :]
        if owner.policy.rerotate:  # each head's new keys go to its next free slots
            base = self._valid_count() if self._n else torch.zeros(B, H, dtype=torch.long, device=dev)
            if self._shift is not None:
                base = base + self._shift
            rope = base[:, :, None] + (steps - 1)[:, None, :]  # (B, H, Q)
            delta = rope - rope_in[:, None, :]
            ks = rerotate(key_states, delta, owner.inv_freq)
            self.q_delta = list(delta.unbind(1))
        else:
            self.q_delta = [None] * H
        self._append(ks, value_states, pos=pos[:, None], rope=rope, valid=valid[:, None])
        self.seen += Q
        return key_states, value_states

    def _valid_count(self) -> torch.Tensor:
        """``(B, H)`` valid entries per head."""
        st = self.stacked_meta("valid")
        if st is not None:
            return st.sum(2)
        return torch.stack([x.sum(1) for x in self.valid], 1)

    def _append(self, k, v, **meta):
        """Write ``k, v (B, H, Q, D)`` and their metadata (``(B, H or 1, Q)`` each; scores start at 0) after each
        head's entries, growing the buffers when they are full."""
        B, H, Q = k.shape[:3]
        n = self._n or [0] * H
        if self._kb is None or max(n) + Q > self._kb.shape[2]:
            self._realloc(max(n) + Q + SPARE, like=(k, v), heads=H)
        new = {"k": k, "v": v, **meta}
        bufs = {"k": self._kb, "v": self._vb, **self._mb}
        heads = [slice(None)] if len(set(n)) == 1 else range(H)
        for h in heads:
            a = n[0] if isinstance(h, slice) else n[h]
            for name, buf in bufs.items():
                x = new.get(name)
                if x is None:
                    buf[:, h, a : a + Q] = 0
                else:
                    buf[:, h, a : a + Q] = x if isinstance(h, slice) else x[:, h if x.shape[1] > 1 else 0]
        self._views([x + Q for x in n])

    def _realloc(self, cap: int, like=None, heads: int | None = None):
        """New buffers of ``cap`` entries per head holding what the views hold (zeros elsewhere: a spare entry is
        never read, but nothing non-finite waits there)."""
        k, v = (self._kb, self._vb) if like is None else like
        B = k.shape[0]
        H = heads or k.shape[1]
        n = self._n or [0] * H
        old = {"k": self._kb, "v": self._vb, **self._mb}
        kb = torch.zeros(B, H, cap, k.shape[-1], dtype=k.dtype, device=k.device)
        vb = torch.zeros(B, H, cap, v.shape[-1], dtype=v.dtype, device=v.device)
        mb = {name: torch.zeros(B, H, cap, dtype=dt, device=k.device) for name, dt in _META.items()}
        if self._kb is not None:
            for name, buf in {"k": kb, "v": vb, **mb}.items():
                if len(set(n)) == 1:
                    buf[:, :, : n[0]] = old[name][:, :, : n[0]]
                else:
                    for h, t in enumerate(n):
                        buf[:, h, :t] = old[name][:, h, :t]
        self._kb, self._vb, self._mb = kb, vb, mb
        self._views(n)

    def _views(self, n: list[int]) -> None:
        self._n = list(n)
        self._lists = {}

    def _list(self, name: str) -> list[torch.Tensor]:
        got = self._lists.get(name)
        if got is None:
            buf = self._kb if name == "k" else self._vb if name == "v" else self._mb.get(name)
            got = [] if buf is None else [buf[:, h, :t] for h, t in enumerate(self._n)]
            self._lists[name] = got
        return got

    # per head, views of the buffers: keys and values (B, T_h, D); the real-token position, the position the key
    # is rotated at (int32), whether the entry is real, the policy's score (float32), each (B, T_h)
    k = property(lambda self: self._list("k"))
    v = property(lambda self: self._list("v"))
    pos = property(lambda self: self._list("pos"))
    rope = property(lambda self: self._list("rope"))
    valid = property(lambda self: self._list("valid"))
    score = property(lambda self: self._list("score"))

    def _store(self, h: int, k: torch.Tensor, v: torch.Tensor, meta: dict) -> None:
        """Head ``h`` now holds ``k, v (B, T, D)`` and ``meta`` (field -> ``(B, T)``), ``T`` within the buffer."""
        t = k.shape[1]
        self._kb[:, h, :t] = k
        self._vb[:, h, :t] = v
        for name, x in meta.items():
            self._mb[name][:, h, :t] = x
        self._n[h] = t
        self._lists = {}

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(K, V)``, each ``(B, H, T, D)``, views of the buffers when every head holds ``T`` entries; else None."""
        n = self._n
        if not n or len(set(n)) != 1:
            return None
        return self._kb[:, :, : n[0]], self._vb[:, :, : n[0]]

    def stacked_meta(self, name: str) -> torch.Tensor | None:
        """Metadata field ``name`` of every head, ``(B, H, T)`` (a view), when every head holds ``T``; else None."""
        n = self._n
        if not n or len(set(n)) != 1:
            return None
        return self._mb[name][:, :, : n[0]]

    def padded(self) -> tuple[torch.Tensor, ...]:
        """``(K, V, pos, valid)`` of every head over the longest head's ``T`` entries (views, ``(B, H, T, ...)``),
        ``valid`` a new tensor, False past each head's own entries: one attention call for heads of unequal
        lengths."""
        T = max(self._n)
        held = torch.arange(T, device=self._kb.device) < torch.tensor(self._n, device=self._kb.device)[:, None]
        valid = self._mb["valid"][:, :, :T] & held
        return self._kb[:, :, :T], self._vb[:, :, :T], self._mb["pos"][:, :, :T], valid

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.__init__(self._owner)

    def reorder_cache(self, beam_idx):
        if self._kb is not None:
            idx = beam_idx.to(self._kb.device)
            self._kb, self._vb = self._kb.index_select(0, idx), self._vb.index_select(0, idx)
            self._mb = {name: buf.index_select(0, idx) for name, buf in self._mb.items()}
            self._views(self._n)
            if self._shift is not None:
                self._shift = self._shift.index_select(0, idx)
            if self._first is not None:
                a, k0, r0 = self._first
                self._first = (a, k0.index_select(0, idx), r0.index_select(0, idx))
        if self.real is not None:
            self.real = self.real.index_select(0, beam_idx.to(self.real.device))

    # -- what policies read ---------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return len(self._n)

    @property
    def seen_real(self) -> int:
        return int(self.real.max()) if self.real is not None else 0

    def lengths(self) -> list[int]:
        return list(self._n)

    def all_valid(self) -> bool:
        """No padding among the entries held."""
        st = self.stacked_meta("valid")
        return bool(st.all()) if st is not None else all(bool(x.all()) for x in self.valid)

    def record(self, h: int, mass: torch.Tensor | None, observed: bool, scorer) -> None:
        """Fold one step's attention mass ``(B, T_h)`` into head ``h``'s scores."""
        if mass is None:
            return
        self.set_score(h, scorer.update(self.score[h], mass, observed))

    def record_stacked(self, mass: torch.Tensor | None, observed: bool, scorer) -> None:
        """:meth:`record` for every head at once, ``mass (B, H, T)`` (heads of equal lengths): the scorer sees
        the heads folded into its rows, ``(B * H, T)``."""
        if mass is None:
            return
        old = self.stacked_meta("score")
        B, H, T = old.shape
        new = scorer.update(old.reshape(B * H, T), mass.detach().reshape(B * H, T), observed)
        old.copy_(new.view(B, H, T))

    def set_score(self, h: int, score: torch.Tensor) -> None:
        """Head ``h``'s scores are now ``score (B, T_h)`` (bookkeeping: no autograd history is kept)."""
        self.score[h].copy_(score.detach())

    def evict(self, keep, merge=None) -> None:
        """Keep, per head, the entries at the given sorted indices ``(B, n_h)`` (a list, None keeping all; or one
        ``(B, H, n)`` tensor for every head; or None, keeping everything); free the rest.
        ``merge(k, v, valid, idx) -> (k_kept, v_kept)`` folds the evicted entries into the kept ones first (LOOK-M)."""
        if keep is None or not isinstance(keep, torch.Tensor) and all(i is None for i in keep):
            return
        if isinstance(keep, torch.Tensor):
            if merge is None and self._evict_stacked(keep):
                return
            keep = list(keep.unbind(1))
        if merge is None and self._evict_stacked(keep):
            return
        owner = self._owner
        for h, idx in enumerate(keep):
            if idx is None:
                continue
            idx = idx.to(self._kb.device)
            T = self._n[h]
            a = _prefix_and_suffix(idx, T) if merge is None else None
            if a is not None and (not owner.policy.rerotate or bool(self.valid[h].all())):
                self._move_tail(h, a, T - idx.shape[-1], T)
                continue
            ix3 = idx[..., None]
            if merge is not None:
                k, v = merge(self.k[h], self.v[h], self.valid[h], idx)
            else:
                k = self.k[h].gather(1, ix3.expand(-1, -1, self.k[h].shape[-1]))
                v = self.v[h].gather(1, ix3.expand(-1, -1, self.v[h].shape[-1]))
            meta = {name: getattr(self, name)[h].gather(1, idx) for name in _META}
            if owner.policy.rerotate:
                slot = (meta["valid"].long().cumsum(1) - 1).clamp_min(0)
                k = rerotate(k, slot - meta["rope"].long(), owner.inv_freq)
                meta["rope"] = slot.to(torch.int32)
                self._unshift(h)
            self._store(h, k, v, meta)
        self._shrink()

    def _shrink(self) -> None:
        """Views on the entries now held; buffers cut back when more than :data:`SPARE` entries are unused."""
        if self._kb.shape[2] > max(self._n) + SPARE:
            cap = max(self._n) + SPARE
            self._kb, self._vb = self._kb[:, :, :cap].clone(), self._vb[:, :, :cap].clone()
            self._mb = {name: buf[:, :, :cap].clone() for name, buf in self._mb.items()}
        self._views(self._n)

    def _evict_stacked(self, keep) -> bool:
        """:meth:`evict` for every head at once when all heads hold as many entries and keep as many (one gather
        per buffer and one re-rotation, not one per head); False, doing nothing, otherwise."""
        kv = self.stacked()
        if kv is None:
            return False
        if isinstance(keep, list):
            if any(i is None for i in keep) or len({tuple(i.shape) for i in keep}) != 1:
                return False
            keep = torch.stack(keep, 1)
        idx = keep.to(self._kb.device)  # (B, H, n)
        n, T = idx.shape[2], kv[0].shape[2]
        a = _prefix_and_suffix(idx, T)
        if a is not None and (not self._owner.policy.rerotate or self.all_valid()):
            self._evict_middle(a, T - n, T)
            return True
        k, v = (x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1])) for x in kv)
        meta = {name: buf[:, :, :T].gather(2, idx) for name, buf in self._mb.items()}
        if self._owner.policy.rerotate:
            slot = (meta["valid"].long().cumsum(2) - 1).clamp_min(0)
            k = rerotate(k, slot - meta["rope"].long(), self._owner.inv_freq)
            meta["rope"] = slot.to(torch.int32)
            self._unshift(slice(None))
        for name, x in {"k": k, "v": v, **meta}.items():
            buf = self._kb if name == "k" else self._vb if name == "v" else self._mb[name]
            buf[:, :, :n] = x
        self._n = [n] * len(self._n)
        self._shrink()
        return True

    def _evict_middle(self, a: int, e: int, T: int) -> None:
        """Every head keeps its first ``a`` and last ``T - a - e`` entries (StreamingLLM's sinks and window, MoA's
        after a span's growth) by a copy of the buffers' tail down ``e`` slots: no gather."""
        self._move_tail(slice(None), a, e, T)
        self._shrink()

    def _move_tail(self, h, a: int, e: int, T: int) -> None:
        """:meth:`_evict_middle` for the heads ``h`` (an index or a slice), without the shrink.

        Re-rotating (every entry real, which the caller checks), each kept key of the tail should be rotated
        ``e`` positions back; the tail keeps its rotations instead, and the first ``a`` keys are rotated ``e``
        on, with the head's shift: every difference of rotations, so every logit, is what the re-rotated tail
        gives, for ``a`` re-rotated keys rather than ``T - a - e`` (on SmolLM2's StreamingLLM decode step, the
        tail's re-rotation was a tenth of the step). The first keys are rotated from one copy of them (at least
        float32), so their error does not grow with the steps."""
        n = T - e
        for name, buf in {"k": self._kb, "v": self._vb, **self._mb}.items():
            if name != "valid" or not self._owner.policy.rerotate:
                buf[:, h, a:n] = buf[:, h, a + e : T].clone()
        if self._owner.policy.rerotate:
            B, H = self._kb.shape[:2]
            if self._shift is None:
                self._shift = torch.zeros(B, H, dtype=torch.long, device=self._kb.device)
            if self._first is None or self._first[0] != a:
                exact = torch.promote_types(self._kb.dtype, torch.float32)  # bf16 keys copied in float32
                self._first = (a, self._kb[:, :, :a].to(exact, copy=True), self._mb["rope"][:, :, :a].long())
            _, k0, r0 = self._first
            self._shift[:, h] += e
            rope = self._mb["rope"][:, h, :a].long() + e
            self._kb[:, h, :a] = rerotate(k0[:, h], rope - r0[:, h], self._owner.inv_freq).to(self._kb.dtype)
            self._mb["rope"][:, h, :a] = rope.to(torch.int32)
        if isinstance(h, slice):
            self._n = [n] * len(self._n)
        else:
            self._n[h] = n
        self._lists = {}

    def _unshift(self, h) -> None:
        """Heads ``h`` rotated again at their indices (a gather re-rotated them): shift 0, no first-key copy."""
        if self._shift is not None:
            self._shift[:, h] = 0
        self._first = None

    def nbytes(self) -> tuple[int, int, int]:
        """Bytes of the entries held, of the key and value buffers as allocated, and of the metadata held."""
        if self._kb is None:
            return 0, 0, 0
        held = self._kb.shape[0] * sum(self._n)  # counted, not summed over per-head views: benches call it per step
        kv = held * sum(x.shape[-1] * x.element_size() for x in (self._kb, self._vb))
        reserved = sum(x.numel() * x.element_size() for x in (self._kb, self._vb))
        meta = held * sum(x.element_size() for x in self._mb.values())
        return kv, reserved, meta


class HeadwiseCache(Cache):
    """Per-head KV cache for attnkit policies; transformers' ``Cache`` interface (``generate``, manual loops).

    :func:`attnkit.hf.apply` puts one in place of an empty cache whenever its policy compresses, so
    ``model(...)`` and ``model.generate(...)`` need nothing more. For a manual loop, pass
    ``past_key_values=handle.new_cache()`` (or the cache a previous call returned).

    Args:
        num_layers: decoder layers.
        policy: the :class:`~attnkit.hf.Policy` that decides evictions.
        inv_freq: RoPE inverse frequencies, needed when ``policy.rerotate``.
    """

    def __init__(self, num_layers: int, policy, inv_freq: torch.Tensor | None = None):
        self.policy = policy
        self.inv_freq = inv_freq
        self.active = True
        super().__init__(layers=[_HeadwiseLayer(self) for _ in range(num_layers)])
        if policy.rerotate and inv_freq is None:
            raise UnsupportedError(
                bad("policy", "a model with rotary position embeddings to re-rotate keys", "no RoPE inv_freq found")
            )

    def lengths(self) -> list[list[int]]:
        """Stored entries per layer and KV head."""
        return [layer.lengths() for layer in self.layers]

    def memory(self) -> dict:
        """Bytes: ``kv`` (the keys and values held), ``kv_reserved`` (their buffers as allocated, at most
        :data:`SPARE` entries per head more after an eviction), ``meta`` (positions, padding flags, scores) and
        ``total`` (reserved plus meta)."""
        kv = reserved = meta = 0
        for layer in self.layers:
            a, r, b = layer.nbytes()
            kv, reserved, meta = kv + a, reserved + r, meta + b
        return {"kv": kv, "kv_reserved": reserved, "meta": meta, "total": reserved + meta}


def _prefix_and_suffix(idx: torch.Tensor, T: int) -> int | None:
    """``a`` when the sorted indices ``idx (..., n)`` of every row are ``0 .. a-1`` then the last ``n - a`` of
    ``0 .. T-1``; else None."""
    n = idx.shape[-1]
    d = idx - torch.arange(n, device=idx.device)  # nondecreasing: 0 on the prefix, T - n on the suffix
    if not bool(((d == 0) | (d == T - n)).all()):
        return None
    lo, hi = (d == 0).sum(-1).aminmax()
    return int(lo) if int(lo) == int(hi) else None

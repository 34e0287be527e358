"""attnkit attention inside transformers models, through ``AttentionInterface`` (no forked modeling files)."""

from __future__ import annotations

import contextlib
import weakref

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from ..api import attention as _attention
from ..errors import DTypeError, UnsupportedError, bad
from ..patterns.base import Pattern, PerHead
from ..patterns.causal import Causal
from ..patterns.global_tokens import AShape
from ..patterns.sliding_window import SlidingWindow
from ._rope import find_inv_freq, rerotate
from .cache import HeadwiseCache
from .policy import Policy

NAME = "attnkit"
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of queries in the explicit path (64 MB in float32)
# the explicit path folds heads of unequal lengths into one call (padding the shorter ones) for steps of at most
# this many queries, or when padding adds at most this factor of pairs: below it the per-head calls' op
# overhead outweighs the padded pairs
_FOLD_QUERIES = 16
_FOLD_WASTE = 1.5


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function registered with the attention function: key padding only, ``(B, 1, 1, kv_length)``.

    Causality is not carried by the mask: the attention function takes it from ``module.is_causal`` (and the
    policy's pattern), so it cannot be silently dropped with a ``None`` mask. Returns None without padding.
    """
    if attention_mask is None:
        return None
    pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    pad = pad[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if bool(pad.all()):
        return None
    return pad[:, None, None, :]


def _register() -> None:
    AttentionInterface.register(NAME, _attnkit_attention)
    AttentionMaskInterface.register(NAME, _padding_mask)


class _Binding:
    """What one :func:`apply` attached to a model: the policy, the hooks, the caches it handed out."""

    def __init__(self, model, policy: Policy):
        self.model = model
        self.policy = policy
        self.hooks = []
        self.modules = []
        self.current: dict[int, object] = {}
        self.caches: weakref.WeakSet = weakref.WeakSet()
        self.inv_freq = find_inv_freq(model)
        self.num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        self.previous = None
        self.active = True


class Handle:
    """Returned by :func:`apply`; ``remove()`` restores the model exactly (implementation, hooks, attributes)."""

    def __init__(self, binding: _Binding):
        self._b = binding

    @property
    def policy(self) -> Policy:
        return self._b.policy

    def new_cache(self) -> HeadwiseCache:
        """An empty :class:`HeadwiseCache` for this model and policy (for manual decode loops)."""
        b = self._b
        if not b.active:
            raise UnsupportedError(bad("handle", "an applied policy", "a removed one"))
        cache = HeadwiseCache(b.num_layers, b.policy, b.inv_freq)
        b.caches.add(cache)
        return cache

    def remove(self) -> None:
        b = self._b
        if not b.active:
            return
        for h in b.hooks:
            h.remove()
        for m in b.modules:
            del m._attnkit_binding
        for cache in list(b.caches):
            cache.active = False
        b.current.clear()
        b.model.set_attn_implementation(b.previous)
        b.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _attention_modules(model) -> list:
    """Modules that call ``ALL_ATTENTION_FUNCTIONS`` (they carry ``layer_idx`` and ``is_causal``)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "is_causal") and hasattr(m, "layer_idx") and hasattr(m, "scaling") or _is_bert_like(m)
    ]


def _is_bert_like(m) -> bool:
    return type(m).__name__.endswith("SelfAttention") and hasattr(m, "is_causal") and hasattr(m, "layer_idx")


def _check_model(model) -> None:
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedError(
            bad(
                "model",
                "a transformers model whose attention goes through AttentionInterface (_supports_attention_backend)",
                type(model).__name__,
            )
        )
    cfg = model.config.get_text_config()
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if getattr(cfg, "sliding_window", None) or kinds - {"full_attention"}:
        raise UnsupportedError(
            bad("model", "full-attention layers only (sliding or hybrid layers are not supported yet)", sorted(kinds))
        )


def apply(model, policy: Policy | None = None) -> Handle:
    """Run ``model``'s attention through attnkit under ``policy``; returns a removable :class:`Handle`.

    Registers attnkit's attention function and its mask function with transformers' ``AttentionInterface``
    and ``AttentionMaskInterface`` (name ``"attnkit"``) and switches the model to it. Every attention call
    then goes through :func:`attnkit.attention` (dense or the policy's pattern) or, for policies that evict,
    through a :class:`HeadwiseCache` that a forward pre-hook puts in place of an empty cache.

    Works with ``model(...)``, ``model.generate(...)`` and manual decode loops, batch > 1 and left padding.
    Models whose attention does not go through the interface, or that use sliding-window layers, raise
    :class:`~attnkit.errors.UnsupportedError`. ``output_attentions`` gives no weights (as with SDPA).
    """
    policy = Policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise DTypeError(bad("policy", "an attnkit.hf Policy", type(policy).__name__))
    _check_model(model)
    modules = _attention_modules(model)
    if not modules:
        raise UnsupportedError(bad("model", "attention modules with layer_idx and is_causal", "none found"))
    if any(hasattr(m, "_attnkit_binding") for m in modules):
        raise UnsupportedError(bad("model", "a model with no attnkit policy applied", "one already applied"))
    _register()
    b = _Binding(model, policy)
    b.previous = model.config._attn_implementation
    if policy.compresses and b.num_layers is None:
        raise UnsupportedError(bad("model", "a config with num_hidden_layers", "none"))
    if policy.rerotate and b.inv_freq is None:
        raise UnsupportedError(bad("policy", "a model with plain rotary embeddings (rerotate=True)", "none found"))
    model.set_attn_implementation(NAME)
    handle = Handle(b)
    for m in modules:
        m._attnkit_binding = b
        b.modules.append(m)
        b.hooks.append(m.register_forward_pre_hook(_stage_hook(b), with_kwargs=True))
    if policy.compresses:
        b.hooks.append(model.register_forward_pre_hook(_cache_hook(handle), with_kwargs=True))
    return handle


@contextlib.contextmanager
def applied(model, policy: Policy | None = None):
    """``with attnkit.hf.applied(model, policy) as handle:`` -- :func:`apply`, removed on exit."""
    handle = apply(model, policy)
    try:
        yield handle
    finally:
        handle.remove()


def _stage_hook(b: _Binding):
    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        b.current[module.layer_idx] = cache
        if isinstance(cache, HeadwiseCache):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            q_len = hidden.shape[1]
            mask = kwargs.get("attention_mask")
            valid = mask[:, 0, 0, -q_len:] if isinstance(mask, torch.Tensor) else None
            cache.layers[module.layer_idx].stage(valid, kwargs.get("position_ids"))
        return None

    return hook


def _cache_hook(handle: Handle):
    def hook(module, args, kwargs):
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if not use_cache:
            return None
        cache = kwargs.get("past_key_values")
        if isinstance(cache, HeadwiseCache):
            return None
        if cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
            kwargs["past_key_values"] = handle.new_cache()
            return args, kwargs
        raise UnsupportedError(
            bad(
                "past_key_values",
                f"None, an empty cache or a HeadwiseCache (policy {handle.policy.describe()} evicts entries)",
                type(cache).__name__,
            )
        )

    return hook


# -- the attention function --------------------------------------------------------------------------------
def _attnkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b = getattr(module, "_attnkit_binding", None)
    if b is None:
        raise UnsupportedError(
            bad("attn_implementation", "'attnkit' set by attnkit.hf.apply(model, policy)", "set by hand")
        )
    if dropout:
        raise UnsupportedError(bad("dropout", "0 (attnkit attention has no dropout; call model.eval())", dropout))
    layer = module.layer_idx
    causal = bool(getattr(module, "is_causal", True))
    cache = b.current.get(layer)
    if isinstance(cache, HeadwiseCache):
        out = _attend_cached(query, cache, layer, b, causal, scaling)
    else:
        out = _attend_full(query, key, value, attention_mask, layer, b.policy, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def _attend_full(q, k, v, mask, layer, policy, causal, scale):
    """Keys are the whole contiguous history (no cache, or transformers' own cache)."""
    B, Hq, Q, _ = q.shape
    K = k.shape[2]
    kpm = mask[:, 0, 0, :] if isinstance(mask, torch.Tensor) else None
    own = policy.attend(layer, q, k, v, kpm, K - Q, scale, causal)
    if own is not None:
        return own
    pat = policy.pattern(layer, Hq, k.shape[1], K, Q)
    if pat is not None and not isinstance(pat, Pattern):  # a dynamic selector (SparsePrefill)
        if Q != K:
            raise UnsupportedError(
                bad("prefill", "the whole prompt in one step for a dynamic selector", f"{Q} queries over {K} keys")
            )
        return _attention(q, k, v, pattern=pat, causal=causal, scale=scale, key_padding_mask=kpm)
    if pat is not None and kpm is not None:
        # patterns count real tokens: with left padding the index is not the position
        pos = (kpm.long().cumsum(1) - 1).clamp_min(0)
        return _per_head(q, k.unbind(1), v.unbind(1), pos[:, K - Q :], pos, kpm, scale, causal, pat)[0]
    if causal:
        pat = Causal() if pat is None else Causal() & pat
    return _attention(q, k, v, pattern=pat, key_padding_mask=kpm, q_offset=K - Q, scale=scale)


def _per_head(q, keys, values, qpos, kpos, valid, scale, causal, pat, observe=0, q_delta=None, inv_freq=None):
    """:func:`masked_attention` for each KV head ``h`` and its query group: ``keys[h] (B, T_h, D)``, and ``kpos``
    / ``valid`` either one ``(B, T)`` tensor for all heads or a list of them. ``q_delta[h]`` re-rotates the
    group's queries first. Returns ``(out (B, Hq, Q, Dv), [mass per head])``."""
    Hkv = len(keys)
    G = q.shape[1] // Hkv
    outs, masses = [], []
    for h in range(Hkv):
        qh = q[:, h * G : (h + 1) * G]
        if q_delta is not None and q_delta[h] is not None:
            qh = rerotate(qh, q_delta[h][:, None, :], inv_freq)
        heads = torch.arange(h * G, (h + 1) * G, device=q.device)
        kp = kpos[h] if isinstance(kpos, list) else kpos
        ok = valid[h] if isinstance(valid, list) else valid
        o, mass = masked_attention(qh, keys[h], values[h], qpos, kp, ok, scale, causal, pat, heads, observe)
        outs.append(o)
        masses.append(mass)
    return torch.cat(outs, 1), masses


def _heads_folded(q, k, v, qpos, kpos, valid, scale, causal, pat, observe=0, q_delta=None, inv_freq=None):
    """:func:`_per_head` in one :func:`masked_attention` call with the KV heads folded into the batch.

    ``k, v (B, Hk, T, D)`` and ``kpos``, ``valid (B, Hk, T)`` are every head's entries side by side:
    :meth:`HeadwiseCache.stacked` when heads hold as many entries (the fold is then a view), or
    :meth:`~HeadwiseCache.padded`, whose entries past a head's own are invalid. A pattern per head (``PerHead``)
    is evaluated at each folded row's own query heads. ``q_delta`` is a per-head list. Returns
    ``(out (B, Hq, Q, Dv), mass (B, Hk, T) or None)``."""
    B, Hq, Q, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    G = Hq // Hk
    qg = _rotated(q, q_delta, inv_freq).reshape(B, Hk, G, Q, D)
    qp = qpos[:, None].expand(B, Hk, Q).reshape(B * Hk, Q)
    if pat is not None and pat.num_heads is not None:
        heads = torch.arange(Hq, device=q.device).view(1, Hk, G).expand(B, Hk, G).reshape(B * Hk, G)
    else:
        heads = torch.arange(G, device=q.device)  # never read: the pattern does not depend on the head
    out, mass = masked_attention(
        qg.reshape(B * Hk, G, Q, D),
        k.reshape(B * Hk, T, D),
        v.reshape(B * Hk, T, -1),
        qp,
        kpos.reshape(B * Hk, T),
        valid.reshape(B * Hk, T),
        scale,
        causal,
        pat,
        heads,
        observe,
    )
    return out.view(B, Hq, Q, -1), None if mass is None else mass.view(B, Hk, T)


def _rotated(q, q_delta, inv_freq):
    """``q (B, Hq, Q, D)`` with KV head ``h``'s query group re-rotated by ``q_delta[h] (B, Q)`` (as is when the
    list is empty or holds None: the keys kept their positions)."""
    if not q_delta or q_delta[0] is None:
        return q
    B, Hq, Q, D = q.shape
    Hk = len(q_delta)
    qg = q.reshape(B, Hk, Hq // Hk, Q, D)
    return rerotate(qg, torch.stack(q_delta, 1)[:, :, None, :], inv_freq).reshape(B, Hq, Q, D)


def _explicit(q, lay, scale, causal, pat, observe, inv_freq):
    """The explicit path over a layer's cache: one folded call when the heads hold as many entries, or when a
    padded fold wastes little (a decode step, or lengths within :data:`_FOLD_WASTE` of the longest); else one
    call per KV head. Returns ``(out, mass)``, ``mass (B, Hk, T)`` for equal heads, else a per-head list."""
    n = lay.lengths()
    kv = lay.stacked()
    if kv is not None:
        args = (*kv, lay.stacked_meta("pos"), lay.stacked_meta("valid"))
    elif q.shape[2] <= _FOLD_QUERIES or len(n) * max(n) <= _FOLD_WASTE * sum(n):
        args = lay.padded()
    else:
        args = (lay.k, lay.v, lay.q_pos, lay.pos, lay.valid)
        return _per_head(q, *args, scale, causal, pat, observe, lay.q_delta, inv_freq)
    k, v, kpos, valid = args
    out, mass = _heads_folded(q, k, v, lay.q_pos, kpos, valid, scale, causal, pat, observe, lay.q_delta, inv_freq)
    if mass is not None and kv is None:
        mass = [mass[:, h, :t] for h, t in enumerate(n)]
    return out, mass


def _attend_cached(q, cache: HeadwiseCache, layer: int, b: _Binding, causal: bool, scale):
    """Keys live in a :class:`HeadwiseCache`: one pass per KV head over its own entries, then eviction."""
    lay = cache.layers[layer]
    policy = b.policy
    q_in = q
    Hq, Q = q.shape[1], q.shape[2]
    G = Hq // lay.kv_heads  # query heads per KV head
    pat = policy.pattern(layer, Hq, lay.kv_heads, lay.seen_real, Q)
    scorer = policy.scorer_at(layer)
    observe = policy.observes_at(layer, Q) if scorer is not None else 0
    fresh = all(n == Q for n in lay.lengths()) and lay.all_valid()
    own = getattr(policy, "attend_cached", None)
    if own is not None:  # a policy that computes the step over the cache itself (Steered)
        out, masses = own(layer, q, lay, scale, causal, pat, observe, cache.inv_freq)
        if scorer is not None:
            for h, mass in enumerate(masses):
                lay.record(h, mass, observe > 0, scorer)
    elif fresh and observe < Q:
        # a first prefill without padding: positions are indices, the fast kernels apply; the observed queries'
        # attention mass is one more pass over their logits (no values). When every query observes (H2O), the
        # explicit path below gives the outputs and the mass from one pass over the logits, which measured faster
        # than the kernel plus a second pass (SmolLM2, 2k tokens in chunks of 512: 5.2 s against 5.9 s, dense 4.4)
        full = Causal() if pat is None else Causal() & pat
        k, v = lay.stacked()
        out = _attention(q, k, v, pattern=full if causal else pat, scale=scale)
        if observe:
            for h in range(lay.kv_heads):
                qh = q[:, h * G : (h + 1) * G, Q - observe :]
                mass = observed_mass(qh, lay.k[h], lay.valid[h], scale, Q - observe, causal=causal, pat=pat, group=h)
                lay.record(h, mass, True, scorer)
    elif pat is None and causal and observe < Q:
        # a later chunk with no pattern: in each head's cache the step's keys are the last Q entries, in order,
        # after every cached one, so causality by position is causality by index (q_offset = T_h - Q) and the
        # fast kernels run per KV head with the cache's validity as key padding (all heads in one call when they
        # hold as many entries, all real: the padding mask has no head axis). Keys re-rotated to their slots
        # (StreamingLLM) take their queries re-rotated likewise first; the explicit path had taken these steps,
        # at 6x the kernel's time on SmolLM2's decode step.
        q = _rotated(q, lay.q_delta, cache.inv_freq)
        kv = lay.stacked() if lay.all_valid() else None
        if kv is not None:
            out = _attention(q, *kv, pattern=Causal(), q_offset=kv[0].shape[2] - Q, scale=scale)
        outs = []
        for h in range(lay.kv_heads):
            qh, T, ok = q[:, h * G : (h + 1) * G], lay.k[h].shape[1], lay.valid[h]
            if kv is None:
                k1, v1 = lay.k[h][:, None], lay.v[h][:, None]
                outs.append(_attention(qh, k1, v1, pattern=Causal(), q_offset=T - Q, key_padding_mask=ok, scale=scale))
            if observe:
                mass = observed_mass(qh[:, :, Q - observe :], lay.k[h], ok, scale, T - observe, causal=True)
                lay.record(h, mass, True, scorer)
        if kv is None:
            out = torch.cat(outs, 1)
    elif causal and observe == 0 and Q > _BY_INDEX_QUERIES and (pats := _index_patterns(lay, pat, G)) is not None:
        # a sinks-and-window cache under its own pattern (StreamingLLM, MoA, DuoAttention): the pairs by position
        # are the pairs by index, and the fast kernels run over the buffer as it is. The explicit path had
        # computed every pair of the later prefill chunks (SmolLM2, 2k tokens in chunks of 512: StreamingLLM's
        # prefill 9.5 s, dense 7.0 s); a decode step stays there, where the pattern's two ops beat the kernel's
        # evaluation of it
        q = _rotated(q, lay.q_delta, cache.inv_freq)
        kv = lay.stacked()
        if kv is not None and all(p == pats[0] for p in pats):
            out = _attention(q, *kv, pattern=Causal() & pats[0], q_offset=kv[0].shape[2] - Q, scale=scale)
        else:
            out = torch.cat(
                [
                    _attention(
                        q[:, h * G : (h + 1) * G],
                        lay.k[h][:, None],
                        lay.v[h][:, None],
                        pattern=Causal() & p,
                        q_offset=lay.k[h].shape[1] - Q,
                        scale=scale,
                    )
                    for h, p in enumerate(pats)
                ],
                1,
            )
    else:
        out, masses = _explicit(q, lay, scale, causal, pat, observe, cache.inv_freq)
        if scorer is not None and isinstance(masses, torch.Tensor):
            lay.record_stacked(masses, observe > 0, scorer)
        elif scorer is not None and masses is not None:
            for h, mass in enumerate(masses):
                lay.record(h, mass, observe > 0, scorer)
    direct = getattr(scorer, "score_keys", None)
    if direct is not None:  # a scorer that estimates from the step's queries and the cached keys, not from mass
        if cache.inv_freq is None:
            raise UnsupportedError(bad("model", f"plain rotary embeddings (scorer {scorer.name})", "none found"))
        q_slot = _rotated(q_in, lay.q_delta, cache.inv_freq)  # rotated where the step's keys are: rope[-Q:]
        for h in range(lay.kv_heads):
            q_rope = lay.rope[h][:, -Q:].long()
            qh = q_slot[:, h * G : (h + 1) * G]
            lay.set_score(h, direct(qh, q_rope, lay.k[h], lay.v[h], lay.pos[h], lay.valid[h], cache.inv_freq))
    lay.evict(policy.keep(layer, lay, Q), policy.merge_at(layer))
    return out


#: Steps of at most this many queries over a sinks-and-window cache take the explicit path, not the kernels by
#: index (:func:`_index_patterns`): on SmolLM2's StreamingLLM decode step the kernel path measured 1.44x
#: dense's step against 1.28x (2k tokens, budget 1/4).
_BY_INDEX_QUERIES = 16


def _index_patterns(lay, pat, group: int) -> list | None:
    """Per KV head, the pattern whose pairs by index over that head's entries are ``pat``'s pairs by position
    (the step's keys last), or None when some head has none. With every entry real and held in position order,
    causality by index is causality by position; a sinks-and-window pattern (mask a function of whether a key
    is among the first ``s`` positions and of ``q - k``) needs the head's entries to be the first ``s`` positions
    then one run of consecutive positions up to the step's last (what StreamingLLM's, MoA's and DuoAttention's
    evictions leave): an index is then its position less one shift on the run, and ``q - k`` is the same in
    both. A per-head pattern qualifies when each KV head's query group shares one pattern."""
    if pat is None or not lay.all_valid():
        return None
    if isinstance(pat, PerHead):
        heads = pat.patterns
        if len(heads) != group * lay.kv_heads or any(p != heads[i - i % group] for i, p in enumerate(heads)):
            return None
        pats = list(heads[::group])
    else:
        pats = [pat] * lay.kv_heads
    last = lay.q_pos[:, -1]  # (B,): the step's last position
    for p, pos in zip(pats, lay.pos, strict=True):
        if isinstance(p, Causal):
            continue
        if isinstance(p, AShape):
            s = p.sinks
        elif isinstance(p, SlidingWindow) and p.right == 0:
            s = 0
        else:
            return None
        T = pos.shape[-1]
        ok = pos[:, -1] == last
        if T <= s:
            ok &= pos[:, -1] == T - 1
        else:
            ok &= pos[:, -1] - pos[:, s] == T - 1 - s
            if s:
                ok &= pos[:, s - 1] == s - 1
        if not bool(ok.all()):
            return None
    return pats


def _allowed(ok, qp, kp, causal: bool, pat: Pattern | None, heads):
    """Which (query, key) pairs are visible: valid keys, ``kp <= qp`` under ``causal``, and ``pat`` at ``heads``."""
    if causal:
        ok = ok & (kp <= qp)
    if pat is not None:
        ok = ok & pat.mask_mod(torch.zeros((), dtype=torch.long), heads, qp, kp)
    return ok


def observed_mass(q, k, valid, scale, q_offset: int, *, causal: bool, pat: Pattern | None = None, group: int = 0):
    r"""The attention mass one KV head's keys receive from a block of queries, with no values read:
    ``mass_j = \sum_{g, i} \mathrm{softmax}_j(\mathrm{scale}\, q_{g,i} \cdot k_j)`` over the visible keys, in
    index space: ``q (B, G, Qo, D)`` are at positions ``q_offset ..``, ``k (B, T, D)`` at ``0 .. T - 1``, key ``j``
    visible when ``valid (B, T)``, ``j <= i`` (``causal``) and ``pat`` allows it (``pat`` heads: ``group * G ..``).
    Equal to the ``mass`` of :func:`masked_attention` where positions are indices. Chunked over queries; under
    ``causal`` a chunk reads only the keys before its last query. Returns ``(B, T)`` float32."""
    B, G, Qo, _ = q.shape
    T = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mass = torch.zeros(B, T, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * G * T))
    heads = torch.arange(group * G, (group + 1) * G, device=q.device)[None, :, None, None]
    kf = k.float()
    for s in range(0, Qo, step):
        e = min(Qo, s + step)
        end = min(T, q_offset + e) if causal else T  # the chunk's last query reads keys < q_offset + e
        qi = torch.arange(q_offset + s, q_offset + e, device=q.device)[None, None, :, None]
        kj = torch.arange(end, device=q.device)[None, None, None, :]
        logits = torch.matmul(q[:, :, s:e].float(), kf[:, :end].transpose(1, 2)[:, None]).mul_(scale)
        logits.masked_fill_(~_allowed(valid[:, None, None, :end], qi, kj, causal, pat, heads), float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True)
        p = logits.sub_(lse.clamp_min(torch.finfo(torch.float32).min)).exp_()  # a query with no key adds 0
        mass[:, :end] += p.sum(dim=(1, 2))
    return mass


def masked_attention(q, k, v, qpos, kpos, valid, scale, causal: bool, pat: Pattern | None, heads, observe: int = 0):
    r"""Softmax attention of one KV head's query group over explicit key positions.

    ``q (B, G, Q, D)``, ``k (B, T, D)``, ``v (B, T, Dv)``, ``qpos (B, Q)`` and ``kpos (B, T)`` real-token
    positions, ``valid (B, T)``, ``heads`` the group's query-head indices, ``(G,)`` or one row per batch row
    ``(B, G)`` (KV heads folded into the batch). Key ``j`` is visible to query ``i`` when it is valid,
    ``kpos_j <= qpos_i`` (if ``causal``) and ``pat.mask_mod(0, head, qpos_i, kpos_j)``. A query with no visible
    key gets 0.
    Returns ``(out (B, G, Q, Dv), mass)`` where ``mass (B, T)`` sums the probabilities of the last ``observe``
    queries over the group (None when ``observe == 0``). Chunked over queries: no ``Q x T`` tensor per head
    beyond :data:`_CHUNK_ELEMENTS`.
    """
    B, G, Q, _ = q.shape
    T = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(B, G, Q, v.shape[-1], dtype=q.dtype, device=q.device)
    mass = torch.zeros(B, T, dtype=torch.float32, device=q.device) if observe else None
    kp = kpos[:, None, None, :].long()
    ok = valid[:, None, None, :]
    hh = heads[None, :, None, None] if heads.dim() == 1 else heads[:, :, None, None]  # (G,) or per row (B, G)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * G * T))
    # the group's queries are one (B, G * Q, D) operand of a batched product with the head's keys: a
    # (B, 1, D, T) operand broadcast over G would be copied G times by matmul (on SmolLM2's StreamingLLM decode
    # step that copy was a third of the step)
    kt = k.transpose(1, 2).float()  # converted once, not per chunk
    vf = v.float()
    qs = q.float() * scale  # scaled before the product: Q x D values, not Q x T
    # each chunk's logits are one buffer worked in place and normalised after the product with the values (Q x
    # Dv divisions, not Q x T): on H2O's 512-query prefill chunks over 1,536 keys, a fresh tensor per step made
    # the call 4x slower (113 against 26 ms), as each multi-megabyte allocation is new pages to fault in
    for s in range(0, Q, step):
        e = min(Q, s + step)
        qp = qpos[:, None, s:e, None].long()
        qc = qs[:, :, s:e].reshape(B, G * (e - s), -1)
        p = torch.bmm(qc, kt).view(B, G, e - s, T)
        p.masked_fill_(~_allowed(ok, qp, kp, causal, pat, hh), float("-inf"))
        top = p.amax(-1, keepdim=True)
        top.masked_fill_(top == float("-inf"), 0.0)  # a query with no visible key: exp gives 0, not NaN
        p.sub_(top).exp_()
        den = p.sum(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        out[:, :, s:e] = torch.bmm(p.view(B, G * (e - s), T), vf).view(B, G, e - s, -1).div_(den).to(q.dtype)
        if observe and e > Q - observe:
            lo = max(s, Q - observe) - s
            w = den[:, :, lo:].reciprocal()  # each observed query's row of p, normalised inside one product
            mass += torch.bmm(w.reshape(B, 1, -1), p[:, :, lo:].reshape(B, -1, T)).view(B, T)
    return out, mass

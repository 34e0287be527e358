"""The one cache of what a pattern costs to derive: tile statistics, block layouts, dense and block masks.

Keys are :class:`Key` tuples with named fields, so every user (patterns, the ``sdpa`` and ``flex`` backends,
the tile-size choice) spells the same thing the same way. Decode steps (``q_offset > 0``) change the key on
every token: they get a small cache of their own so they never evict the layouts of whole sequences. An
unhashable pattern is simply not cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

WHOLE_SEQUENCES = 32
DECODE_STEPS = 8


class Key(NamedTuple):
    what: str  # "stats", "layout", "dense", "block", "flex-block-mask", "flex-live", ...
    pattern: object
    q_len: int
    kv_len: int
    q_offset: int = 0
    heads: int | None = None
    extra: tuple = ()  # what else the value depends on (tile sizes, device, training)


_WHOLE: OrderedDict[Key, object] = OrderedDict()
_DECODE: OrderedDict[Key, object] = OrderedDict()
# Threads share the cache: an OrderedDict's move_to_end and eviction are not atomic together. Two threads that
# miss at once both build the value; the second put wins, and both results are equal.
_LOCK = threading.Lock()


def _cache_for(key: Key) -> OrderedDict:
    return _DECODE if key.q_offset > 0 else _WHOLE


def get(key: Key):
    """The cached value, or None."""
    cache = _cache_for(key)
    with _LOCK:
        try:
            val = cache[key]
        except (KeyError, TypeError):
            return None
        cache.move_to_end(key)
        return val


def put(key: Key, val) -> None:
    cache = _cache_for(key)
    limit = WHOLE_SEQUENCES if cache is _WHOLE else DECODE_STEPS
    with _LOCK:
        try:
            cache[key] = val
        except TypeError:
            return
        while len(cache) > limit:
            cache.popitem(last=False)


def clear() -> None:
    """Forget every cached tile statistic, layout and mask."""
    with _LOCK:
        _WHOLE.clear()
        _DECODE.clear()


def entries(what: str) -> list[tuple[Key, object]]:
    """The cached ``(key, value)`` pairs of one kind (``"layout"``, ``"flex-block-mask"``, ...)."""
    with _LOCK:
        return [(k, v) for cache in (_WHOLE, _DECODE) for k, v in cache.items() if k.what == what]

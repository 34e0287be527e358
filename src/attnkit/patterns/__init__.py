"""Static attention patterns (family A): *which* query-key pairs interact.

Every pattern is a frozen dataclass with a FlexAttention-compatible ``mask_mod``, a dense mask for the
oracle, a cached :class:`~attnkit.layout.BlockLayout` for the tiled kernel, ``density()`` and ``flops()``.
Patterns compose with ``&``, ``|`` and :class:`PerHead`. A picture of every registered pattern:
``docs/patterns/README.md`` (drawn by ``attnkit pictures``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import And, Full, Or, Pattern, PerHead, StridedKeys, clear_cache

__all__ = ["And", "Full", "Or", "Pattern", "PerHead", "StridedKeys", "clear_cache"]

# Every pattern module is imported here, which registers its records, and its __all__ is re-exported: adding a
# pattern touches its own module (and its test) only. The modules, in order: causal, composite, dilated,
# global_tokens, halo, maxvit, modality, neighborhood, power, radial, sliding_window, strided_shards.
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "base":
        continue
    _module = _importlib.import_module(f".{_info.name}", __name__)
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _info, _module, _name

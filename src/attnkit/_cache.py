"""Where attnkit keeps what it makes once and reuses: captured model tensors, the native kernel's build."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ATTNKIT_CACHE``, or ``~/.cache/attnkit``."""
    return Path(os.environ.get("ATTNKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnkit"))

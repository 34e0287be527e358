"""What the backend tests share."""

from __future__ import annotations

import pytest

from attnkit.backends import native


@pytest.fixture
def native_forward(monkeypatch):
    """Force the native forward and count its calls (so a test cannot pass on the torch-op forward)."""
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "native")
    ext = native.module()
    calls = []

    class _Counting:
        def forward(self, *args):
            calls.append(("forward", args[12]))  # max_keys: the chunk width it ran with
            return ext.forward(*args)

        def backward(self, *args):
            calls.append(("backward", args[15]))
            return ext.backward(*args)

    monkeypatch.setattr(native, "module", lambda: _Counting())
    return calls

"""Kernels: *how* attention is computed. ``sdpa``, ``flex``, ``tiled`` (and ``reference``, the oracle)."""

BACKENDS = ("sdpa", "flex", "tiled", "reference")

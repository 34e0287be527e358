"""``attnkit bench``: speed, memory and FLOP efficiency of every registered pattern, with dense SDPA, the
machine's matrix-product rate and the peer libraries measured in the same run, reported as ratios."""

from .static import BenchConfig, run_static

__all__ = ["BenchConfig", "run_static"]

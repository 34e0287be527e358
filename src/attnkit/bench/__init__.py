"""``attnkit bench``: speed, memory and FLOP efficiency of every registered pattern, with dense SDPA, the
machine's matrix-product rate and the peer libraries measured in the same run, reported as ratios.

Every suite implements :class:`attnkit.bench.suite.Suite`; :func:`attnkit.bench.suite.run_suites` runs any of
them with one shared context and :func:`attnkit.bench.report.write` writes the results."""

from .static import BenchConfig, run_static

__all__ = ["BenchConfig", "run_static"]

"""One protocol for every benchmark suite, so ``attnkit bench`` is a loop and a new suite plugs in.

A suite is built from its config and knows how many progress steps it takes (:meth:`Suite.cells`), how to run
(:meth:`Suite.run`, returning its section of ``results.json``), which targets it judges, its report section,
its terminal table and its plots. What suites share (the machine, the matrix-product rate per dtype, the dense
SDPA baselines, the dtype) lives in one :class:`Context`, made once per run by :func:`run_suites`.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..backends import native
from .static import BenchConfig, _Baselines, baseline_summary
from .timing import matmul_rate


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tiled_forward": native.kernel_name(),
    }


@dataclass
class Context:
    """What the suites of one run share: measured once, used by every suite that needs it."""

    dtype: str = "float32"
    machine: dict = field(default_factory=machine_info)
    baselines: _Baselines | None = None  # dense SDPA (causal, full) timings per (N, H), shared by static and linear
    matmul: dict = field(default_factory=dict)  # dtype name -> FLOP/s, measured on first use

    def __post_init__(self):
        if self.baselines is None:
            self.baselines = _Baselines(BenchConfig(dtype=self.dtype), getattr(torch, self.dtype))

    def matmul_rate(self, dtype: str | None = None) -> float:
        """FLOP/s of a 2048² matrix product in ``dtype`` (default: the run's), measured once per run."""
        dtype = dtype or self.dtype
        if dtype not in self.matmul:
            self.matmul[dtype] = matmul_rate(dtype=getattr(torch, dtype))
        return self.matmul[dtype]


@runtime_checkable
class Suite(Protocol):
    """A benchmark suite, built from its config: ``SUITES[name](config)``."""

    name: str  # its key in ``results["suites"]`` and ``--suite``
    title: str  # one line, for the report header and the progress bar

    def cells(self) -> int:
        """How many times :meth:`run` calls ``progress`` (for a progress bar)."""

    def run(self, context: Context, progress) -> dict:
        """Measure; the returned dict is this suite's section of ``results.json``."""

    def targets(self, section: dict) -> list[dict]:
        """The targets this suite judges, each ``{"target", "met", "value"}``."""

    def markdown(self, section: dict) -> list[str]:
        """Its section of ``report.md`` (its targets included)."""

    def table(self, section: dict, console) -> None:
        """Print its terminal table on a ``rich`` console."""

    def plots(self, section: dict, folder: Path) -> list[Path]:
        """Write its PNGs into ``folder``; return their paths."""


def _suites() -> dict[str, type]:
    from .distributed import DistributedSuite
    from .dynamic import DynamicSuite
    from .layers import LayersSuite
    from .linear import LinearSuite
    from .models import ModelsSuite
    from .quality import QualitySuite
    from .static import StaticSuite

    suites = (StaticSuite, LinearSuite, DynamicSuite, LayersSuite, DistributedSuite, ModelsSuite, QualitySuite)
    return {s.name: s for s in suites}


SUITES: dict[str, type] = _suites()
# quality trains models for minutes: it runs by ``--suite quality`` only, so the quick default stays short.
BENCH_SUITES = ("static", "linear", "dynamic", "layers")  # what ``attnkit bench --suite all`` runs, in this order


def make(names, configs: dict[str, Any]) -> list:
    """The suites ``names``, each built from ``configs[name]`` (its default config where absent)."""
    return [SUITES[n](configs[n]) if n in configs else SUITES[n]() for n in names]


def run_suites(names, configs: dict[str, Any], progress=None, dtype: str | None = None) -> dict:
    """Run the suites ``names`` in order with one shared :class:`Context`; ``configs`` maps a suite's name to
    its config (``configs["static"]``, if given, also sets the dense baselines' batch, head size and backward).
    Returns ``{"machine", "dtype", "matmul_gflops", "suites": {name: section}, "baselines", "seconds"}``."""
    started = time.time()
    torch.manual_seed(0)
    dtype = dtype or getattr(configs.get("static") or configs.get("linear"), "dtype", "float32")
    base_cfg = configs.get("static") or BenchConfig(dtype=dtype)
    ctx = Context(dtype=dtype, baselines=_Baselines(base_cfg, getattr(torch, dtype)))
    rate = ctx.matmul_rate()
    say = progress or (lambda *_: None)
    sections, seconds = {}, {}
    for suite in make(names, configs):
        t0 = time.time()
        sections[suite.name] = suite.run(ctx, say)
        seconds[suite.name] = time.time() - t0
    return {
        "machine": ctx.machine,
        "dtype": dtype,
        "matmul_gflops": rate / 1e9,
        "matmul_gflops_by_dtype": {k: v / 1e9 for k, v in ctx.matmul.items()},
        "suites": sections,
        "baselines": baseline_summary(ctx.baselines),
        "seconds": time.time() - started,
        "suite_seconds": seconds,
    }

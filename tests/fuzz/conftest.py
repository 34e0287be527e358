"""Profiles of the fuzz suite and its case count.

* ``fuzz-ci`` (default): derandomized (the same draw every run), no deadline, no shrinking (a failure is
  reported as drawn, with a label that spells out the input; ``ATTNKIT_FUZZ_SHRINK=1`` shrinks it), >= 2,000
  cases in under a minute on 2 cores; the compiled-FlexAttention test is skipped;
* ``fuzz-deep`` (``ATTNKIT_FUZZ=deep``): 10x the examples (>= 20,000 cases), random draws, shrinking, flex
  included.

The profiles are applied per test (:func:`tests.fuzz.conftest.fuzz_settings`), not loaded globally, so running
the whole test suite does not change the settings of the other tests (whose ``ci`` profile lives in
``tests/conftest.py``). The examples actually executed are counted and printed at the end of the session.
"""

from __future__ import annotations

import os
import resource

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from tests.fuzz import _check

DEEP = os.environ.get("ATTNKIT_FUZZ", "").strip().lower() == "deep"
PROFILE = "fuzz-deep" if DEEP else "fuzz-ci"
SCALE = 10 if DEEP else 1

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
_NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile(
    "fuzz-ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    **({} if os.environ.get("ATTNKIT_FUZZ_SHRINK") else {"phases": _NO_SHRINK}),
)
settings.register_profile(
    "fuzz-deep", derandomize=False, deadline=None, suppress_health_check=_SLOW_OK, database=None, print_blob=True
)


def fuzz_settings(ci_examples: int, deep_examples: int | None = None):
    """The settings of one fuzz test: its profile with ``ci_examples`` (``deep_examples``, default 10x, deep)."""
    n = (deep_examples if deep_examples is not None else ci_examples * SCALE) if DEEP else ci_examples
    return settings(settings.get_profile(PROFILE), max_examples=n)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny tensors: one intra-op thread is 10-100x faster than two contending ones (on a shared 2-core box a
    70 x 70 softmax takes 20 ms with two threads, 0.2 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Address space of the test process while the fuzz tests run. Extreme sizes must never allocate; where an
#: implementation tries (a span pattern allocates per token, a selector sizes its weights by ``heads``), the cap
#: turns what would be an OOM kill of the whole session into an allocation error, which the rules report.
MEMORY_CAP = int(os.environ.get("ATTNKIT_FUZZ_MEMORY_CAP", str(8 << 30)))


@pytest.fixture(autouse=True, scope="package")
def _memory_cap():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = MEMORY_CAP if hard == resource.RLIM_INFINITY else min(MEMORY_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def pytest_terminal_summary(terminalreporter):
    if not _check.COUNTS:
        return
    tr = terminalreporter
    tr.section(f"attnkit fuzz cases ({PROFILE})")
    for name, n in sorted(_check.COUNTS.items()):
        tr.write_line(f"{n:8d}  {name}")
    tr.write_line(f"{sum(_check.COUNTS.values()):8d}  total cases executed")
    if _check.COLLECTED:
        tr.section("attnkit fuzz failures collected (ATTNKIT_FUZZ_COLLECT)")
        for (test, kind), n in sorted(_check.COLLECTED.items()):
            tr.write_line(f"{n:8d}  {test}: {kind}")

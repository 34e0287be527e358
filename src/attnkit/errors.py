"""Error types. Every error names the argument, what was expected and what came."""

from __future__ import annotations

import os


class AttnkitError(Exception):
    """Base class of every error attnkit raises on purpose."""


class ShapeError(AttnkitError, ValueError):
    """A tensor or size argument has the wrong rank, size or relation to another argument."""


class DTypeError(AttnkitError, TypeError):
    """A tensor has a dtype the operation does not accept, or dtypes disagree."""


class DeviceError(AttnkitError, ValueError):
    """Tensors that must live on one device do not."""


class PatternError(AttnkitError, ValueError):
    """A pattern's parameters are invalid, or do not fit the sequence it is applied to."""


class NonFiniteError(AttnkitError, ValueError):
    """An input holds NaN or inf where the mechanism cannot define a result."""


class UnsupportedError(AttnkitError, NotImplementedError):
    """A named backend cannot run this request. The message says why and which backend can."""


class MemoryBudgetError(AttnkitError, MemoryError):
    """A dense path would allocate more than the memory budget. The message names a sparse backend."""


def bad(arg: str, expected: str, got: object) -> str:
    """The one message format: ``argument: expected ..., got ...``."""
    return f"{arg}: expected {expected}, got {got}"


def check_count(name: str, value, lo: int = 0, *, error: type = ShapeError, unit: str = "") -> int:
    """``value`` if it is an int ``>= lo`` (not a bool), else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise error(bad(name, f"an int >= {lo}" + (f" ({unit})" if unit else ""), repr(value)))
    return value


def memory_budget() -> int:
    """Bytes one call may allocate for an ``N x N`` tensor: ``ATTNKIT_MEMORY_BUDGET`` (default 4 GiB)."""
    return int(os.environ.get("ATTNKIT_MEMORY_BUDGET", str(4 << 30)))


def check_memory(what: str, need: int, way_out: str, *, budget: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` before ``what`` allocates ``need`` bytes over the budget."""
    budget = memory_budget() if budget is None else budget
    if need > budget:
        raise MemoryBudgetError(
            f"{what}: expected at most the memory budget of {budget / 2**20:.1f} MiB (ATTNKIT_MEMORY_BUDGET), "
            f"got {need / 2**20:.1f} MiB to allocate; {way_out}"
        )

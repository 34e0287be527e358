"""Family J: quality tasks generated here (no download), each a registered ``task`` record.

A task's factory is ``factory(n, *, seed)`` and makes a :class:`~attnkit.tasks.base.TokenTask`: its
``batch(size, step)`` returns integer ``inputs`` and next-token ``targets`` of shape ``(size, n)`` (numpy;
``IGNORE`` where nothing is scored). The answers are determined by the inputs, so a model that attends well can
reach 100%. ``attnkit bench --suite quality`` trains a small model per mechanism on each (``attnkit.bench.quality``).
"""

from . import mad, mqar
from .base import IGNORE, TokenTask

__all__ = ["IGNORE", "TokenTask", "mad", "mqar"]

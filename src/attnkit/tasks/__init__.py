"""Family J: quality tasks generated here (no download), each a registered ``task`` record.

A task's factory is ``factory(n, *, seed)`` and makes a :class:`~attnkit.tasks.base.TokenTask`: its
``batch(size, step)`` returns integer ``inputs`` and next-token ``targets`` of shape ``(size, n)`` (numpy;
``IGNORE`` where nothing is scored). The answers are determined by the inputs, so a model that attends well can
reach 100%. An image task (``digits``, ``shapes``, whose records support ``"spatial"``) makes an
:class:`~attnkit.tasks.digits.ImageTask` of images and labels instead. ``attnkit bench --suite quality`` trains
a small model per mechanism on each (``attnkit.bench.quality``).
"""

from . import cab, digits, mad, mqar, shapes
from .base import IGNORE, TokenTask
from .digits import ImageTask

__all__ = ["IGNORE", "ImageTask", "TokenTask", "cab", "digits", "mad", "mqar", "shapes"]

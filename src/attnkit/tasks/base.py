"""What a generated token task is: a seeded, stateless sampler of ``(inputs, targets)`` batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: The target of a position that is not scored (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE = -100

#: Seeds at or above this offset draw the held-out test batches, so training never sees them.
TEST_STREAM = 1 << 20


@dataclass(frozen=True)
class TokenTask:
    """A next-token task over sequences of ``n`` tokens from a vocabulary of ``vocab``.

    ``make(rng, size) -> (inputs, targets)`` draws one batch; :meth:`batch` seeds it from ``(seed, step)`` so a
    batch is a pure function of the task's seed and the step (reproducible, and the same for every mechanism
    compared in one run). ``targets[b, i]`` is the token that must be predicted at position ``i`` (after reading
    ``inputs[b, : i + 1]``), or :data:`IGNORE`.
    """

    name: str
    n: int
    vocab: int
    seed: int
    make: Callable
    settings: dict

    def batch(self, size: int, step: int = 0):
        rng = np.random.default_rng((self.seed, step))
        inputs, targets = self.make(rng, size)
        return inputs.astype(np.int64), targets.astype(np.int64)

    def test_batch(self, size: int, index: int = 0):
        """A held-out batch: drawn from a stream the training steps never use."""
        return self.batch(size, TEST_STREAM + index)

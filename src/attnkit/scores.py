"""Score modifications: *how* a pair's logit is changed before the softmax.

A ``ScoreMod`` maps the scaled logit ``s = scale * q.k`` of a pair to a new logit. It is written once and
serves every backend: :meth:`ScoreMod.score_mod` has FlexAttention's signature
``(score, b, h, q_idx, kv_idx)``; the ``tiled`` kernel and the oracle call it on broadcast index tensors;
:meth:`ScoreMod.grad` gives ``d mod / d s`` for the tiled backward. Additive mods (a bias that does not depend
on ``s``) also run on ``sdpa`` as a float mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import PatternError, ShapeError, bad


class ScoreMod:
    #: True when the mod adds a bias that does not depend on the score (runs on ``sdpa``).
    additive: bool = False
    #: Number of query heads the mod is defined for, or None.
    num_heads: int | None = None

    def score_mod(self, score, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    def grad(self, score, h, q_idx, kv_idx) -> torch.Tensor:
        """``d score_mod / d score`` at the raw score (1 for additive mods)."""
        return torch.ones_like(score)

    def check(self, heads: int) -> None:
        if self.num_heads is not None and heads != self.num_heads:
            raise ShapeError(bad(f"score {self!r}", f"{self.num_heads} query heads", f"{heads}"))


@dataclass(frozen=True)
class Softcap(ScoreMod):
    """Logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2, Grok): keeps logits in ``(-cap, cap)``."""

    cap: float = 50.0

    def __post_init__(self):
        if not isinstance(self.cap, (int, float)) or not self.cap > 0:
            raise PatternError(bad("cap", "a positive number", repr(self.cap)))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return torch.tanh(score / self.cap) * self.cap

    def grad(self, score, h, q_idx, kv_idx):
        t = torch.tanh(score / self.cap)
        return 1 - t * t


@dataclass(frozen=True)
class ALiBi(ScoreMod):
    """Attention with Linear Biases ("Train Short, Test Long", Press et al., 2022).

    ``s - m_h * |i - j|`` with the paper's geometric slopes ``m_h = 2^(-8 (h + 1) / H)`` (for ``H`` a power of
    two; otherwise the paper's interleaving of the next power of two). ``i`` is the absolute query position.
    """

    heads: int
    _slopes: torch.Tensor = field(init=False, repr=False, compare=False, hash=False)

    additive = True

    def __post_init__(self):
        if not isinstance(self.heads, int) or self.heads < 1:
            raise PatternError(bad("heads", "an int >= 1", repr(self.heads)))
        object.__setattr__(self, "num_heads", self.heads)
        object.__setattr__(self, "_slopes", torch.tensor(_alibi_slopes(self.heads), dtype=torch.float32))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        slope = self._slopes.to(device=score.device, dtype=score.dtype)[h]
        return score - slope * (q_idx - kv_idx).abs().to(score.dtype)


def _alibi_slopes(n: int) -> list[float]:
    def pow2(k):
        start = 2 ** (-8 / k)
        return [start ** (i + 1) for i in range(k)]

    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + pow2(2 * p)[0::2][: n - p]

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


class TensorBias(ScoreMod):
    """An additive bias given as a tensor ``bias`` of shape ``(heads, Nq, Nk)``: ``s + bias[h, i, j]``.

    The bias may carry autograd history (a learned bias such as Relation-DETR's pairwise geometry bias,
    :class:`attnkit.layers.vision.RelationGeometryAttention`): on ``sdpa`` it becomes the float mask and its
    gradient flows; the ``tiled`` kernel's hand-written backward gives no gradient to it. ``i`` is the absolute
    query position, so ``Nq`` counts from 0 (``q_offset + Nq`` rows are needed for a decode)."""

    additive = True

    def __init__(self, bias: torch.Tensor):
        if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or not bias.is_floating_point():
            got = type(bias).__name__ if not isinstance(bias, torch.Tensor) else f"{bias.dtype} {tuple(bias.shape)}"
            raise ShapeError(bad("bias", "a floating-point tensor (heads, Nq, Nk)", got))
        self.bias = bias
        self.num_heads = bias.shape[0]

    def __repr__(self):
        return f"TensorBias(heads={self.bias.shape[0]}, Nq={self.bias.shape[1]}, Nk={self.bias.shape[2]})"

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.bias.to(score.dtype)[h, q_idx, kv_idx]


def _alibi_slopes(n: int) -> list[float]:
    def pow2(k):
        start = 2 ** (-8 / k)
        return [start ** (i + 1) for i in range(k)]

    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + pow2(2 * p)[0::2][: n - p]


class Normalizer:
    r"""How a row of logits becomes weights, in place of the softmax.

    ``weights(s, n)`` maps the (masked, modified) logits ``s`` of a row elementwise to non-negative weights
    ``p`` given the row's number of visible keys ``n`` (broadcastable to ``s``); ``l1`` says whether the row is
    then divided by :math:`\sum_j p_{ij}`. Masked pairs (``s = -inf``) get weight 0. The kernels report
    ``lse = log sum_j p_ij`` (for the softmax this is the usual log-sum-exp). A row with no visible key gives 0.
    """

    l1: bool = False
    #: True when ``weights`` needs the per-row count ``n`` (the kernels then count visible keys first).
    needs_count: bool = False

    def bind(self, kv_len: int) -> Normalizer:
        """This normaliser with its length-dependent constants fixed for ``kv_len`` keys."""
        return self

    def weights(self, s: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def grad(self, s: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        """``d weights / d s`` at finite ``s``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Sigmoid(Normalizer):
    r"""Sigmoid attention ("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", Ramapuram et al.,
    2024): :math:`p_{ij} = \sigma(s_{ij} + b)` with no row normalisation.

    The paper sets :math:`b = -\log n` with ``n`` the (training) sequence length, which keeps the initial
    output norm close to softmax attention's: pass ``bias=-math.log(n)``. ``bias=None`` takes ``n`` from each
    call's ``kv_len``, convenient for fixed-length inputs; a causal model should fix ``n``, or its outputs would
    change with the length of the sequence they are part of. The paper's other practices (LayerScale,
    QK-norm) belong to the layer, not to the kernel.
    """

    bias: float | None = None

    def __post_init__(self):
        if self.bias is not None and (not isinstance(self.bias, (int, float)) or not math.isfinite(self.bias)):
            raise PatternError(bad("bias", "a finite float or None (= -log kv_len)", repr(self.bias)))

    def bind(self, kv_len):
        return self if self.bias is not None else Sigmoid(-math.log(kv_len))

    def weights(self, s, n):
        return torch.sigmoid(s + self.bias)

    def grad(self, s, n):
        p = torch.sigmoid(s + self.bias)
        return p * (1 - p)


@dataclass(frozen=True)
class Softplus(Normalizer):
    r"""Length-scaled softplus attention, LSSA ("Softplus Attention with Re-weighting Boosts Length
    Extrapolation in Large Language Models", Gao & Spratling, 2025):

    .. math:: p_{ij} = \mathrm{softplus}(\log(n_i)\, s_{ij}), \qquad w_{ij} = p_{ij} / \textstyle\sum_j p_{ij}

    The softmax's exponential is replaced by softplus and its :math:`\ell_1` normalisation is kept; the dynamic
    scale :math:`\log n_i` (``n_i`` = number of keys query ``i`` sees, so ``i + 1`` under a causal mask)
    comes from the paper's invariance-entropy argument and keeps the weights from flattening as the context
    grows. ``length_scale=False`` gives plain softplus attention. A row with a single visible key gets weight
    1 whatever its scale. The paper's second stage (a sharpening re-weighting at inference) is not part of
    this normaliser. The weights are not shifted by the row's maximum (they need no max to be finite), so in
    float32 a row whose every :math:`\log(n_i) s_{ij}` lies below about -87 (a strong negative bias such as
    ALiBi's on far keys) has weights that underflow to 0: its output is 0, in every float32 computation alike.
    """

    length_scale: bool = True

    @property
    def needs_count(self):
        return self.length_scale

    l1 = True

    def _z(self, s, n):
        return s * torch.log(n.clamp_min(1)).to(s.dtype) if self.length_scale else s

    def weights(self, s, n):
        return torch.nn.functional.softplus(self._z(s, n))

    def grad(self, s, n):
        z = self._z(s, n)
        return torch.sigmoid(z) * (torch.log(n.clamp_min(1)).to(s.dtype) if self.length_scale else 1)

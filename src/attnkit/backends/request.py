"""The validated call every backend receives: :class:`Request`.

:func:`attnkit.attention` checks its arguments once (:func:`attnkit.shapes.validate` and the pattern's own
checks) and hands the backends one object. Each backend module answers ``why_not(request)`` (``None`` when it can
run it, else the reason, which names a backend that can), ``carries_nonfinite(request)`` (whether every NaN or
inf of q, k or v that reaches a row reaches its output: then the non-finite rule is checked on the output, one
sum, instead of on the inputs) and ``run(request) -> (out, lse or None)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns.causal import Causal
from ..shapes import Dims


@dataclass(frozen=True, eq=False)
class Request:
    """One attention call, validated.

    ``pattern`` is a static pattern (``None`` = every key); ``selection`` is what a dynamic selector chose
    (a :class:`~attnkit.sparse.Selection`, made before any backend runs; ``pattern`` is then ``None``) and
    ``causal`` says whether it was chosen under the causal cut (queries are the last ``Nq`` of ``Nk``
    positions). ``score`` modifies logits, ``normalizer`` replaces the softmax (bound to ``kv_len``: ``bound``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dims: Dims
    pattern: object = None
    score: object = None
    normalizer: object = None
    scale: float | None = None
    key_padding_mask: torch.Tensor | None = None
    q_offset: int = 0
    return_lse: bool = False
    selection: object = None
    causal: bool = False
    needs_grad: bool = False

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def scale_or_default(self) -> float:
        return self.dims.head_dim**-0.5 if self.scale is None else self.scale

    @property
    def dense_causal(self) -> bool:
        """Plain causal attention over the whole sequence, which SDPA runs fused with ``is_causal``."""
        return (
            isinstance(self.pattern, Causal)
            and self.q_offset == 0
            and self.dims.q_len == self.dims.kv_len
            and self.key_padding_mask is None
        )

    @property
    def causal_sees_all(self) -> bool:
        """Causal attention whose every query is at or after the last key (one decode step over a cache):
        the mask is all True, so no mask is needed."""
        return isinstance(self.pattern, Causal) and self.q_offset >= self.dims.kv_len - 1 and self.dims.q_len == 1


def needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def softmax_kernel_why_not(req: Request, who: str) -> str | None:
    """Why a kernel with the softmax built in and scores modified only by an additive bias (``sdpa``, ``decode``)
    cannot run ``req``, or None."""
    if req.selection is not None:
        return "a dynamic selection runs on the kernels that read it: 'tiled' (blocks) or 'gather' (token indices)"
    if req.normalizer is not None:
        return f"normalizer {req.normalizer!r} replaces the softmax, which {who} has built in; use 'tiled'"
    if req.score is not None and not req.score.additive:
        return f"score {req.score!r} is not an additive bias; {who} cannot apply it (use 'tiled' or 'flex')"
    return None

r"""HACK (Qin et al., *Head-Aware KV Cache Compression for Visual Autoregressive Modeling*, 2025): classify each
KV head by the shape of its attention and compress each class with its own strategy and budget.

HACK observes two kinds of heads: *structural* heads whose attention runs along the diagonal (each query looks
at its neighbourhood) and *contextual* heads whose attention forms vertical stripes (a few keys attended by every
query). Here, after the prefill, each KV head is classified from the attention of the prompt's last ``window``
queries (summed over its query group and the batch):

.. math::

    \text{local}_h = \frac{\sum_{i \in W} \sum_{j \ge t - w - b} p_{ij}}{\sum_{i \in W} \sum_j p_{ij}},

the share of the window's mass on the last ``window + band`` keys (the band around the diagonal that the
window's queries see). A head with :math:`\text{local}_h \ge` ``threshold`` is *diagonal*, the others
*vertical*. Strategies:

- diagonal heads keep the first ``sinks`` tokens and the most recent ones, ``diagonal_share * budget`` entries
  (the diagonal needs few);
- vertical heads keep the keys the window voted for (SnapKV's max-pooled votes, the window itself kept), and
  share what the diagonal heads gave up, so the layer's total stays ``kv_heads * budget``.

The paper's heads live in VAR image generators, whose cache grows scale by scale; here the same classifier and
asymmetric budgets act on a decoder LLM's prompt (the catalogue entry notes it "can be shown on any decoder").
The paper's exact selection rules are not in its abstract and its code was not found; the band rule, the
threshold and the shares above are our choices, documented here and tested. :attr:`HACK.classes` holds the
last classification per layer (``"diagonal"`` / ``"vertical"`` per KV head) for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ShapeError, bad, check_count
from ..records import register
from .kv import KVCompress, Scorer
from .policy import POLICY_SUPPORTS, keep_top, kv_tokens, recency, resolve_budget


@dataclass(frozen=True)
class WindowVotes(Scorer):
    """The attention mass of the last ``window`` queries of a compressing step, unpooled (each step replaces it)."""

    window: int = 32
    name = "window_votes"

    def observes(self, q_len):
        return min(self.window, q_len)

    def update(self, old, mass, observed):
        return mass if observed else old


def local_share(mass: torch.Tensor, pos: torch.Tensor, real: torch.Tensor, valid: torch.Tensor, reach: int) -> float:
    """Share of ``mass (B, T)`` on the keys within ``reach`` positions of each row's last real token."""
    local = (pos.long() > (real[:, None] - 1 - reach)) & valid
    m = mass.float().clamp_min(0).masked_fill(~valid, 0)
    return float((m * local).sum() / m.sum().clamp_min(1e-30))


@dataclass(frozen=True)
class HACK(KVCompress):
    """Head classes (diagonal / vertical) with a strategy and budget per class: see :mod:`attnkit.hf.hack`.

    Args:
        budget: average entries kept per KV head (``int``, or a ``float`` fraction of the prompt).
        window: prompt queries whose attention classifies the heads and votes (vertical heads); ``scorer``
            defaults to their :class:`WindowVotes`.
        band: keys before the window still counted as "on the diagonal".
        threshold: local share from which a head is diagonal.
        diagonal_share: a diagonal head's budget as a fraction of ``budget``.
        sinks: first tokens a diagonal head keeps.
        kernel: max-pool width of the vertical heads' votes.
    """

    scorer: Scorer | None = None
    budget: int | float = 0.25
    phase: str = "prefill"
    window: int = 32
    band: int = 32
    threshold: float = 0.5
    diagonal_share: float = 0.5
    sinks: int = 4
    kernel: int = 7
    classes: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        check_count("window", self.window, 1)
        if self.scorer is None:
            object.__setattr__(self, "scorer", WindowVotes(self.window))
        check_count("band", self.band, 0)
        check_count("sinks", self.sinks, 0)
        for name in ("threshold", "diagonal_share"):
            x = getattr(self, name)
            if not 0.0 <= x <= 1.0:
                raise ShapeError(bad(name, "a fraction in [0, 1]", x))
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd int >= 1", self.kernel))

    @property
    def name(self):
        return "hack"

    def observes(self, q_len):
        return self.scorer.observes(q_len) if self._active(q_len) else 0

    def classify(self, view, q_len: int) -> list[str]:
        """``"diagonal"`` or ``"vertical"`` for each KV head of a cache layer, after a step of ``q_len`` queries."""
        reach = self.scorer.observes(q_len) + self.band
        return [
            "diagonal"
            if local_share(view.score[h], view.pos[h], view.real, view.valid[h], reach) >= self.threshold
            else "vertical"
            for h in range(view.kv_heads)
        ]

    def keep(self, layer, view, q_len):
        if not self._active(q_len):
            return [None] * view.kv_heads
        n_keep = resolve_budget(self.budget, view.seen_real)
        kinds = self.classify(view, q_len)
        self.classes[layer] = kinds
        H, n_diag = len(kinds), kinds.count("diagonal")
        n_d = max(self.sinks + 1, round(self.diagonal_share * n_keep))
        n_v = n_keep if n_diag in (0, H) else max(1, (H * n_keep - n_diag * n_d) // (H - n_diag))
        if n_diag == H:
            n_d = n_keep
        window = self.scorer.observes(q_len)
        out = []
        for h, kind in enumerate(kinds):
            if kind == "diagonal":
                out.append(keep_top(recency(view, h, self.sinks), view.valid[h], n_d))
                continue
            votes = F.max_pool1d(view.score[h][:, None].float(), self.kernel, stride=1, padding=self.kernel // 2)
            pri = votes[:, 0].masked_fill(view.pos[h].long() > (view.real[:, None] - 1 - window), float("inf"))
            out.append(keep_top(pri, view.valid[h], n_v))
        return out

    def describe(self):
        return f"hack(budget={self.budget}, threshold={self.threshold}, diagonal_share={self.diagonal_share})"


register(
    "hack",
    family="E",
    kind="policy",
    paper="HACK: Head-Aware KV Cache Compression for Visual Autoregressive Modeling (Qin et al., 2025)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: HACK(budget=kv_tokens(n, budget)),
    summary="diagonal heads keep sinks + recent on a small budget; vertical heads keep voted columns on the rest",
    source=HACK,
)

r"""LOOK-M (Wan et al., *LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference*, EMNLP Findings 2024): evict by attention with a prior on *where* the prompt's tokens come from, and
merge every evicted entry into the kept entry it resembles most, so its content is not simply lost.

After the prefill (once: "look once"), each KV head keeps ``budget`` entries: the tokens outside ``span`` first
(the paper's *text prior*: its prompts mix text and image tokens and it keeps the text), then the span's entries
with the largest accumulated attention (H2O's score) and a recent window. Each evicted entry :math:`e` is then
assigned its *pivot*, the kept entry of largest cosine similarity of keys,
:math:`p(e) = \arg\max_{s \in \text{kept}} \cos(k_e, k_s)`, and merged into it, keys and values alike:

- ``"average"``: :math:`k_s \leftarrow (k_s + \sum_{e \to s} k_e) / (1 + n_s)`;
- ``"pivotal"``: each evicted entry is first averaged with its pivot, :math:`m_e = (k_e + k_s)/2`, then
  :math:`k_s \leftarrow (k_s + \sum_{e \to s} m_e) / (1 + n_s)` (the pivot weighs more);
- ``"weighted"``: :math:`k_s \leftarrow (k_s + \sum_{e \to s} w_e k_e) / (1 + \sum_{e \to s} w_e)` with
  :math:`w_e = \max(0, \cos(k_e, k_s))` (our reading of the paper's weighted merge).

The paper acts on image tokens of LLaVA-class models; here the span is a marked passage of text (e.g. the
context of a question). Keys are merged as cached, rotated at their own positions, as the authors' code does
(learned from it, never copied); ``span=None`` gives H2O eviction plus merging. The first ``sinks`` tokens
always stay (the authors keep 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ShapeError, bad, check_count
from ..records import register
from .kv import H2O, KVCompress, Scorer
from .policy import POLICY_SUPPORTS, keep_top, kv_tokens, resolve_budget
from .steer import _span

MERGES = ("average", "pivotal", "weighted")


def merge_evicted(k, v, valid, keep, how: str = "pivotal"):
    """Keys and values of the kept entries ``keep (B, n)`` of one KV head (``k, v (B, T, D)``, ``valid (B, T)``)
    with every evicted valid entry merged into its most similar kept one; see :mod:`attnkit.hf.lookm`."""
    if how not in MERGES:
        raise ShapeError(bad("merge", f"one of {MERGES}", repr(how)))
    B, T, D = k.shape
    kf, vf = k.float(), v.float()
    kept = torch.zeros(B, T, dtype=torch.bool, device=k.device).scatter_(1, keep, True)
    ks = kf.gather(1, keep[..., None].expand(-1, -1, D))
    vs = vf.gather(1, keep[..., None].expand(-1, -1, vf.shape[-1]))
    cos = F.normalize(kf, dim=-1) @ F.normalize(ks, dim=-1).transpose(1, 2)  # (B, T, n)
    cos = cos.masked_fill(~valid.gather(1, keep)[:, None, :], float("-inf"))  # padding receives nothing
    best, target = cos.max(-1)
    moves = valid & ~kept & torch.isfinite(best)
    w = moves.float() if how != "weighted" else best.clamp_min(0).masked_fill(~moves, 0.0)
    src_k, src_v = kf, vf
    if how == "pivotal":
        src_k = (kf + ks.gather(1, target[..., None].expand(-1, -1, D))) / 2
        src_v = (vf + vs.gather(1, target[..., None].expand(-1, -1, vf.shape[-1]))) / 2
    num_k = ks.scatter_add(1, target[..., None].expand(-1, -1, D), src_k * w[..., None])
    num_v = vs.scatter_add(1, target[..., None].expand(-1, -1, vf.shape[-1]), src_v * w[..., None])
    den = torch.ones_like(ks[..., 0]).scatter_add(1, target, w)[..., None]
    return (num_k / den).to(k.dtype), (num_v / den).to(v.dtype)


@dataclass(frozen=True)
class LOOKM(KVCompress):
    """Attention-scored eviction with a span prior and merging of the evicted entries: see :mod:`attnkit.hf.lookm`.

    Args:
        budget: entries kept per KV head (``int``, or a ``float`` fraction of the prompt).
        merge: ``"average"``, ``"pivotal"`` (default) or ``"weighted"``; None evicts without merging.
        span: ``(start, end)`` token indices of the padded prompt that are compressed first (the paper's image
            tokens); the tokens outside it are kept first. None: no prior.
        sinks: first real tokens always kept.
    """

    scorer: Scorer = field(default_factory=H2O)
    budget: int | float = 0.25
    phase: str = "prefill"
    merge: str | None = "pivotal"
    span: tuple | None = None
    sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.merge is not None and self.merge not in MERGES:
            raise ShapeError(bad("merge", f"one of {MERGES} or None", repr(self.merge)))
        if self.span is not None:
            object.__setattr__(self, "span", _span(self.span, "span"))
        check_count("sinks", self.sinks, 0)

    @property
    def name(self):
        return "look_m"

    def keep(self, layer, view, q_len):
        if not self._active(q_len):
            return [None] * view.kv_heads
        n_keep = resolve_budget(self.budget, view.seen_real)
        pad = view.seen - view.real  # (B,) left padding: a span is given in padded indices
        out = []
        for h in range(view.kv_heads):
            pri = view.score[h].clone()
            r = self.scorer.recent(n_keep)
            pos = view.pos[h].long()
            if r:
                pri = pri.masked_fill(pos > (view.real[:, None] - 1 - r), float("inf"))
            pri = pri.masked_fill(pos < self.sinks, float("inf"))
            if self.span is not None:
                idx = pos + pad[:, None]
                outside = (idx < self.span[0]) | (idx >= self.span[1])
                # outside the span ranks above every span entry, keeping its own order by score
                pri = torch.where(outside, pri + 1e30, pri)
            out.append(keep_top(pri, view.valid[h], max(n_keep, 1)))
        return out

    def merge_at(self, layer):
        return None if self.merge is None else self._merge

    def _merge(self, k, v, valid, keep):
        return merge_evicted(k, v, valid, keep, self.merge)

    def describe(self):
        return f"look_m(budget={self.budget}, merge={self.merge}, span={self.span})"


register(
    "look_m",
    family="E",
    kind="policy",
    paper="LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference (Wan et al.)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: LOOKM(budget=kv_tokens(n, budget)),
    summary="H2O eviction after prefill with a span prior; evicted entries merged into their most similar kept one",
    source=LOOKM,
)

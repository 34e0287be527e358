"""KV-cache eviction scored by attention, composable: a scorer x a budget allocator x a phase.

- Scorers say how much each cached entry matters: :class:`H2O` (heavy hitters, accumulated attention) and
  :class:`SnapKV` (attention from an observation window of the last prompt queries, pooled).
- Allocators split a layer's budget between its KV heads: :class:`Uniform` (the same for all) and
  :class:`HeadAware` (heads whose attention spreads wide get more; heads that look at few keys get less).
- :class:`KVCompress` puts them together and says when to compress: after prefill steps, decode steps or both.

Budgets are ``int`` tokens per head or a ``float`` fraction of the tokens seen when compressing (kvpress's
``compression_ratio`` is ``1 - budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from .policy import POLICY_SUPPORTS, Policy, keep_top, kv_tokens, resolve_budget

_PHASES = ("prefill", "decode", "both")


class Scorer:
    """How much each cached entry matters, from the attention mass it received (``(B, T)`` per KV head)."""

    name = "scorer"

    def observes(self, q_len: int) -> int:
        return q_len

    def update(self, old: torch.Tensor, mass: torch.Tensor, observed: bool) -> torch.Tensor:
        return old + mass

    def recent(self, n_keep: int) -> int:
        """How many of the most recent entries are always kept."""
        return 0


@dataclass(frozen=True)
class H2O(Scorer):
    r"""Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): keep the keys with the largest accumulated attention.

    ``score_j = \sum_{steps} \sum_{i, g} p_{ij}`` over every query of every step and the query heads ``g`` of the
    KV head (GQA sums the group). The last ``recent_fraction`` of the budget goes to the most recent tokens,
    the rest to the heaviest hitters; the paper splits 50/50.
    """

    recent_fraction: float = 0.5
    name = "h2o"

    def __post_init__(self):
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ShapeError(bad("recent_fraction", "a fraction in [0, 1]", self.recent_fraction))

    def recent(self, n_keep):
        return int(round(self.recent_fraction * n_keep))


@dataclass(frozen=True)
class SnapKV(Scorer):
    r"""SnapKV (Li et al., 2024): the last ``window`` prompt queries vote for the keys they attend.

    ``score_j = maxpool_k(\sum_{i \in window, g} p_{ij})``: the votes of the observation window (summed over the
    group's query heads), max-pooled over ``kernel`` neighbouring keys so a kept key brings its neighbours.
    The window itself is always kept. Each compressing step replaces the scores with its own votes.
    """

    window: int = 32
    kernel: int = 7
    name = "snapkv"

    def __post_init__(self):
        check_count("window", self.window, 1)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd int >= 1", self.kernel))

    def observes(self, q_len):
        return min(self.window, q_len)

    def update(self, old, mass, observed):
        if not observed:
            return old
        pooled = F.max_pool1d(mass[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        return pooled

    def recent(self, n_keep):
        return min(self.window, n_keep)


@dataclass(frozen=True)
class TOVA(Scorer):
    r"""TOVA (Oren et al., *Transformers are Multi-State RNNs*, 2024): at each compressing step keep the keys
    the **current** query attends most, ``score_j = \sum_g p_{last, j}`` (the step's last query, summed over
    the KV head's query group); older votes are forgotten. kvpress's TOVAPress averages the scores over every
    head of the layer, so all heads keep the same tokens; here each KV head keeps its own (the per-head cache
    frees memory per head) unless ``average_heads``, which keeps kvpress's rule: every KV head ranks the keys by
    the scores averaged over the layer's KV heads. Nothing is kept by recency alone."""

    average_heads: bool = False
    name = "tova"

    def observes(self, q_len):
        return 1

    def update(self, old, mass, observed):
        return mass if observed else old


@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    r"""Expected Attention (Devoto et al., NVIDIA kvpress, 2025): score each cached key by the attention that
        *future* queries are expected to give it, estimated from the statistics of the step's queries.

        With the un-rotated queries of the step (the first ``sinks`` positions left out, their queries are
        outliers) modelled as a Gaussian :math:`q \sim \mathcal N(\mu, \Sigma)`, the rotation averaged over the
        next ``future`` positions :math:`ar R = rac1F \sum_{t=1}^{F} R(p_{last} + t)`, and the key :math:`k_j`
        as cached (rotated at its position), the expected un-normalised attention is the Gaussian moment
        generating function

        .. math::

            \mathbb E[e^{q^	op k_j / \sqrt d}] = \exp\Big(rac{(ar R\mu)^	op k_j}{\sqrt d}
            + rac{k_j^	op ar R \Sigma ar R^	op k_j}{2 d}\Big),

        softmax-normalised over the head's keys, averaged over the KV head's query group, and multiplied by
        :math:`\lVert v_j
    Vert_2` (what the key would contribute). The first ``sinks`` positions always stay.
        Each compressing step replaces the scores with its own estimate.

        Choices (learned from kvpress's ``ExpectedAttentionPress``): the mean rotation over future positions (not the
        rotation of a mean position); the covariance and the value norm on by default; per-KV-head eviction here
        (kvpress prunes per head as well). No attention mass is observed, so prefill runs the fast kernels.
    """

    future: int = 512
    sinks: int = 4
    covariance: bool = True
    value_norm: bool = True
    name = "expected_attention"

    def __post_init__(self):
        check_count("future", self.future, 1)
        check_count("sinks", self.sinks, 0)

    def observes(self, q_len):
        return 0

    def score_keys(self, q, q_rope, k, v, k_pos, valid, inv_freq):
        """Scores ``(B, T)`` of one KV head's cached entries from its query group ``q (B, G, Q, D)`` (rotated at
        ``q_rope (B, Q)``), keys ``k (B, T, D)`` as cached, values ``v``, real positions ``k_pos``, ``valid``."""
        from ._rope import rerotate

        B, G, Q, D = q.shape
        raw = rerotate(q.float(), -q_rope[:, None, :].float(), inv_freq)
        raw = raw[:, :, self.sinks :] if Q > self.sinks else raw  # the sinks' queries are outliers
        mu = raw.mean(2)  # (B, G, D)
        t = q_rope.max(1).values[:, None].float() + torch.arange(1, self.future + 1, device=q.device).float()
        ang = t[..., None] * inv_freq.to(q.device).float()  # (B, F, D/2)
        cos, sin = ang.cos().mean(1), ang.sin().mean(1)  # (B, D/2): the averaged rotation, blockwise
        cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]

        def rot(x):  # x (B, G, ..., D) -> R_bar x, R_bar = mean_t (cos_t I + sin_t P)
            half = x.shape[-1] // 2
            px = torch.cat((-x[..., half:], x[..., :half]), -1)
            shape = (B, 1) + (1,) * (x.dim() - 3) + (D,)
            return x * cos.view(shape) + px * sin.view(shape)

        kf = k.float()
        logits = torch.einsum("bgd,btd->bgt", rot(mu), kf) / D**0.5
        if self.covariance and raw.shape[2] > 1:
            c = raw - mu[:, :, None]
            cov = c.transpose(-1, -2) @ c / raw.shape[2]  # (B, G, D, D)
            rk = _rot_t(kf, cos[:, 0], sin[:, 0])  # k^T (R S R^T) k = (R^T k)^T S (R^T k)
            logits = logits + torch.einsum("btd,bgde,bte->bgt", rk, cov, rk) / (2 * D)
        logits = logits.masked_fill(~valid[:, None], float("-inf"))
        score = torch.softmax(logits, -1).nan_to_num(0.0).mean(1)
        if self.value_norm:
            score = score * v.float().norm(dim=-1)
        return score.masked_fill((k_pos < self.sinks) & valid, float("inf"))


def _rot_t(x, cos, sin):
    """``R^T x`` for the averaged rotation ``R = cos I + sin P`` (``P`` the rotate-half map, ``P^T = -P``)."""
    half = x.shape[-1] // 2
    px = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] - px * sin[:, None]


class Allocator:
    """Splits ``n_keep * kv_heads`` entries of one layer between its KV heads."""

    name = "allocator"

    def split(self, scores: list[torch.Tensor], valid: list[torch.Tensor], n_keep: int) -> list[int]:
        return [n_keep] * len(scores)


@dataclass(frozen=True)
class Uniform(Allocator):
    """Every KV head keeps the same number of entries."""

    name = "uniform"


@dataclass(frozen=True)
class HeadAware(Allocator):
    r"""Head-wise budgets from where each head's attention mass lies (one layer's total stays fixed).

    Each head's scores are normalised to sum to 1 (over batch rows too); the layer keeps the ``H * n_keep``
    entries with the largest normalised scores across all its heads, and head ``h`` gets as many entries as it
    has among them (Ada-KV's joint selection), never fewer than ``floor * n_keep``. A head that looks at a few
    keys (HACK's "structural"/local heads) thus hands budget to heads whose attention is spread ("contextual"
    heads). The budgets differ between heads, so the per-head cache saves real memory.
    """

    floor: float = 0.25
    name = "head_aware"

    def __post_init__(self):
        if not 0.0 <= self.floor <= 1.0:
            raise ShapeError(bad("floor", "a fraction in [0, 1]", self.floor))

    def split(self, scores, valid, n_keep):
        H = len(scores)
        lo = int(self.floor * n_keep)
        norm = []
        for s, ok in zip(scores, valid, strict=True):
            s = s.float().clamp_min(0).masked_fill(~ok, 0).sum(0)  # (T,) summed over rows
            norm.append(s / s.sum().clamp_min(1e-30))
        total = H * n_keep
        flat = torch.cat(norm)
        owner = torch.cat([torch.full((x.numel(),), h) for h, x in enumerate(norm)])
        spare = total - lo * H
        counts = [lo] * H
        if spare > 0:
            # the floor entries are taken first by each head, so rank the rest jointly
            extra = flat.clone()
            start = 0
            for x in norm:
                top = x.topk(min(lo, x.numel())).indices + start
                extra[top] = -1.0
                start += x.numel()
            picked = owner[extra.topk(min(spare, flat.numel())).indices]
            for h in range(H):
                counts[h] += int((picked == h).sum())
        return counts


@dataclass(frozen=True)
class KVCompress(Policy):
    """Attention-scored eviction: ``scorer`` x ``allocator`` x ``phase``, kvpress-style but with real eviction.

    After every compressing step (``phase``: ``"prefill"`` = steps with more than one query, ``"decode"`` =
    single-query steps, ``"both"``) each KV head keeps the ``recent`` last entries its scorer asks for plus the
    best-scored others, ``budget`` per head on average (split by ``allocator``). The prefill itself is dense:
    the scores come from it. Positions are not shifted (``rerotate=False``), as in H2O and SnapKV.
    """

    scorer: Scorer = field(default_factory=H2O)
    budget: int | float = 0.25
    allocator: Allocator = field(default_factory=Uniform)
    phase: str = "both"

    def __post_init__(self):
        if self.phase not in _PHASES:
            raise ShapeError(bad("phase", f"one of {_PHASES}", self.phase))
        resolve_budget(self.budget, 1)

    @property
    def name(self):
        return f"{self.scorer.name}" + ("" if isinstance(self.allocator, Uniform) else f"+{self.allocator.name}")

    @property
    def compresses(self):
        return True

    def _active(self, q_len: int) -> bool:
        return self.phase == "both" or (self.phase == "prefill") == (q_len > 1)

    def observes(self, q_len):
        # H2O accumulates over every step; SnapKV votes only on the steps that compress
        if isinstance(self.scorer, SnapKV) and not self._active(q_len):
            return 0
        return self.scorer.observes(q_len)

    def keep(self, layer, view, q_len):
        if not self._active(q_len):
            return [None] * view.kv_heads
        n_keep = resolve_budget(self.budget, view.seen_real)
        counts = self.allocator.split(view.score, view.valid, n_keep)
        stacked = view.stacked_meta("score")
        if stacked is not None and len(set(counts)) == 1 and not getattr(self.scorer, "average_heads", False):
            pos, valid = view.stacked_meta("pos"), view.stacked_meta("valid")
            return self._keep(stacked, pos, view.real[:, None, None], valid, counts[0])
        scores = view.score
        if getattr(self.scorer, "average_heads", False):
            if len({tuple(x.shape) for x in scores}) > 1 or not all(bool((p == view.pos[0]).all()) for p in view.pos):
                raise UnsupportedError(bad("scorer", "heads holding the same entries (average_heads)", "unequal heads"))
            scores = [torch.stack(scores).mean(0)] * len(scores)
        return [self._keep(scores[h], view.pos[h], view.real[:, None], view.valid[h], n) for h, n in enumerate(counts)]

    def _keep(self, score, pos, real, valid, n):
        """The ``n`` entries to keep of one head (``(B, T)``) or of every head at once (``(B, H, T)``)."""
        r = self.scorer.recent(n)
        pri = score.masked_fill(pos > real - 1 - r, float("inf")) if r else score
        return keep_top(pri, valid, max(n, 1))

    def describe(self):
        return f"{self.name}(budget={self.budget}, phase={self.phase})"


register(
    "h2o",
    family="E",
    kind="policy",
    paper="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (Zhang et al., 2023)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: KVCompress(H2O(), budget=kv_tokens(n, budget), phase="both"),
    summary="keep the keys with the largest accumulated attention plus a recent window",
    source=H2O,
)
register(
    "snapkv",
    family="E",
    kind="policy",
    paper="SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: KVCompress(SnapKV(), budget=kv_tokens(n, budget), phase="prefill"),
    summary="an observation window of the last prompt queries votes (max-pooled) for the keys to keep",
    source=SnapKV,
)
register(
    "head_aware_kv",
    family="E",
    kind="policy",
    paper="HACK: Head-Aware KV Cache Compression for Visual Autoregressive Modeling; Ada-KV",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: KVCompress(
        SnapKV(), budget=kv_tokens(n, budget), allocator=HeadAware(), phase="prefill"
    ),
    summary="per-head budgets from where each head's attention mass lies (joint top-k), real per-head memory",
    source=HeadAware,
)
register(
    "tova",
    family="E",
    kind="policy",
    paper="Transformers are Multi-State RNNs (TOVA, Oren et al., 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: KVCompress(TOVA(), budget=kv_tokens(n, budget), phase="both"),
    summary="keep the keys the current query attends most (per KV head), forget older votes",
    source=TOVA,
)
register(
    "expected_attention",
    family="E",
    kind="policy",
    paper="Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution (2025)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: KVCompress(
        ExpectedAttention(), budget=kv_tokens(n, budget), phase="prefill"
    ),
    summary="keep the keys future queries are expected to attend (Gaussian query statistics, averaged RoPE)",
    source=ExpectedAttention,
)

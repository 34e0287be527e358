r"""Attention statistics of a real model, computed block by block: never an N x N map per head.

Installed through the same ``AttentionInterface`` path as the KV policies (:func:`attnkit.hf.apply`), so it works
on any model that runs on SDPA, with no eager fallback and no ``output_attentions``. Each attention call first
computes its output and log-sum-exp with :func:`attnkit.attention` (the tiled kernel keeps the lse as it goes),
then walks the queries in blocks and rebuilds each block's probabilities from ``q``, ``k`` and the lse:

.. math::

    \log p_{ij} = s q_i \cdot k_j - \mathrm{lse}_i \quad (j \text{ visible to } i), \qquad
    H_i = -\sum_j p_{ij} \log p_{ij}

(one matrix product gives the log-probabilities: the keys carry a column of ones, the scaled queries one of
:math:`-\mathrm{lse}_i`). A block of ``b`` queries holds ``B x Hq x b x Nk`` probabilities (at most
:data:`_BLOCK_ELEMENTS` floats, 16 MB, so the passes over it stay in cache), reduced at once into what
:class:`Statistics` asks for, per (batch row, layer, query head):

- ``entropy``: mean over counted queries of :math:`H_i` (nats);
- ``first_mass``: mean mass on the first ``first`` real tokens (the attention sink);
- ``local_mass``: mean mass on keys at distance ``0 <= i - j < window`` (``|i - j| < window`` without a causal
  mask);
- ``offset_mass[d]``: mean mass on the key exactly ``d`` tokens back (``d = 1``: the previous token);
- ``distance``: mean mass against query-key distance ``i - j`` in log-2 bins ``[0, 1), [1, 2), [2, 4), ...``
  (keys at or before the query; an encoder's later keys are in no bin);
- ``group_mass``: mean mass from each query group onto each key group (``groups`` labels tokens; -1 none);
- ``pooled``: ``R x R`` block-pooled maps (row ``a``: the mean distribution of the queries in the ``a``-th
  ``1/R`` of the real tokens over the ``R`` key bins), for pictures;
- ``columns``: per key, the mean mass it receives (the hidden sinks of ACT);
- ``top_k``: the ``k`` most-attended key positions of every query (and their mass), kept across decode steps;
- ``maps``: the exact rows of the (layer, head) pairs asked for, nothing else.

Distances are index distances, which equal real-token distances under left (or right) padding because the
padding is contiguous; padded keys carry no mass and padded queries are not counted. A decode step (one query
over the cache) adds its query to every statistic. The per-call extra cost is one more ``q k^T`` product and a
few passes over each block; ``attnkit analyze`` reports the capture's time against a plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..api import attention
from ..errors import ShapeError, UnsupportedError, bad
from ..hf.policy import Policy
from ..patterns.causal import Causal

_HIDDEN = 1e30  # minus the log-probability of a hidden pair (finite: exp gives 0, and 0 * 1e30 is 0)
_BLOCK_ELEMENTS = 1 << 22  # 16 MB of probabilities per block: the passes over it stay in cache


@dataclass(frozen=True)
class Statistics:
    """What a :func:`capture` computes (everything cheap is on; the costly parts are asked for).

    Args:
        first: the number of first real tokens whose mass is ``first_mass`` (1: the sink token).
        window: ``local_mass`` counts keys at distance ``< window``.
        offsets: distances ``d`` whose exact mass ``offset_mass[d]`` is kept (1: previous token).
        top_k: keep the ``top_k`` most-attended keys of every query (0: none).
        pooled: side ``R`` of block-pooled maps (0: none).
        groups: ``(B, N)`` int labels of token groups (``-1``: no group) for ``group_mass``; tokens past ``N``
            (generated ones) are in no group.
        columns: keep the mean mass every key receives.
        maps: ``{(layer, head): query indices or None (all)}``: exact probability rows kept.
        layers: the layers observed (None: all).
        queries: ``(B, N)`` bool: which prefill queries count (None: all real ones); later queries count.
    """

    first: int = 1
    window: int = 16
    offsets: tuple = (1,)
    top_k: int = 0
    pooled: int = 0
    groups: torch.Tensor | None = None
    columns: bool = False
    maps: dict = field(default_factory=dict)
    layers: tuple | None = None
    queries: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("first", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ShapeError(bad(name, "an int >= 1", v))
        for name in ("top_k", "pooled"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ShapeError(bad(name, "an int >= 0", v))
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.offsets):
            raise ShapeError(bad("offsets", "a tuple of ints >= 0", self.offsets))
        for name in ("groups", "queries"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2):
                raise ShapeError(bad(name, "a (batch, tokens) tensor", getattr(v, "shape", type(v).__name__)))
        if self.queries is not None and self.queries.dtype != torch.bool:
            raise ShapeError(bad("queries", "a bool tensor", self.queries.dtype))
        if self.groups is not None and (self.groups.dtype.is_floating_point or self.groups.dtype == torch.bool):
            raise ShapeError(bad("groups", "an integer tensor of labels", self.groups.dtype))
        if not isinstance(self.maps, dict):
            raise ShapeError(bad("maps", "a dict {(layer, head): query indices or None}", type(self.maps).__name__))


def distance_edges(n: int) -> list[int]:
    """Left edges of the log-2 distance bins up to ``n``: ``[0, 1, 2, 4, ...]``."""
    edges, e = [0, 1], 2
    while e < n:
        edges.append(e)
        e *= 2
    return edges


class _Layer:
    """One layer's running sums, per (batch row, query head)."""

    def __init__(self, B, H, st: Statistics, n_groups: int, device):
        z = lambda *s: torch.zeros(B, H, *s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = torch.zeros(B, dtype=torch.float64, device=device)
        self.entropy, self.first, self.local = z(), z(), z()
        self.offset = {d: z() for d in st.offsets}
        self.distance = None  # grows with the longest key range seen
        self.group = z(n_groups, n_groups) if n_groups else None
        self.group_count = torch.zeros(B, max(1, n_groups), dtype=torch.float64, device=device)
        self.pooled = z(st.pooled, st.pooled) if st.pooled else None
        self.pooled_count = torch.zeros(B, max(1, st.pooled), dtype=torch.float64, device=device)
        self.columns = None
        self.top_values, self.top_keys = [], []
        self.maps: dict[int, list] = {}


class Capture:
    """What :func:`capture` collected; read it after the forward(s). Tensors are indexed ``[batch, layer, head]``
    over :attr:`layers` (the observed layers, in order)."""

    def __init__(self, st: Statistics):
        self.statistics = st
        self._layers: dict[int, _Layer] = {}
        self._batch = None
        self._n_groups = 0 if st.groups is None else int(st.groups.max().item()) + 1
        self.calls = 0

    # -- what a reader uses ------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def _stack(self, get) -> torch.Tensor:
        if not self._layers:
            raise UnsupportedError(bad("capture", "at least one forward inside the capture", "none"))
        return torch.stack([get(self._layers[i]) for i in self.layers], 1)

    def _mean(self, get) -> torch.Tensor:
        def mean(s):
            x = get(s)
            return x / s.count.clamp_min(1).view(-1, *[1] * (x.dim() - 1))

        return self._stack(mean)

    @property
    def queries(self) -> torch.Tensor:
        """``(B, L)``: how many queries each statistic averages over."""
        return self._stack(lambda s: s.count)

    @property
    def entropy(self) -> torch.Tensor:
        return self._mean(lambda s: s.entropy)

    @property
    def first_mass(self) -> torch.Tensor:
        return self._mean(lambda s: s.first)

    @property
    def local_mass(self) -> torch.Tensor:
        return self._mean(lambda s: s.local)

    def offset_mass(self, d: int) -> torch.Tensor:
        if d not in self.statistics.offsets:
            raise ShapeError(bad("d", f"one of the captured offsets {self.statistics.offsets}", d))
        return self._mean(lambda s: s.offset[d])

    @property
    def distance(self) -> torch.Tensor:
        """``(B, L, H, bins)``; the bins' left edges are :attr:`distance_edges`."""
        width = max(s.distance.shape[-1] for s in self._layers.values())
        return self._mean(lambda s: torch.nn.functional.pad(s.distance, (0, width - s.distance.shape[-1])))

    @property
    def distance_edges(self) -> list[int]:
        width = max(s.distance.shape[-1] for s in self._layers.values())
        return distance_edges(1 << 62)[:width]

    @property
    def group_mass(self) -> torch.Tensor:
        """``(B, L, H, G, G)``: row ``a``, column ``c``: mean mass a query of group ``a`` puts on group ``c``."""
        if self._n_groups == 0:
            raise UnsupportedError(bad("groups", "labels given to Statistics(groups=...)", None))
        return self._stack(lambda s: s.group / s.group_count.clamp_min(1)[:, None, :, None])

    @property
    def pooled(self) -> torch.Tensor:
        """``(B, L, H, R, R)`` block-pooled maps."""
        if not self.statistics.pooled:
            raise UnsupportedError(bad("pooled", "Statistics(pooled=R) with R >= 1", 0))
        return self._stack(lambda s: s.pooled / s.pooled_count.clamp_min(1)[:, None, :, None])

    def columns(self, layer: int) -> torch.Tensor:
        """``(B, H, Nk)``: the mean mass each key (by index) receives in ``layer``."""
        s = self._get(layer, "columns", self.statistics.columns)
        return s.columns / s.count.clamp_min(1)[:, None, None]

    def top_k(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mass, key index)``, each ``(B, H, queries, k)``, every observed query in call order."""
        s = self._get(layer, "top_k", self.statistics.top_k)
        return torch.cat(s.top_values, 2), torch.cat(s.top_keys, 2)

    def map(self, layer: int, head: int) -> torch.Tensor:
        """``(B, queries, Nk)``: the exact probability rows asked for with ``maps={(layer, head): ...}``."""
        s = self._get(layer, "maps", (layer, head) in self.statistics.maps)
        rows = s.maps.get(head)
        if not rows:
            raise UnsupportedError(bad("map", f"a prefill of layer {layer} observed", "none yet"))
        return rows[0]

    def _get(self, layer, what, on) -> _Layer:
        if not on:
            raise UnsupportedError(bad(what, f"asked for in Statistics({what}=...)", "not captured"))
        if layer not in self._layers:
            raise ShapeError(bad("layer", f"one of the observed layers {self.layers}", layer))
        return self._layers[layer]

    # -- what the observer calls --------------------------------------------------------------------------------
    def _state(self, layer, B, H, device) -> _Layer:
        if self._batch is None:
            self._batch = B
        elif self._batch != B:
            raise ShapeError(bad("batch", f"the batch size of the capture's first forward ({self._batch})", B))
        if layer not in self._layers:
            self._layers[layer] = _Layer(B, H, self.statistics, self._n_groups, device)
        return self._layers[layer]

    def observe(self, layer, q, k, lse, kpm, causal, scale) -> None:
        st = self.statistics
        B, Hq, Q, D = q.shape
        Hkv, K = k.shape[1], k.shape[2]
        G = Hq // Hkv
        dev = q.device
        s = self._state(layer, B, Hq, dev)
        valid = torch.ones(B, K, dtype=torch.bool, device=dev) if kpm is None else kpm.to(torch.bool)
        first_idx = valid.float().argmax(1)  # the first real token (left padding shifts it, right padding not)
        n_real = valid.long().sum(1)
        q0 = K - Q
        qvalid = valid[:, q0:]
        counted = qvalid.clone()
        if st.queries is not None and Q > 1:
            counted &= _labels(st.queries, q0, Q, False, B).to(dev)
        edges = distance_edges(K)
        if s.distance is None or s.distance.shape[-1] < len(edges):
            grown = torch.zeros(B, Hq, len(edges), dtype=torch.float64, device=dev)
            if s.distance is not None:
                grown[..., : s.distance.shape[-1]] = s.distance
            s.distance = grown
        if st.columns:
            grown = torch.zeros(B, Hq, K, dtype=torch.float64, device=dev)
            if s.columns is not None:
                grown[..., : s.columns.shape[-1]] = s.columns
            s.columns = grown
        if self._n_groups:
            kgroup = _labels(st.groups, 0, K, -1, B).to(dev)
            onehot = torch.nn.functional.one_hot((kgroup + 1).clamp_min(0), self._n_groups + 1)[..., 1:].float()
            qgroup = kgroup[:, q0:]
        # keys with a column of ones and queries (pre-scaled) with a column of -lse: one matrix product gives
        # s q.k - lse, so the exponent needs no pass of its own
        kn = k.float()  # (B, Hkv, K, D)
        kt = torch.cat([kn, torch.ones_like(kn[..., :1])], -1).transpose(-1, -2).contiguous()  # (B, Hkv, D+1, K)
        bad_cols = (~valid).any(0).nonzero().flatten()
        pad_lo, pad_hi = (int(bad_cols[0]), int(bad_cols[-1]) + 1) if len(bad_cols) else (0, 0)
        step = max(1, _BLOCK_ELEMENTS // max(1, B * Hq * K))
        if causal:  # smaller blocks skip more of the masked upper triangle
            step = min(step, max(64, -(-Q // 8)))
        scale = D**-0.5 if scale is None else scale
        for a in range(0, Q, step):
            b = min(Q, a + step)
            n = b - a
            # keys after the block's last query carry no mass under a causal mask: not computed
            Kb = min(K, q0 + b) if causal else K
            # one query group per KV head: (B, Hkv, G * n, D) against (B, Hkv, D + 1, Kb)
            qb = q[:, :, a:b].float().reshape(B, Hkv, G * n, D) * scale
            ls = lse[:, :, a:b].float()
            live = torch.isfinite(ls)
            # z = log p. Hidden pairs and rows with no key (lse -inf) get a huge finite negative log: p is 0
            # there and p z stays 0 (with -inf it would be NaN)
            neg = torch.where(live, -ls, torch.full_like(ls, -_HIDDEN)).reshape(B, Hkv, G * n, 1)
            z = torch.matmul(torch.cat([qb, neg], -1), kt[..., :Kb]).view(B, Hq, n, Kb)
            qi = q0 + torch.arange(a, b, device=dev)
            # masks touch only the columns they can hide: padding's span and the causal diagonal block
            if pad_hi > min(pad_lo, Kb):
                hi = min(pad_hi, Kb)
                z[..., pad_lo:hi].masked_fill_(~valid[:, None, None, pad_lo:hi], -_HIDDEN)
            if causal and q0 + a < Kb:
                cols = torch.arange(q0 + a, Kb, device=dev)
                z[..., q0 + a : Kb].masked_fill_((cols[None, :] > qi[:, None])[None, None], -_HIDDEN)
            p = z.exp()
            w = (counted[:, a:b] & live.all(1)).to(torch.float64)  # (B, n): which rows count
            wh = w[:, None]
            ent = -torch.linalg.vecdot(p, z)  # H_i = -sum_j p_ij log p_ij, one fused pass
            del z
            s.entropy += (ent.double() * wh).sum(-1)
            s.count += w.sum(-1)
            qi3 = qi[None, None, :]
            for d in st.offsets:
                at = (qi3 - d).expand(B, Hq, n)
                m = p.gather(-1, at.clamp(0, Kb - 1)[..., None])[..., 0] * ((at >= 0) & (at < Kb))
                s.offset[d] += (m.double() * wh).sum(-1)
            if st.columns:
                s.columns[..., :Kb] += torch.matmul(w[:, None, None, :].float(), p)[:, :, 0].double()
            if self._n_groups:
                gm = torch.matmul(p, onehot[:, None, :Kb])  # (B, H, n, Gk)
                sel = torch.nn.functional.one_hot((qgroup[:, a:b] + 1).clamp_min(0), self._n_groups + 1)
                sel = sel[..., 1:].double() * w[..., None]
                s.group += torch.einsum("bhnk,bna->bhak", gm.double(), sel)
                s.group_count += sel.sum(1)
            if st.top_k:
                kk = min(st.top_k, K)
                vals, idx = p.topk(min(kk, Kb), dim=-1)
                short = kk - vals.shape[-1]  # early queries of a causal block see fewer keys than k
                s.top_values.append(torch.nn.functional.pad(vals, (0, short)))
                s.top_keys.append(torch.nn.functional.pad(idx, (0, short), value=-1))
            for (lyr, head), rows in st.maps.items():
                if lyr != layer or Q == 1:
                    continue
                got = s.maps.setdefault(head, [])
                if a == 0:
                    got.append([])
                got[-1].append(torch.nn.functional.pad(p[:, head], (0, K - Kb)))
                if b == Q:
                    full = torch.cat(got[-1], 1)
                    got[-1] = full if rows is None else full[:, torch.as_tensor(rows, dtype=torch.long)]
            cs = p.cumsum_(-1)  # in place: cs[..., j] = mass on keys <= j; p is not used after this

            def upto(x, cs=cs, Kb=Kb, n=n):  # mass on key indices < x; x broadcasts to (B, Hq, n, m)
                x = x.clamp(0, Kb).expand(B, Hq, n, x.shape[-1])
                return cs.gather(-1, (x - 1).clamp_min(0)) * (x > 0)

            def span(lo, hi):
                return (upto(hi[..., None]) - upto(lo[..., None]))[..., 0].clamp_min(0)

            fi = first_idx[:, None, None]
            s.first += (span(fi, fi + st.first).double() * wh).sum(-1)
            ahead = 1 if causal else st.window  # an encoder's window reaches both ways
            s.local += (span(qi3 - st.window + 1, qi3 + ahead).double() * wh).sum(-1)
            his = edges[1:] + [K + 1]
            lo_d = torch.tensor(edges, device=dev)
            hi_d = torch.tensor(his, device=dev)
            # bin e: distances [lo_e, hi_e), i.e. keys (i - hi_e, i - lo_e]
            m = upto(qi3[..., None] - lo_d + 1) - upto(qi3[..., None] - hi_d + 1)  # (B, H, n, bins)
            s.distance[..., : len(edges)] += (m.clamp_min(0).double() * wh[..., None]).sum(2)
            if st.pooled and Q > 1:
                R = st.pooled
                # the bin of a real position r of n_real tokens: floor(r R / n_real)
                e_idx = (
                    first_idx[:, None]
                    + torch.ceil(torch.arange(R + 1, device=dev)[None, :] * n_real[:, None] / R).long()
                )  # (B, R+1) index where each key bin starts
                edge_mass = upto(e_idx[:, None, None, :].expand(B, 1, n, R + 1))  # (B, H, n, R+1)
                pm = (edge_mass[..., 1:] - edge_mass[..., :-1]).clamp_min(0)
                qbin = ((qi[None, :] - first_idx[:, None]) * R // n_real.clamp_min(1)[:, None]).clamp(0, R - 1)
                sel = torch.nn.functional.one_hot(qbin, R).double() * w[..., None]  # (B, n, R)
                s.pooled += torch.einsum("bhnk,bna->bhak", pm.double(), sel)
                s.pooled_count += sel.sum(1)
        self.calls += 1


def _labels(t: torch.Tensor, start: int, n: int, fill, B: int) -> torch.Tensor:
    """Columns ``[start, start + n)`` of a ``(B, N)`` label tensor, ``fill`` past its end."""
    if t.shape[0] != B:
        raise ShapeError(bad("labels", f"batch {B} rows", t.shape[0]))
    out = torch.full((B, n), fill, dtype=t.dtype)
    have = max(0, min(n, t.shape[1] - start))
    if have:
        out[:, :have] = t[:, start : start + have]
    return out


class Observe(Policy):
    """The policy :func:`capture` applies: dense (causal) attention, with the statistics of every call."""

    name = "observe"

    def __init__(self, cap: Capture):
        self.capture = cap

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        wanted = self.capture.statistics.layers
        pat = Causal() if causal else None
        if wanted is not None and layer not in wanted:
            return attention(q, k, v, pattern=pat, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale)
        out, lse = attention(
            q, k, v, pattern=pat, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale, return_lse=True
        )
        with torch.no_grad():
            self.capture.observe(layer, q.detach(), k.detach(), lse, key_padding_mask, causal, scale)
        return out


class capture:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with attnkit.analysis.capture(model, Statistics(...)) as cap: model(...)`` -- then read ``cap``.

    Applies :class:`Observe` through :func:`attnkit.hf.apply` and removes it on exit (the model is restored
    exactly). Works with ``model(...)`` and ``model.generate(...)``, batch > 1, left padding and GQA; every
    forward inside the block adds to the statistics.
    """

    def __init__(self, model, statistics: Statistics | None = None, **options):
        if statistics is not None and options:
            raise ShapeError(bad("options", "either a Statistics or its fields as keywords", "both"))
        self.statistics = statistics if statistics is not None else Statistics(**options)
        self.model = model
        self._handle = None

    def __enter__(self) -> Capture:
        from ..hf import apply

        cap = Capture(self.statistics)
        self._handle = apply(self.model, Observe(cap))
        return cap

    def __exit__(self, *exc):
        self._handle.remove()


def eager_maps(model, input_ids, attention_mask=None) -> list[torch.Tensor]:
    """The model's full attention maps from transformers' eager path (``output_attentions``): ``L`` tensors
    ``(B, H, N, N)``. For tests and small inputs only: this is the N x N-per-head path capture avoids."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return list(out.attentions)


def full_map_bytes(model, n: int, batch: int = 1) -> int:
    """Bytes the float32 full maps of every layer and head would take for ``n`` tokens."""
    cfg = model.config.get_text_config()
    return 4 * batch * cfg.num_hidden_layers * cfg.num_attention_heads * n * n


__all__ = ["Capture", "Observe", "Statistics", "capture", "distance_edges", "eager_maps", "full_map_bytes"]

r"""Video-XL-2-style chunked prefill (Qin et al., *Video-XL-2: Towards Very Long-Video Understanding Through
Task-Aware KV Sparsification*, 2025): dense attention inside a chunk, sparse attention across chunks, and at
the task (the question, the answer's decode) a relevance-gated reload of whole chunks.

The prompt's real tokens are cut into chunks of ``chunk`` positions. A query in chunk :math:`c` attends

- densely (causally) to the keys of its own chunk, and
- to a *sparse KV* of every earlier chunk :math:`c' < c`: the ``keep`` keys of :math:`c'` that the last
  ``window`` queries of :math:`c'` attended most (their attention over their own chunk, summed over the KV head's
  query group), chosen once when :math:`c'` completes.

A *task step* (at most ``task`` queries: the question fed after the context, every decode step) reloads chunks:
chunk :math:`c'` has relevance :math:`r_{c'} = \max_{i, g} q_{g,i}^\top \bar k_{c'} / \sqrt d` per KV head, with
:math:`\bar k_{c'}` its mean key, and the ``reload`` most relevant chunks are attended densely, the others
through their sparse KV; the incomplete last chunk (the question, the generated tokens) stays dense.

Video-XL-2 is a video LLM and its chunks hold frames' visual tokens; here the chunks hold text tokens of
SmolLM2's prompt. Its inference code is not public; the voting rule for the sparse KV, the mean-key relevance and
the task-step threshold are our choices, documented here and tested. Nothing is evicted (the paper offloads the
dense KV of every chunk to host memory and reloads it; on a CPU the whole cache already lives there), so the
saving is attention compute at prefill and reads at decode, not memory. Batch rows are chunked on their own
real tokens, so left padding changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from .policy import POLICY_SUPPORTS, Policy, resolve_budget


@dataclass
class _Chunk:
    sparse: torch.Tensor  # (Hkv, s) real positions of the sparse KV
    mean: torch.Tensor  # (Hkv, D) mean key


@dataclass
class _Row:
    seen: int = 0  # real tokens processed
    chunks: list = field(default_factory=list)  # completed chunks, in order


@dataclass(frozen=True)
class ChunkedPrefill(Policy):
    """Dense within chunks, sparse across, relevance-gated reload at the task: see :mod:`attnkit.hf.chunked`.

    Args:
        chunk: tokens per chunk.
        keep: sparse KV entries per chunk and KV head (``int``, or a ``float`` fraction of ``chunk``).
        window: last queries of a chunk that vote for its sparse KV.
        reload: chunks attended densely at a task step (``int``, or a ``float`` fraction of the chunks).
        task: steps of at most this many queries are task steps.
    """

    chunk: int = 512
    keep: int | float = 0.125
    window: int = 16
    reload: int | float = 2
    task: int = 64
    _rows: dict = field(default_factory=dict, compare=False, repr=False)
    name = "chunked_prefill"

    def __post_init__(self):
        check_count("chunk", self.chunk, 2)
        check_count("window", self.window, 1)
        check_count("task", self.task, 1)
        if resolve_budget(self.keep, self.chunk, "keep") > self.chunk:
            raise ShapeError(bad("keep", f"at most chunk={self.chunk} entries", self.keep))
        if isinstance(self.reload, int) and not isinstance(self.reload, bool):
            check_count("reload", self.reload, 0)
        else:
            resolve_budget(self.reload, 1, "reload")

    def _n_reload(self, n_chunks: int) -> int:
        if isinstance(self.reload, float):
            return min(n_chunks, resolve_budget(self.reload, max(1, n_chunks), "reload"))
        return min(n_chunks, self.reload)

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        if not causal:
            raise UnsupportedError(bad("model", "a causal decoder (chunked prefill)", "a bidirectional encoder"))
        B, Hq, Q, D = q.shape
        K = k.shape[2]
        scale = D**-0.5 if scale is None else scale
        valid = torch.ones(B, K, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
        if K == Q:  # a new prompt
            self._rows[layer] = [_Row() for _ in range(B)]
        rows = self._rows.get(layer)
        if rows is None or len(rows) != B:
            raise UnsupportedError(bad("past_key_values", "a cache filled under this policy from its first step", K))
        out = torch.zeros(B, Hq, Q, v.shape[-1], dtype=q.dtype, device=q.device)
        for b in range(B):
            real = valid[b].nonzero()[:, 0]  # padded index of each real position
            q_real = real[real >= K - Q]
            if q_real.numel() == 0:
                continue
            if real.numel() - q_real.numel() != rows[b].seen:
                raise UnsupportedError(
                    bad("past_key_values", f"{rows[b].seen} real tokens seen by the policy", real.numel())
                )
            o = self._row(q[b, :, q_real - (K - Q)], k[b, :, real], v[b, :, real], rows[b], scale, Q <= self.task)
            out[b, :, q_real - (K - Q)] = o.to(q.dtype)
        return out

    def _row(self, q, k, v, row: _Row, scale: float, task: bool) -> torch.Tensor:
        """One batch row over its real tokens: ``q (Hq, n, D)``, ``k, v (Hkv, T, D)``; the queries are the last n."""
        Hq, n, D = q.shape
        Hkv, T = k.shape[0], k.shape[1]
        G = Hq // Hkv
        C = self.chunk
        outs = []
        a = T - n
        while a < T:
            c = a // C
            e = min(T, (c + 1) * C)
            qs = q[:, a - (T - n) : e - (T - n)].float()
            start = c * C
            cross = row.chunks[:c]
            dense = set()
            if task and cross:
                rel = torch.stack([ch.mean for ch in cross], 1).float()  # (Hkv, c, D)
                score = torch.einsum("hgnd,hcd->hgnc", qs.view(Hkv, G, -1, D), rel).amax((1, 2))
                top = score.topk(self._n_reload(len(cross)), dim=-1).indices
                dense = {(h, int(j)) for h in range(Hkv) for j in top[h]}
            keys = []
            for h in range(Hkv):
                parts = [
                    torch.arange(j * C, (j + 1) * C, device=k.device) if (h, j) in dense else ch.sparse[h]
                    for j, ch in enumerate(cross)
                ]
                keys.append(torch.cat(parts + [torch.arange(start, e, device=k.device)]))
            L = max(x.numel() for x in keys)
            idx = torch.stack([torch.cat([x, x.new_zeros(L - x.numel())]) for x in keys])  # (Hkv, L)
            ok = torch.stack([torch.arange(L, device=k.device) < x.numel() for x in keys])
            ks = k.float().gather(1, idx[..., None].expand(-1, -1, D))
            vs = v.float().gather(1, idx[..., None].expand(-1, -1, v.shape[-1]))
            qpos = torch.arange(a, e, device=k.device)
            allowed = ok[:, None, None, :] & (idx[:, None, None, :] <= qpos[None, None, :, None])
            logits = torch.einsum("hgnd,hld->hgnl", qs.view(Hkv, G, -1, D), ks) * scale
            p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            outs.append(torch.einsum("hgnl,hld->hgnd", p, vs).reshape(Hq, -1, v.shape[-1]))
            if e == (c + 1) * C:
                row.chunks.append(self._summarise(qs, k[:, start:e].float(), G, scale, start))
            a = e
        row.seen = T
        return torch.cat(outs, 1)

    def _summarise(self, qs, kc, G, scale, start) -> _Chunk:
        """The sparse KV and mean key of a completed chunk from the votes of its last ``window`` queries."""
        Hkv, C, D = kc.shape
        w = min(self.window, qs.shape[1], C)
        qw = qs[:, -w:].reshape(Hkv, G, w, D)
        logits = torch.einsum("hgnd,hld->hgnl", qw, kc) * scale
        qpos = torch.arange(C - w, C, device=kc.device)
        logits = logits.masked_fill(torch.arange(C, device=kc.device)[None, :] > qpos[:, None], float("-inf"))
        votes = torch.softmax(logits, -1).sum((1, 2))  # (Hkv, C)
        s = resolve_budget(self.keep, C, "keep")
        sparse = votes.topk(s, dim=-1).indices.sort(-1).values + start
        return _Chunk(sparse=sparse, mean=kc.mean(1))

    def describe(self):
        return f"chunked_prefill(chunk={self.chunk}, keep={self.keep}, reload={self.reload})"


def _for_context(n, *, model=None, budget=0.25):
    chunk = max(16, n // 8)
    return ChunkedPrefill(chunk=chunk, keep=max(1, math.ceil(budget * chunk)), reload=budget, window=min(16, chunk))


register(
    "chunked_prefill",
    family="E",
    kind="policy",
    paper="Video-XL-2: Towards Very Long-Video Understanding Through Task-Aware KV Sparsification (Qin et al., 2025)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=_for_context,
    summary="dense within chunks, each earlier chunk through its voted sparse KV; relevant chunks reloaded at the task",
    source=ChunkedPrefill,
)

"""Float64 reference of PINE (attnkit.hf.pine), query by query and head by head, from the paper's definitions.

``attention(q, k, v, segments, inv_freq, q_offset=0, valid=None)``: ``q (Hq, Q, D)`` rotated at positions
``q_offset + i``, ``k, v (Hkv, K, D)`` rotated at ``j`` (one batch row). Every logit is computed on its own:
un-rotate, rank the segments for that (head, query), place each key, rotate both by the placed positions.
"""

from __future__ import annotations

import math

import torch


def _rotate(x, pos, inv_freq):
    ang = pos * inv_freq.double()
    ang = torch.cat((ang, ang))
    half = x.shape[-1] // 2
    rot = torch.cat((-x[half:], x[:half]))
    return x * ang.cos() + rot * ang.sin()


def _ranked_shift(importance, lens, first=None):
    """Shift of each segment: the total length of the segments ranked above it (``first`` ranks first)."""
    n = len(lens)
    key = [(0 if d == first else 1, -importance[d], d) for d in range(n)]
    order = [d for *_, d in sorted(key)]
    shift, acc = [0] * n, 0
    for d in order:
        shift[d] = acc
        acc += lens[d]
    return shift


def attention(q, k, v, segments, inv_freq, *, q_offset=0, valid=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    Hq, Q, D = q.shape
    G = Hq // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    K = k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    valid = [True] * K if valid is None else [bool(x) for x in valid]
    s0, E = segments[0][0], segments[-1][1]
    lens = [b - a for a, b in segments]
    seg_of = {j: d for d, (a, b) in enumerate(segments) for j in range(a, b)}
    base = {j: E - lens[d] + (j - segments[d][0]) for j, d in seg_of.items()}
    raw_q = torch.stack(
        [torch.stack([_rotate(q[h, i], -(q_offset + i), inv_freq) for i in range(Q)]) for h in range(Hq)]
    )
    raw_k = torch.stack([torch.stack([_rotate(k[h, j], -j, inv_freq) for j in range(K)]) for h in range(Hq)])
    out = torch.zeros(Hq, Q, v.shape[-1], dtype=torch.float64)
    n = len(segments)
    for h in range(Hq):
        seg_shift = []
        for d in range(
            n if any(s0 <= q_offset + i < E for i in range(Q)) else 0
        ):  # ranking seen from segment d's queries
            if n == 2:
                seg_shift.append([0 if e == d else lens[d] for e in range(n)])
                continue
            imp = [0.0] * n
            for i in range(*segments[d]):
                logits = {j: float(raw_q[h, i - q_offset] @ raw_k[h, j]) * scale for j in seg_of if seg_of[j] != d}
                top = max(logits.values())
                z = sum(math.exp(x - top) for x in logits.values())
                for j, x in logits.items():
                    imp[seg_of[j]] += math.exp(x - top) / z / lens[seg_of[j]]
            seg_shift.append(_ranked_shift(imp, lens, first=d))
        for i in range(Q):
            t = q_offset + i
            if t < s0:
                qpos, kpos = t, {j: j for j in range(t + 1)}
            elif t < E:
                d = seg_of[t]
                qpos = base[t]
                kpos = {j: j for j in range(s0)}
                kpos.update({j: base[j] - seg_shift[d][seg_of[j]] for j in seg_of})
                kpos = {j: p for j, p in kpos.items() if p <= qpos}
            else:
                logits = {j: float(raw_q[h, i] @ raw_k[h, j]) * scale for j in seg_of}
                top = max(logits.values())
                z = sum(math.exp(x - top) for x in logits.values())
                imp = [0.0] * n
                for j, x in logits.items():
                    imp[seg_of[j]] += math.exp(x - top) / z / lens[seg_of[j]]
                shift = _ranked_shift(imp, lens)
                qpos = t
                kpos = {j: (base[j] - shift[seg_of[j]] if j in seg_of else j) for j in range(t + 1)}
            keys = [j for j in kpos if valid[j]]
            if not keys:
                continue
            qr = _rotate(raw_q[h, i], qpos, inv_freq)
            s = torch.tensor(
                [float(qr @ _rotate(raw_k[h, j], kpos[j], inv_freq)) * scale for j in keys], dtype=torch.float64
            )
            p = torch.softmax(s, 0)
            out[h, i] = p @ v[h, keys]
    return out

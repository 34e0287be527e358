"""Independent mask builders: each pattern's rule re-written as plain Python loops over (i, j).

They share no code with ``attnkit.patterns`` (no ``mask_mod``, no tensors), so agreement is evidence, not
tautology.
"""

from __future__ import annotations

import math

import torch


def _coords(idx, shape):
    out = []
    for n in reversed(shape):
        out.append(idx % n)
        idx //= n
    return out[::-1]


def _na_1d_window(x, n, k, d, s, causal):
    """Keys (as coordinates) a query at coordinate x sees along one dim, by NATTEN's documented rule."""
    g = x % d
    members = [y for y in range(n) if y % d == g]  # the dilation group, in order
    m = len(members)
    xi = members.index(x)
    if causal:
        leader = min((xi // s) * s + s - 1, m - 1)
        return {members[j] for j in range(m) if j <= xi and leader - j < k}
    leader = min((xi // s) * s + s // 2, m - 1)
    left, right = k // 2, k // 2 - (1 - k % 2)
    start = min(max(leader - left, 0), m - k)
    return {members[j] for j in range(start, start + k)} if left + right + 1 == k else set()


def naive_mask(pattern, nq, nk, q_offset=0, head=0) -> torch.Tensor:
    name = type(pattern).__name__
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for a in range(nq):
        i = a + q_offset
        for j in range(nk):
            m[a, j] = _rule(pattern, name, i, j, head)
    return m


def _rule(p, name, i, j, h):
    if name == "Causal":
        return j <= i
    if name == "Full":
        return True
    if name == "SlidingWindow":
        return i - p.left <= j <= i + p.right
    if name == "Neighborhood":
        qc, kc = _coords(i, p.shape), _coords(j, p.shape)
        return all(
            kc[t] in _na_1d_window(qc[t], p.shape[t], p.kernel_size[t], p.dilation[t], p.stride[t], p.is_causal[t])
            for t in range(len(p.shape))
        )
    if name == "HaloBlocks":
        qc, kc = _coords(i, p.shape), _coords(j, p.shape)
        ok = True
        for t in range(len(p.shape)):
            blk = qc[t] // p.block[t]
            ok &= blk * p.block[t] - p.halo[t] <= kc[t] < (blk + 1) * p.block[t] + p.halo[t]
        return ok
    if name == "BlockAxis":
        qc, kc = _coords(i, p.shape), _coords(j, p.shape)
        return all(qc[t] // p.window[t] == kc[t] // p.window[t] for t in range(len(p.shape)))
    if name == "GridAxis":
        qc, kc = _coords(i, p.shape), _coords(j, p.shape)
        return all(qc[t] % (p.shape[t] // p.grid[t]) == kc[t] % (p.shape[t] // p.grid[t]) for t in range(len(p.shape)))
    if name == "Dilated":
        offsets = {m * p.dilation for m in range(p.window)}
        return (i - j) in offsets or (not p.is_causal and (j - i) in offsets)
    if name == "StridedShards":
        return j <= i and (i - j < p.local or j % p.shards == h % p.shards)
    if name == "Sinks":
        return j < p.n
    if name == "GlobalTokens":
        return j < p.n or i < p.n
    if name == "AShape":
        return j <= i and (j < p.sinks or i - j < p.window)
    if name == "Power":
        d = i - j
        return d >= 0 and (d < p.window or (d > 0 and math.log2(d).is_integer()))
    if name == "Radial":
        ft = p.frame_tokens
        dt, ds = abs(i // ft - j // ft), abs(i % ft - j % ft)
        band = 0 if dt == 0 else int(math.floor(math.log2(dt))) + 1
        width = p.window // (2**band)
        if width > 0:
            return ds <= width
        r0 = p.window.bit_length()
        return ds == 0 and dt % (2 ** max(band - r0, 0)) == 0
    if name in ("BlockCausalSpans", "ModalityMutual"):

        def span(x):
            for s, (a, b) in enumerate(p.spans):
                if a <= x < b:
                    return s
            return None

        if j <= i:
            return True
        if name == "BlockCausalSpans":
            return span(i) is not None and span(i) == span(j)
        return span(i) is not None and span(j) is None
    if name == "Or":
        return any(_rule(x, type(x).__name__, i, j, h) for x in p.parts)
    if name == "And":
        return all(_rule(x, type(x).__name__, i, j, h) for x in p.parts)
    if name == "PerHead":
        x = p.patterns[h]
        return _rule(x, type(x).__name__, i, j, 0)
    rule = _extra_rule(name)
    if rule is not None:
        return rule(p, i, j, h)
    raise KeyError(f"no independent rule for {name}: add one (@naive_rule in the pattern's test) before registering it")


# Rules of newer patterns live in their own test module (tests/patterns/test_<module>.py), registered with
# @naive_rule, so adding a pattern touches its module and its test only.
RULES: dict = {}


def naive_rule(name: str):
    def deco(fn):
        RULES[name] = fn
        return fn

    return deco


def _extra_rule(name):
    if name not in RULES:
        import importlib
        import pathlib

        for f in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
            importlib.import_module(f"tests.patterns.{f.stem}")
    return RULES.get(name)

"""One decode step per static pattern: a query at the end of a cache of ``N`` keys, against SDPA's step.

For every family-A pattern with a decode step (``"decode"`` in its record's supports) and each cache length of
:data:`SIZES`, the one-query step ``attention(q, K, V, pattern=p, q_offset=N - 1)`` as :func:`attnkit.attention`
runs it (``auto``: the ``decode`` backend, no layout built per step) is timed beside dense SDPA's step over the
same cache (``scaled_dot_product_attention`` with one query, no mask, the same dtype), and beside the masked
SDPA step that ``auto`` took before the decode backend existed (a ``1 x N`` boolean mask, every key computed).
Each step is first checked against the tiled kernel. Part of the static suite; the target (issue 21): within
1.5x of SDPA's step for every static pattern at 4k and 32k keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import api, registry
from .timing import measure

SIZES = (4096, 32768)
TARGET_RATIO = 1.5


def _one(rec, N: int, cfg, dtype) -> dict:
    pat = rec.make(N)
    H = pat.num_heads or cfg.heads
    g = torch.Generator().manual_seed(N)
    k, v = (torch.randn(cfg.batch, H, N, cfg.head_dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(cfg.batch, H, 1, cfg.head_dim, generator=g).to(dtype)
    step = lambda: api.attention(q, k, v, pattern=pat, q_offset=N - 1)  # noqa: E731
    mask = pat.dense_mask(1, N, N - 1, H)[None]
    masked = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    ref = api.attention(q, k, v, pattern=pat, q_offset=N - 1, backend="tiled")
    err = (step().float() - ref.float()).abs().max().item()
    timed = (("ms", step), ("sdpa_ms", sdpa), ("masked_sdpa_ms", masked))
    t = {name: measure(fn, min_time=0.15, max_runs=41)["median"] * 1e3 for name, fn in timed}
    return {
        "pattern": rec.name,
        "N": N,
        "heads": H,
        "backend": api.explain(q, k, v, pattern=pat, q_offset=N - 1).backend,
        "keys_read": int(mask.any(1).sum()),
        **t,
        "ratio": t["ms"] / t["sdpa_ms"],
        "max_err_vs_tiled": err,
    }


def run_decode(cfg, dtype, progress=None) -> list:
    """The rows: one per (pattern with a decode step, cache length)."""
    rows = []
    for rec in registry.records("A"):
        if "decode" not in rec.supports or (cfg.patterns is not None and rec.name not in cfg.patterns):
            continue
        for N in SIZES:
            if progress:
                progress(f"decode {rec.name} N={N}")
            rows.append(_one(rec, N, cfg, dtype))
    return rows


def cells(cfg) -> int:
    recs = [r for r in registry.records("A") if "decode" in r.supports]
    return len(SIZES) * len([r for r in recs if cfg.patterns is None or r.name in cfg.patterns])


def targets(rows: list) -> list:
    if not rows:
        return []
    worst = max(rows, key=lambda r: r["ratio"])
    return [
        {
            "target": f"decode step at {'/'.join(str(n // 1024) + 'k' for n in SIZES)} keys within {TARGET_RATIO}x "
            "of SDPA's step, for every static pattern",
            "met": worst["ratio"] <= TARGET_RATIO,
            "value": f"worst {worst['ratio']:.2f}x ({worst['pattern']} at {worst['N']})",
        }
    ]


def markdown(rows: list) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Decode: one query at the end of a cache of N keys",
        "",
        "| pattern | N | backend | keys read | ms | SDPA step ms | ratio | masked SDPA ms | max err vs tiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['pattern']} | {r['N']} | {r['backend']} | {r['keys_read']} | {r['ms']:.3f} | {r['sdpa_ms']:.3f} | "
        f"{r['ratio']:.2f}x | {r['masked_sdpa_ms']:.3f} | {r['max_err_vs_tiled']:.1e} |"
        for r in rows
    ]
    return lines + [""]

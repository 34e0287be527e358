"""The linear-family suite (C): every registered family-C function against dense SDPA and the CPU peers.

For each (mechanism, mode, N) it reports forward and forward+backward time and peak memory, the speed-up over
dense SDPA of the same kind (causal or full) timed in the same run, the fitted log-log slope of time against N,
and the crossover length where chunked linear attention starts to beat causal SDPA. Peers run side by side where
they install on CPU; a peer that computes the same function is timed only after its output agrees with ours.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import linear as L
from .. import registry
from .timing import measure, peak_memory
from .report import _fmt, rich_table, target_lines, time_plots

SIZES = (1024, 4096, 16384, 65536)
_CROSSOVER_SIZES = (256, 512)  # extra short lengths for linear_elu chunk vs causal SDPA only


@dataclass
class LinearConfig:
    sizes: tuple = SIZES
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    mechanisms: tuple | None = None  # registry names; None = all family-C functions
    sdpa_max_n: int = 16384  # dense SDPA (quadratic) is measured up to here
    backward: bool = True
    peers: bool = True
    full: bool = False


def _plan(name: str, cfg: LinearConfig) -> list[tuple[str, int, bool]]:
    """(mode, N, with backward) cells for one mechanism. Quick mode: the headline mechanism over every length
    and form (its targets: the slope to 64k, the crossover, the 16k speed-up), the others at 4k in their fast
    form; --full: everything."""
    sizes = cfg.sizes
    if name == "local_linear":  # the exact O(N^2 D^2) form: a reference-speed mechanism
        return [("-", n, n <= 1024 and cfg.backward) for n in sizes if n <= (4096 if cfg.full else 1024)]
    if name in ("sigmoid_attention", "softplus_attention"):
        return [("tiled", n, n <= 1024 and cfg.backward) for n in sizes if n <= (16384 if cfg.full else 4096)]
    if registry.get(name).make(8).fn is not L.linear_attention:
        keep = sizes if cfg.full else [n for n in sizes if n == 4096]
        return [("-", n, n == 4096 and cfg.backward) for n in keep]
    if name == "linear_elu" or cfg.full:
        cells = [("chunk", n, cfg.backward and n <= 16384) for n in sizes]
        cells += [("recurrent", n, cfg.backward and n <= 1024) for n in sizes if n <= 4096]
        cells += [("parallel", n, cfg.backward and n <= 1024) for n in sizes if n <= 4096]
        return cells
    return [("chunk", n, n == 4096 and cfg.backward) for n in sizes if n == 4096]


def _module_sizes(cfg: LinearConfig) -> list:
    """Where the family-C modules and their peer run: 4k and 16k (quick: 4k)."""
    return [n for n in cfg.sizes if (4096 <= n <= 16384 if cfg.full else n == 4096)]


def _inputs(cfg, N, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    B, H, D = cfg.batch, cfg.heads, cfg.head_dim
    return [torch.randn(B, H, N, D, generator=g).to(dtype) * 0.5 for _ in range(3)]


def _call(m, q, k, v, mode):
    return m(q, k, v) if mode in ("-", "tiled") else m(q, k, v, mode=mode)


def cells(cfg: LinearConfig) -> int:
    """How many progress steps :func:`run_linear` reports (for a progress bar)."""
    recs = [r for r in registry.records("C", kind="function") if cfg.mechanisms is None or r.name in cfg.mechanisms]
    n = sum(len(_plan(r.name, cfg)) for r in recs)
    mods = [r for r in registry.records("C", kind="module") if cfg.mechanisms is None or r.name in cfg.mechanisms]
    n += len(mods) * len(_module_sizes(cfg))
    small = [x for x in cfg.sizes if x <= cfg.sdpa_max_n]
    return n + (2 * len(small) + 2 if cfg.peers else 0)


def run_linear(cfg: LinearConfig, baselines, progress=None) -> dict:
    """Run the suite. ``baselines`` is the static suite's dense-SDPA cache (shared, so SDPA is timed once)."""
    dtype = getattr(torch, cfg.dtype)
    recs = [r for r in registry.records("C", kind="function") if cfg.mechanisms is None or r.name in cfg.mechanisms]
    rows, checks, skipped = [], [], []
    for rec in recs:
        m = rec.make(1024)
        causal = "causal" in rec.supports
        for mode, N, bwd in _plan(rec.name, cfg):
            if progress:
                progress(f"{rec.name} {mode} N={N}")
            q, k, v = _inputs(cfg, N, N, dtype)
            try:
                with torch.no_grad():
                    t = measure(lambda m=m, q=q, k=k, v=v, mode=mode: _call(m, q, k, v, mode), max_runs=5)
                    peak = peak_memory(lambda m=m, q=q, k=k, v=v, mode=mode: _call(m, q, k, v, mode))
            except MemoryError as e:  # the parallel form past its memory budget
                skipped.append({"mechanism": rec.name, "mode": mode, "N": N, "why": str(e)[:160]})
                continue
            dense = baselines.get(N, cfg.heads, causal) if N <= cfg.sdpa_max_n else None
            rows.append(_row(rec.name, mode, N, "fwd", t, peak, dense and dense["fwd"], causal))
            if bwd:
                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

                def fb(m=m, qg=qg, kg=kg, vg=vg, mode=mode):
                    _call(m, qg, kg, vg, mode).sum().backward()

                tb = measure(fb, min_runs=2, max_runs=3)
                rows.append(
                    _row(rec.name, mode, N, "fwdbwd", tb, peak_memory(fb), dense and dense.get("fwdbwd"), causal)
                )
    for rec in registry.records("C", kind="module"):
        if cfg.mechanisms is not None and rec.name not in cfg.mechanisms:
            continue
        rows += _module_rows(rec, cfg, dtype, baselines, progress)
    if cfg.mechanisms is None or "linear_elu" in cfg.mechanisms:
        m = registry.get("linear_elu").make(1024)
        for N in _CROSSOVER_SIZES:
            q, k, v = _inputs(cfg, N, N, dtype)
            with torch.no_grad():
                t = measure(lambda m=m, q=q, k=k, v=v: m(q, k, v, mode="chunk"))
            rows.append(_row("linear_elu", "chunk", N, "fwd", t, None, baselines.get(N, cfg.heads, True)["fwd"], True))
    if cfg.peers:
        rows += _peers(cfg, dtype, checks, progress)
    return {
        "config": asdict(cfg),
        "rows": rows,
        "checks": checks,
        "skipped": skipped,
        "slopes": slopes(rows),
        "crossover": crossover(rows),
        "targets": targets(rows),
    }


def _module_rows(rec, cfg, dtype, baselines, progress) -> list:
    """A family-C module over ``(B, N, H * D)`` (GAAM), timed at 4k and 16k beside full SDPA of that size."""
    rows = []
    dim = cfg.heads * cfg.head_dim
    layer = type(rec.make(64))(dim, cfg.heads).to(dtype)
    for N in _module_sizes(cfg):
        if progress:
            progress(f"{rec.name} N={N}")
        x = torch.randn(cfg.batch, N, dim, generator=torch.Generator().manual_seed(N)).to(dtype)
        dense = baselines.get(N, cfg.heads, False)
        with torch.no_grad():
            t = measure(lambda x=x: layer(x), max_runs=5)
            peak = peak_memory(lambda x=x: layer(x))
        rows.append(_row(rec.name, "module", N, "fwd", t, peak, dense["fwd"], False))
        if cfg.backward and N == 4096:
            xg = x.clone().requires_grad_()
            tb = measure(lambda xg=xg: layer(xg).sum().backward(), min_runs=2, max_runs=3)
            rows.append(_row(rec.name, "module", N, "fwdbwd", tb, None, dense.get("fwdbwd"), False))
    return rows


def _row(name, mode, N, kind, t, peak, dense_t, causal):
    return {
        "mechanism": name,
        "mode": mode,
        "N": N,
        "kind": kind,
        "ms": t["median"] * 1e3,
        "p20_ms": t["p20"] * 1e3,
        "p80_ms": t["p80"] * 1e3,
        "peak_mib": peak / 2**20 if peak else None,
        "dense": "causal" if causal else "full",
        "dense_ms": dense_t["median"] * 1e3 if dense_t else None,
        "speedup": dense_t["median"] / t["median"] if dense_t else None,
    }


# ---- peers ---------------------------------------------------------------------------------------------------


def _fla_naive():
    """flash-linear-attention's naive PyTorch references. The ``fla`` package imports Triton at the top, which
    has no CPU build here, so the reference file (torch + einops only) is loaded by path."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "ops" / "linear_attn" / "naive.py"
    if not path.exists():
        return None
    mod_spec = importlib.util.spec_from_file_location("_fla_linear_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


class _SoftmaxQExpK(L.FeatureMap):
    """linear-attention-transformer's causal maps: softmax over the features for queries, exp for keys."""

    def forward(self, x, is_query):
        return torch.softmax(x, -1) if is_query else torch.exp(x)


def _peers(cfg, dtype, checks, progress) -> list:
    rows = []
    elu = registry.get("linear_elu").make(1024)
    fla = _fla_naive()
    try:
        from linear_attention_transformer.linear_attention_transformer import causal_linear_attn
    except ImportError:
        causal_linear_attn = None
    for N in [n for n in cfg.sizes if n <= cfg.sdpa_max_n]:
        q, k, v = _inputs(cfg, N, N, dtype)
        with torch.no_grad():
            ours = elu(q, k, v, mode="chunk")
            if fla is not None:
                if progress:
                    progress(f"peer fla naive N={N}")

                def fla_chunk(q=q, k=k, v=v):
                    qf, kf = (F.elu(x.transpose(1, 2)) + 1 for x in (q, k))
                    return fla.naive_chunk_linear_attn(qf, kf, v.transpose(1, 2), normalize=True).transpose(1, 2)

                rows += _peer_row("fla-naive-chunk", "chunk", N, fla_chunk, ours, checks)
                if N <= 4096:

                    def fla_rec(q=q, k=k, v=v):
                        qf, kf = (F.elu(x.transpose(1, 2)) + 1 for x in (q, k))
                        o, _ = fla.naive_recurrent_linear_attn(qf, kf, v.transpose(1, 2), normalize=True)
                        return o.transpose(1, 2)

                    rows += _peer_row("fla-naive-recurrent", "recurrent", N, fla_rec, ours, checks)
            if causal_linear_attn is not None and N <= 4096:
                if progress:
                    progress(f"peer linear-attention-transformer N={N}")
                same = L.linear_attention(q, k, v, feature_map=_SoftmaxQExpK(), mode="chunk")
                rows += _peer_row(
                    "linear-attention-transformer",
                    "cumsum",
                    N,
                    lambda q=q, k=k, v=v: causal_linear_attn(q, k, v, bucket_size=1),
                    same,
                    checks,
                    ours_fn=lambda q=q, k=k, v=v: L.linear_attention(q, k, v, feature_map=_SoftmaxQExpK()),
                )
    rows += _agent_peer(cfg, checks, progress)
    return rows


def _peer_row(name, mode, N, fn, want, checks, ours_fn=None):
    got = fn()
    e = (got.float() - want.float()).abs().max().item() / max(want.abs().max().item(), 1e-30)
    checks.append({"peer": name, "N": N, "max_rel_err_vs_attnkit": e})
    if not e < 1e-3:
        return []
    t = measure(fn, max_runs=5, warmup=False)
    row = _row(name, mode, N, "fwd", t, None, None, True)
    row["peer"] = True
    if ours_fn is not None:  # the same function through attnkit (a different feature map from linear_elu)
        mine = measure(ours_fn, max_runs=5)
        row["attnkit_same_fn_ms"] = mine["median"] * 1e3
    return [row]


def _agent_peer(cfg, checks, progress) -> list:
    """lucidrains' AgentSelfAttention beside our AgentAttention layer, same width, heads and agent count.
    Not the same function (learned agent tokens, no depthwise convolution), so timed side by side only."""
    try:
        from agent_attention_pytorch import AgentSelfAttention
    except ImportError:
        return []
    rows = []
    dim, H = cfg.heads * cfg.head_dim, cfg.heads
    theirs = AgentSelfAttention(dim, num_agent_tokens=64, dim_head=cfg.head_dim, heads=H, talking_heads=False)
    ours = L.AgentAttention(dim, H, 64, kernel_size=0)
    for N in _module_sizes(cfg):
        if progress:
            progress(f"peer agent-attention-pytorch N={N}")
        x = torch.randn(cfg.batch, N, dim)
        with torch.no_grad():
            for name, layer in (("agent-attention-pytorch (layer)", theirs), ("attnkit AgentAttention (layer)", ours)):
                t = measure(lambda layer=layer, x=x: layer(x), max_runs=5)
                row = _row(name, "layer", N, "fwd", t, None, None, False)
                row["peer"] = name.startswith("agent-attention-pytorch")
                rows.append(row)
    checks.append(
        {
            "peer": "agent-attention-pytorch",
            "N": None,
            "max_rel_err_vs_attnkit": None,
            "note": "different function (learned agents): timed side by side, not compared",
        }
    )
    return rows


# ---- summaries -----------------------------------------------------------------------------------------------


def slopes(rows: list) -> dict:
    """Least-squares slope of log(time) against log(N) over N >= 4k, per (mechanism, mode, kind)."""
    series: dict = {}
    for r in rows:
        if r["N"] >= 4096:
            series.setdefault(f"{r['mechanism']} {r['mode']} {r['kind']}", []).append((r["N"], r["ms"]))
    out = {}
    for key, pts in series.items():
        if len(pts) < 2:
            continue
        xs, ys = [math.log(p[0]) for p in pts], [math.log(p[1]) for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out[key] = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return out


def crossover(rows: list) -> dict:
    """Where chunked elu+1 linear attention starts to beat causal SDPA (forward), interpolated log-log."""
    pts = sorted(
        (r["N"], r["speedup"])
        for r in rows
        if r["mechanism"] == "linear_elu" and r["mode"] == "chunk" and r["kind"] == "fwd" and r["speedup"]
    )
    if not pts:
        return {"value": None, "text": "not measured"}
    if pts[0][1] >= 1:
        return {
            "value": pts[0][0],
            "text": f"already faster at the shortest length measured (N={pts[0][0]}, {pts[0][1]:.2f}x)",
        }
    for (n0, s0), (n1, s1) in zip(pts, pts[1:], strict=False):
        if s0 < 1 <= s1:
            f = math.log(1 / s0) / math.log(s1 / s0)
            n = math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
            return {"value": n, "text": f"~{n:.0f} tokens (between {n0}: {s0:.2f}x and {n1}: {s1:.2f}x)"}
    return {
        "value": None,
        "text": f"slower than causal SDPA at every measured length (best {max(p[1] for p in pts):.2f}x)",
    }


def targets(rows: list) -> list:
    def find(mech, mode, N, kind="fwd"):
        return next(
            (r for r in rows if r["mechanism"] == mech and r["mode"] == mode and r["N"] == N and r["kind"] == kind),
            None,
        )

    res = []
    sl = slopes([r for r in rows if r["mechanism"] == "linear_elu" and r["mode"] == "chunk"])
    if "linear_elu chunk fwd" in sl:
        ns = sorted(
            r["N"]
            for r in rows
            if r["mechanism"] == "linear_elu" and r["mode"] == "chunk" and r["kind"] == "fwd" and r["N"] >= 4096
        )
        res.append(
            {
                "target": "chunked elu+1 linear attention (H=8, D=64): time slope <= 1.1 from 4k to 64k",
                "value": f"{sl['linear_elu chunk fwd']:.2f} over N = {ns}",
                "met": sl["linear_elu chunk fwd"] <= 1.1 and max(ns) >= 65536,
            }
        )
    r16 = find("linear_elu", "chunk", 16384)
    if r16 and r16["speedup"]:
        res.append(
            {
                "target": "chunked elu+1 linear attention >= 10x faster than causal SDPA at 16k (forward)",
                "value": f"{r16['speedup']:.1f}x ({r16['ms']:.1f} ms vs {r16['dense_ms']:.0f} ms)",
                "met": r16["speedup"] >= 10,
            }
        )
    peer_rows = [
        r
        for r in rows
        if r.get("peer")
        and r["mechanism"] in ("fla-naive-chunk", "fla-naive-recurrent", "linear-attention-transformer")
    ]
    if peer_rows:
        worst, lines = float("inf"), []
        for p in peer_rows:
            ours = p.get("attnkit_same_fn_ms") or (find("linear_elu", "chunk", p["N"]) or {}).get("ms")
            if ours:
                worst = min(worst, p["ms"] / ours)
                lines.append(f"{p['mechanism']} @{p['N']}: {p['ms'] / ours:.1f}x")
        res.append(
            {
                "target": "chunked linear attention at least as fast as every CPU peer (same shapes, same run)",
                "value": "; ".join(lines),
                "met": worst >= 1.0,
            }
        )
    cx = crossover(rows)
    res.append(
        {"target": "report the crossover length with causal SDPA", "value": cx["text"], "met": cx["value"] is not None}
    )
    return res


# ---- the suite: report section, terminal table, plot ----------------------------------------------------------

LINEAR_HEADER = ["mechanism", "mode", "N", "kind", "ms median [p20, p80]", "dense", "dense ms", "speed-up", "peak MiB"]


def linear_rows(lin: dict) -> list[list[str]]:
    return [
        [
            r["mechanism"] + (" (peer)" if r.get("peer") else ""),
            r["mode"],
            str(r["N"]),
            r["kind"],
            f"{r['ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]",
            r["dense"],
            _fmt(r.get("dense_ms"), ".1f"),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _fmt(r.get("peak_mib"), ".0f"),
        ]
        for r in lin["rows"]
    ]


def markdown(lin: dict) -> list[str]:
    """The linear suite's section of ``report.md``."""
    cfg = lin["config"]
    lines = [
        "# Linear family (C)",
        "",
        f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}; inputs N(0, 0.25). Speed-up is "
        "against dense SDPA of the same kind (causal or full) timed in this run; SDPA is measured up to "
        f"N={cfg['sdpa_max_n']} (quadratic beyond). Peers that compute the same function were checked against "
        "attnkit first.",
        "",
    ]
    lines += target_lines(lin["targets"])
    lines += ["## Fitted log-log slopes of time against N (N >= 4k)", "", "| series | slope |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(lin["slopes"].items())]
    lines += ["", "## All measurements", "", "| " + " | ".join(LINEAR_HEADER) + " |", "|" + "---|" * len(LINEAR_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in linear_rows(lin)]
    same = [r for r in lin["rows"] if r.get("attnkit_same_fn_ms")]
    if same:
        lines += ["", "Peers with another feature map, against attnkit running that same function:", ""]
        lines += [
            f"- {r['mechanism']} N={r['N']}: {r['ms']:.1f} ms vs attnkit {r['attnkit_same_fn_ms']:.1f} ms" for r in same
        ]
    lines += ["", "## Peer correctness gate (max relative |Δ| against attnkit)", ""]
    for c in lin["checks"]:
        e = c.get("max_rel_err_vs_attnkit")
        lines.append(f"- {c['peer']} N={c['N']}: " + (f"{e:.1e}" if e is not None else c.get("note", "-")))
    if lin.get("skipped"):
        lines += ["", "## Skipped", ""] + [
            f"- {s['mechanism']} {s['mode']} N={s['N']}: {s['why']}" for s in lin["skipped"]
        ]
    lines += ["", "Plot: `plots/linear_family.png` (time against N, log-log).", ""]
    return lines


class LinearSuite:
    """Family-C mechanisms against dense SDPA (the static suite's baselines, shared) and the CPU peers."""

    name = "linear"
    title = "linear family (C)"

    def __init__(self, config: LinearConfig | None = None):
        self.config = config or LinearConfig()

    def cells(self) -> int:
        return cells(self.config)

    def run(self, context, progress) -> dict:
        return run_linear(self.config, context.baselines, progress=progress)

    def targets(self, section: dict) -> list[dict]:
        return section["targets"]

    def markdown(self, section: dict) -> list[str]:
        return markdown(section)

    def table(self, section: dict, console) -> None:
        rich_table(
            "attnkit bench: linear family (C)",
            LINEAR_HEADER,
            linear_rows(section),
            ("mechanism", "mode", "kind", "dense"),
            console,
        )

    def plots(self, section: dict, folder) -> list:
        # one plot for the linear family: each mechanism's forms, plus its dense baseline (forward)
        rows = [
            {**r, "backend": f"{r['mechanism']} {r['mode']}", "dense_ms": r["dense_ms"] if r["kind"] == "fwd" else None}
            for r in section["rows"]
        ]
        return time_plots({"linear_family": rows}, folder) if rows else []

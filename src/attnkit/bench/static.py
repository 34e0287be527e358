"""The static-pattern suite: every registered family-A pattern at several lengths, every backend, the dense
SDPA baseline and the peers, in one run.

For each (pattern, N) it reports forward and forward+backward time, peak memory, the pattern's density,
the ideal speed-up over the matching dense SDPA (causal or full: ``dense pairs / pattern pairs``), the achieved
speed-up, their ratio, and useful FLOP/s as a fraction of the matrix-product rate measured in the same run.
Every timed output is first checked against attnkit's tiled result (itself tested against the oracle).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import api, registry
from ..backends.tiled import pattern_layout
from ..shapes import Dims, all_finite, check_finite
from . import decode as _decode
from . import peers as _peers
from .report import _fmt, rich_table, target_lines, time_plots
from .timing import matmul_rate, measure, peak_memory

QUICK_SIZES = (1024, 4096, 16384)
FULL_SIZES = (1024, 4096, 16384, 32768)
#: The quick run's lengths per pattern: the target cells (the 256-key window at 4k and 16k: its speed-up, its
#: memory slope; the 2-D neighbourhood at 64 x 64 beside NATTEN) and every other pattern at 1k, a cell each.
#: ``--full`` or an explicit ``--sizes`` runs every length.
QUICK_PLAN = {"sliding_window": (4096, 16384), "neighborhood_2d": (4096,)}
QUICK_OTHER = (1024,)


@dataclass
class BenchConfig:
    sizes: tuple = QUICK_SIZES
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    patterns: tuple | None = None  # registry names; None = all of family A
    masked_sdpa_max: int = 4096  # dense SDPA with a boolean mask: only up to this N
    flex: str = "targets"  # "none" | "targets" (the target configurations) | "all"
    near_dense_max_n: int = 4096  # quick mode: patterns denser than 5% run only up to this N
    # NATTEN's CPU path (eager Flex) builds the N x N scores: seconds per call at 4k, out of memory at 16k.
    # The target cell (neighborhood_2d at 64x64) always runs it.
    natten_max_n: int = 1024
    peers: bool = True
    backward: bool = True
    decode: bool = True  # one decode step per pattern at 4k and 32k keys (bench.decode)
    full: bool = False
    notes: list = field(default_factory=list)


_TARGET_FLEX = {("sliding_window", 16384), ("neighborhood_2d", 4096)}
_TARGET_RAW_FLEX = {("sliding_window", 16384)}


def sizes_for(name: str, cfg: BenchConfig) -> tuple:
    """The lengths ``name`` runs at: :data:`QUICK_PLAN` in the quick default, else ``cfg.sizes``."""
    if cfg.full or tuple(cfg.sizes) != QUICK_SIZES:
        return tuple(cfg.sizes)
    return QUICK_PLAN.get(name, QUICK_OTHER)


def _pairs_dense(N: int, causal: bool) -> int:
    return N * (N + 1) // 2 if causal else N * N


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


class _Baselines:
    """Dense SDPA (causal or full) timings per (N, H), measured once and shared by every pattern."""

    def __init__(self, cfg: BenchConfig, dtype):
        self.cfg, self.dtype, self.cache = cfg, dtype, {}

    def get(self, N: int, H: int, causal: bool) -> dict:
        key = (N, H, causal)
        if key not in self.cache:
            B, D = self.cfg.batch, self.cfg.head_dim
            q, k, v = (torch.randn(B, H, N, D, dtype=self.dtype) for _ in range(3))
            with torch.no_grad():
                fwd = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            res = {"fwd": fwd}
            if self.cfg.backward:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

                def fb():
                    F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).sum().backward()

                res["fwdbwd"] = measure(fb, min_runs=2, max_runs=3)
                # one more fwd + bwd (5.5 s at 16k) for a number no target reads: the quick run measures it to 4k
                res["peak"] = peak_memory(fb) if self.cfg.full or N <= 4096 else None
            self.cache[key] = res
        return self.cache[key]


def _row(rec, pat, N, H, cfg, backend, kind, t, dense_t, *, pairs, rate, **extra):
    ideal = _pairs_dense(N, pat.causal) / max(pairs, 1)
    achieved = dense_t["median"] / t["median"] if dense_t else None
    useful = 4.0 * cfg.head_dim * pairs * cfg.batch * H * (3.5 if kind == "fwdbwd" else 1.0) / t["median"]
    return {
        "pattern": rec.name,
        "repr": repr(pat),
        "N": N,
        "heads": H,
        "backend": backend,
        "kind": kind,
        "ms": t["median"] * 1e3,
        "p20_ms": t["p20"] * 1e3,
        "p80_ms": t["p80"] * 1e3,
        "runs": t["runs"],
        "dense_ms": dense_t["median"] * 1e3 if dense_t else None,
        "density": pairs / (N * N),
        "ideal_speedup": ideal,
        "speedup": achieved,
        "of_ideal": achieved / ideal if achieved else None,
        "useful_gflops": useful / 1e9,
        "of_matmul": useful / rate,
        **extra,
    }


def baseline_summary(base: _Baselines) -> dict:
    return {
        f"N={k[0]} H={k[1]} {'causal' if k[2] else 'full'}": {
            "fwd_ms": v["fwd"]["median"] * 1e3,
            "fwdbwd_ms": v["fwdbwd"]["median"] * 1e3 if "fwdbwd" in v else None,
            "peak_mib": v["peak"] / 2**20 if v.get("peak") else None,
        }
        for k, v in base.cache.items()
    }


def run_static(cfg: BenchConfig, progress=None, baselines: _Baselines | None = None, rate: float | None = None) -> dict:
    """Run the suite; ``progress(advance_text)`` is called once per measured item. ``baselines`` lets a later
    suite (the linear one) reuse the dense SDPA timings; ``rate`` is the matrix-product FLOP/s (measured here
    when not given). Returns the suite's section of ``results.json``."""
    torch.manual_seed(0)
    dtype = getattr(torch, cfg.dtype)
    started = time.time()
    rate = rate or matmul_rate(dtype=dtype)
    recs = [r for r in registry.records("A") if cfg.patterns is None or r.name in cfg.patterns]
    base = baselines if baselines is not None else _Baselines(cfg, dtype)
    rows, checks, skipped = [], [], []
    for rec in recs:
        for n in sizes_for(rec.name, cfg):
            pat = rec.make(n)
            N = pat.fixed_length or n
            H = pat.num_heads or cfg.heads
            if progress:
                progress(f"{rec.name} N={N}")
            density = pat.density(N, N, 0, H)
            if not cfg.full and N > cfg.near_dense_max_n and density > 0.05:
                skipped.append(
                    {
                        "pattern": rec.name,
                        "N": N,
                        "density": density,
                        "why": f"near-dense pattern; quick mode runs it up to N={cfg.near_dense_max_n} (use --full)",
                    }
                )
                continue
            t_cell = time.perf_counter()
            cell = _bench_one(rec, pat, N, H, cfg, dtype, rate, base, checks)
            for r in cell:
                r["cell_seconds"] = time.perf_counter() - t_cell
            rows += cell
    decode = _decode.run_decode(cfg, dtype, progress) if cfg.decode else []
    return {
        "config": asdict(cfg),
        "matmul_gflops": rate / 1e9,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "checks": checks,
        "skipped": skipped,
        "decode": decode,
        "targets": targets(rows) + _decode.targets(decode),
        "seconds": time.time() - started,
    }


def _bench_one(rec, pat, N, H, cfg, dtype, rate, base, checks) -> list:
    B, D = cfg.batch, cfg.head_dim
    g = torch.Generator().manual_seed(N + H)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    dense = base.get(N, H, pat.causal)
    out = []
    # -- tiled: cold first call (builds the layout), then steady state ---------------------------------
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = api.attention(q, k, v, pattern=pat, backend="tiled")
    first = time.perf_counter() - t0
    pairs = pat.density(N, N, 0, H) * N * N  # interacting pairs per head (mean over heads)
    dims = Dims(B, H, H, N, N, D, D, 0)
    row = functools.partial(_row, rec, pat, N, H, cfg, pairs=pairs, rate=rate)
    with torch.no_grad():
        t = measure(lambda: api.attention(q, k, v, pattern=pat, backend="tiled"))
    lookup = measure(lambda: pattern_layout(pat, dims, training=False), min_time=0.05, min_runs=5)
    # The non-finite rule inside every call above: on the native kernel, one sum over the output (the kernel
    # carries a NaN that reaches a row into it); on the inputs where a kernel does not (check_finite).
    finite = measure(lambda: all_finite(ref), min_time=0.05, min_runs=5)
    finite_in = measure(lambda: check_finite(q, k, v), min_time=0.05, min_runs=5)
    out.append(
        row(
            "tiled",
            "fwd",
            t,
            dense["fwd"],
            first_call_ms=first * 1e3,
            second_call_build_share=lookup["median"] / t["median"],
            finite_check_share=finite["median"] / t["median"],
            finite_input_check_share=finite_in["median"] / t["median"],
            block=list(pattern_layout(pat, dims, training=False).summary()["block"]),
        )
    )
    if cfg.backward:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def fb():
            api.attention(qg, kg, vg, pattern=pat, backend="tiled").sum().backward()

        fb()
        tb = measure(fb, min_runs=2, max_runs=5)
        out.append(
            row(
                "tiled",
                "fwdbwd",
                tb,
                dense.get("fwdbwd"),
                peak_mib=(peak_memory(fb) or 0) / 2**20,
                dense_peak_mib=(dense.get("peak") or 0) / 2**20,
            )
        )
    # -- sdpa with the dense boolean mask -----------------------------------------------------------------
    if N <= cfg.masked_sdpa_max:
        with torch.no_grad():
            got = api.attention(q, k, v, pattern=pat, backend="sdpa")
            checks.append({"pattern": rec.name, "N": N, "backend": "sdpa", "max_err_vs_tiled": _err(got, ref)})
            t = measure(lambda: api.attention(q, k, v, pattern=pat, backend="sdpa"))
        out.append(row("sdpa-mask", "fwd", t, dense["fwd"]))
    # -- compiled FlexAttention through attnkit and raw ------------------------------------------------
    want_flex = cfg.flex == "all" or (cfg.flex == "targets" and (rec.name, N) in _TARGET_FLEX)
    if want_flex and dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            t0 = time.perf_counter()
            got = api.attention(q, k, v, pattern=pat, backend="flex")
            compile_s = time.perf_counter() - t0
            checks.append({"pattern": rec.name, "N": N, "backend": "flex", "max_err_vs_tiled": _err(got, ref)})
            t = measure(lambda: api.attention(q, k, v, pattern=pat, backend="flex"))
            from ..backends import flex as _flex

            bm_t = measure(lambda: _flex.block_mask(pat, B, H, N, N, 0, q.device), min_time=0.05, min_runs=5)
        out.append(
            row(
                "flex",
                "fwd",
                t,
                dense["fwd"],
                first_call_ms=compile_s * 1e3,
                second_call_build_share=bm_t["median"] / t["median"],
            )
        )
    # -- peers -------------------------------------------------------------------------------------------
    if cfg.peers:
        for name, make in _peers.PEERS.items():
            if name == "flex-raw" and not (cfg.flex == "all" or (rec.name, N) in _TARGET_RAW_FLEX):
                continue
            if name == "natten" and N > cfg.natten_max_n and (rec.name, N) not in _TARGET_FLEX:
                continue
            if not _peers.available(name):
                continue
            fn = make(pat, q, k, v)
            if fn is None:
                continue
            with torch.no_grad():
                got = fn()
                ppat = _peers.peer_pattern(name, pat)
                want = ref if ppat == pat else api.attention(q, k, v, pattern=ppat, backend="tiled")
                e = _err(got, want)
                checks.append({"pattern": rec.name, "N": N, "backend": name, "max_err_vs_tiled": e})
                if not e < 1e-3:
                    continue
                t = measure(fn, max_runs=5, warmup=False)  # the correctness call above was the warm-up
            out.append(row(name, "fwd", t, dense["fwd"], peer=True))
    return out


def targets(rows: list) -> list:
    """The issue's targets, computed from this run's rows (None where the run did not measure them)."""

    def find(pattern, N, backend, kind="fwd"):
        return next(
            (
                r
                for r in rows
                if r["pattern"] == pattern and r["N"] == N and r["backend"] == backend and r["kind"] == kind
            ),
            None,
        )

    res = []
    N = 16384
    ours = [r for r in (find("sliding_window", N, b) for b in ("tiled", "flex")) if r]
    raw = find("sliding_window", N, "flex-raw")
    if ours:
        best = max(ours, key=lambda r: r["of_ideal"])
        res.append(
            {
                "target": "sliding window 256 @16k fwd: best backend >= 60% of ideal speed-up over causal SDPA",
                "value": f"{best['backend']}: {best['of_ideal']:.1%} of ideal ({best['speedup']:.1f}x of "
                f"{best['ideal_speedup']:.1f}x); raw compiled Flex {raw['of_ideal']:.1%}"
                if raw
                else f"{best['backend']}: {best['of_ideal']:.1%} of ideal",
                "met": best["of_ideal"] >= 0.6 and (raw is None or best["of_ideal"] > raw["of_ideal"]),
            }
        )
    fb = find("sliding_window", N, "tiled", "fwdbwd")
    fb4 = find("sliding_window", 4096, "tiled", "fwdbwd")
    if fb and fb["speedup"]:
        slope = None
        if fb4 and fb4.get("peak_mib") and fb.get("peak_mib"):
            slope = math.log(fb["peak_mib"] / fb4["peak_mib"]) / math.log(N / 4096)
        res.append(
            {
                "target": "tiled fwd+bwd >= 5x causal SDPA fwd+bwd @16k; peak memory slope 4k->16k <= 1.1",
                "value": f"{fb['speedup']:.1f}x; memory slope {slope:.2f}"
                if slope is not None
                else f"{fb['speedup']:.1f}x",
                "met": fb["speedup"] >= 5 and (slope is not None and slope <= 1.1),
            }
        )
    na = find("neighborhood_2d", 4096, "natten")
    best2d = [r for r in (find("neighborhood_2d", 4096, b) for b in ("tiled", "flex")) if r]
    if na and best2d:
        b = min(best2d, key=lambda r: r["ms"])
        res.append(
            {
                "target": "2-D neighbourhood 64x64, kernel 7: faster than NATTEN in the same run",
                "value": f"{b['backend']} {b['ms']:.2f} ms vs natten {na['ms']:.2f} ms ({na['ms'] / b['ms']:.1f}x)",
                "met": b["ms"] < na["ms"],
            }
        )
    checks = [r for r in rows if r.get("finite_check_share") is not None and r["N"] == N]
    if checks:
        worst = max(checks, key=lambda r: r["finite_check_share"])
        sw = next((r for r in checks if r["pattern"] == "sliding_window"), None)
        res.append(
            {
                "target": "the non-finite check costs <= 5% of the tiled forward @16k (the sparsest cells)",
                "value": (f"sliding window {sw['finite_check_share']:.1%}; " if sw else "")
                + f"worst {worst['finite_check_share']:.1%} ({worst['pattern']}) over {len(checks)} patterns"
                + (f" (checking q, k, v instead: {sw['finite_input_check_share']:.1%})" if sw else ""),
                "met": worst["finite_check_share"] <= 0.05,
            }
        )
    shares = [r["second_call_build_share"] for r in rows if r.get("second_call_build_share") is not None]
    if shares:
        worst = max(shares)
        res.append(
            {
                "target": "second call with the same shape spends < 5% building masks or compiling",
                "value": f"worst {worst:.2%} over {len(shares)} (pattern, N, backend) cells",
                "met": worst < 0.05,
            }
        )
    return res


# ---- the suite: report section, terminal table, plots ---------------------------------------------------------

HEADER = [
    "pattern",
    "N",
    "backend",
    "kind",
    "ms median [p20, p80]",
    "dense ms",
    "density",
    "ideal",
    "speed-up",
    "of ideal",
    "of matmul",
    "peak MiB",
]


def table_rows(section: dict) -> list[list[str]]:
    out = []
    for r in section["rows"]:
        out.append(
            [
                r["pattern"],
                str(r["N"]),
                r["backend"],
                r["kind"],
                f"{r['ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]",
                _fmt(r.get("dense_ms"), ".1f"),
                f"{r['density']:.4f}",
                f"{r['ideal_speedup']:.1f}x",
                _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                _fmt(r.get("of_ideal") and 100 * r["of_ideal"], ".0f") + ("%" if r.get("of_ideal") else ""),
                f"{100 * r['of_matmul']:.1f}%",
                _fmt(r.get("peak_mib"), ".0f"),
            ]
        )
    return out


def markdown(section: dict) -> list[str]:
    """The static suite's section of ``report.md``."""
    cfg = section["config"]
    lines = [
        "# Static patterns (A)",
        "",
        f"Matrix product (2048², {cfg['dtype']}): **{section['matmul_gflops']:.0f} GFLOP/s**, measured in this run. "
        f"B={cfg['batch']}, H={cfg['heads']} (per-head patterns: their own), D={cfg['head_dim']}, {cfg['dtype']}. "
        f"Suite took {section['seconds']:.0f} s.",
        "",
        "Speed-up is against dense SDPA of the same kind (causal SDPA for causal patterns, full SDPA otherwise), "
        "timed in the same run; *ideal* is dense pairs / pattern pairs (1/density); *of matmul* is useful FLOP/s "
        "(4·D per interacting pair, ×3.5 for forward+backward) over the matrix-product rate.",
        "",
    ]
    lines += target_lines(section["targets"])
    lines += ["## All measurements", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(section)]
    lines += [
        "",
        "## Correctness gate (max |Δ| against attnkit tiled, itself tested against the float64 oracle)",
        "",
        "| pattern | N | backend | max err |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['pattern']} | {c['N']} | {c['backend']} | {c['max_err_vs_tiled']:.2e} |" for c in section["checks"]
    ]
    if section.get("skipped"):
        lines += ["", "## Skipped in this run", ""]
        lines += [
            f"- {s['pattern']} at N={s['N']} (density {s['density']:.3f}): {s['why']}" for s in section["skipped"]
        ]
    lines += [""] + _decode.markdown(section.get("decode", []))
    lines += ["Plots: `plots/*.png` (time against N, log-log).", ""]
    return lines


class StaticSuite:
    """Family-A patterns: every backend and peer against dense SDPA and the matrix-product rate."""

    name = "static"
    title = "static patterns (A)"

    def __init__(self, config: BenchConfig | None = None):
        self.config = config or BenchConfig()

    def cells(self) -> int:
        cfg = self.config
        recs = [r for r in registry.records("A") if cfg.patterns is None or r.name in cfg.patterns]
        return sum(len(sizes_for(r.name, cfg)) for r in recs) + (_decode.cells(cfg) if cfg.decode else 0)

    def run(self, context, progress) -> dict:
        return run_static(
            self.config, progress=progress, baselines=context.baselines, rate=context.matmul_rate(self.config.dtype)
        )

    def targets(self, section: dict) -> list[dict]:
        return section["targets"]

    def markdown(self, section: dict) -> list[str]:
        return markdown(section)

    def table(self, section: dict, console) -> None:
        rich_table(
            f"attnkit bench: static patterns (matmul {section['matmul_gflops']:.0f} GFLOP/s, "
            f"{section['threads']} threads)",
            HEADER,
            table_rows(section),
            ("pattern", "backend", "kind"),
            console,
        )

    def plots(self, section: dict, folder) -> list:
        groups: dict = {}
        for r in section["rows"]:
            groups.setdefault(r["pattern"], []).append(r)
        return time_plots(groups, folder)

"""Benchmark output: a terminal table, ``results.json``, ``report.md`` and log-log PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def table_rows(res: dict) -> list[list[str]]:
    out = []
    for r in res["rows"]:
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


def print_table(res: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(
        title=f"attnkit bench: static patterns (matmul {res['matmul_gflops']:.0f} GFLOP/s, "
        f"{res['machine']['threads']} threads)"
    )
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("pattern", "backend", "kind") else "right")
    for row in table_rows(res):
        t.add_row(*row)
    console.print(t)
    lin = res.get("linear")
    if lin:
        t = Table(title="attnkit bench: linear family (C)")
        for h in LINEAR_HEADER:
            t.add_column(h, justify="left" if h in ("mechanism", "mode", "kind", "dense") else "right")
        for row in linear_rows(lin):
            t.add_row(*row)
        console.print(t)
    for tg in res["targets"] + (lin["targets"] if lin else []):
        console.print(
            f"[{'green' if tg['met'] else 'red'}]{'MET ' if tg['met'] else 'MISS'}[/] {tg['target']}: {tg['value']}"
        )


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# attnkit bench: static patterns",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['threads']} threads, torch {res['machine']['torch']}, "
        f"tiled forward: {res['machine'].get('tiled_forward', 'torch')}. "
        f"Matrix product (2048², {cfg['dtype']}): **{res['matmul_gflops']:.0f} GFLOP/s**, measured in this run. "
        f"B={cfg['batch']}, H={cfg['heads']} (per-head patterns: their own), D={cfg['head_dim']}, {cfg['dtype']}. "
        f"Run took {res['seconds']:.0f} s.",
        "",
        "Speed-up is against dense SDPA of the same kind (causal SDPA for causal patterns, full SDPA otherwise), "
        "timed in the same run; *ideal* is dense pairs / pattern pairs (1/density); *of matmul* is useful FLOP/s "
        "(4·D per interacting pair, ×3.5 for forward+backward) over the matrix-product rate.",
        "",
        "## Targets",
        "",
    ]
    for tg in res["targets"]:
        lines.append(f"- {'**met**' if tg['met'] else '**missed**'}: {tg['target']} — {tg['value']}")
    lines += ["", "## Dense baselines", "", "| baseline | fwd ms | fwd+bwd ms | peak MiB |", "|---|---|---|---|"]
    for k, v in res["baselines"].items():
        lines.append(
            f"| {k} | {_fmt(v['fwd_ms'], '.1f')} | {_fmt(v['fwdbwd_ms'], '.1f')} | {_fmt(v['peak_mib'], '.0f')} |"
        )
    lines += ["", "## All measurements", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    lines += [
        "",
        "## Correctness gate (max |Δ| against attnkit tiled, itself tested against the float64 oracle)",
        "",
        "| pattern | N | backend | max err |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c['pattern']} | {c['N']} | {c['backend']} | {c['max_err_vs_tiled']:.2e} |" for c in res["checks"]]
    if res.get("skipped"):
        lines += ["", "## Skipped in this run", ""]
        lines += [f"- {s['pattern']} at N={s['N']} (density {s['density']:.3f}): {s['why']}" for s in res["skipped"]]
    if res.get("linear"):
        lines += linear_markdown(res["linear"])
    if res.get("dynamic"):
        from .dynamic import markdown as dynamic_markdown

        lines += dynamic_markdown(res["dynamic"])
    lines += ["", "Plots: `plots/*.png` (time against N, log-log)."]
    return "\n".join(lines) + "\n"


def linear_markdown(lin: dict) -> list[str]:
    cfg = lin["config"]
    lines = [
        "",
        "# Linear family (C)",
        "",
        f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}; inputs N(0, 0.25). Speed-up is "
        "against dense SDPA of the same kind (causal or full) timed in this run; SDPA is measured up to "
        f"N={cfg['sdpa_max_n']} (quadratic beyond). Peers that compute the same function were checked against "
        "attnkit first.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {'**met**' if t['met'] else '**missed**'}: {t['target']} — {t['value']}" for t in lin["targets"]]
    lines += ["", "## Fitted log-log slopes of time against N (N >= 4k)", "", "| series | slope |", "|---|---|"]
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
    return lines


def plots(res: dict, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    by_pattern: dict = {}
    for r in res["rows"]:
        by_pattern.setdefault(r["pattern"], []).append(r)
    for r in (res.get("linear") or {}).get("rows", []):
        # one plot for the linear family: each mechanism's best form, plus its dense baseline
        by_pattern.setdefault("linear_family", []).append(
            {**r, "backend": f"{r['mechanism']} {r['mode']}", "dense_ms": r["dense_ms"] if r["kind"] == "fwd" else None}
        )
    for name, rows in by_pattern.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        series: dict = {}
        for r in rows:
            series.setdefault(f"{r['backend']} {r['kind']}", []).append((r["N"], r["ms"]))
            if r.get("dense_ms"):
                series.setdefault(f"dense SDPA {r.get('dense', '')} {r['kind']}".replace("  ", " "), []).append(
                    (r["N"], r["dense_ms"])
                )
        for label, pts in sorted(series.items()):
            pts = sorted(set(pts))
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=label,
                linestyle="--" if label.startswith("dense") else "-",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write(res: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "report.md").write_text(markdown(res))
    pngs = plots(res, out / "plots")
    if res.get("dynamic"):
        from .dynamic import pareto_plots

        pngs += pareto_plots(res["dynamic"], out / "plots")
    return {"json": out / "results.json", "markdown": out / "report.md", "plots": pngs}

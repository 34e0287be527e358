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
    for tg in res["targets"]:
        console.print(
            f"[{'green' if tg['met'] else 'red'}]{'MET ' if tg['met'] else 'MISS'}[/] {tg['target']}: {tg['value']}"
        )


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# attnkit bench: static patterns",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['threads']} threads, torch {res['machine']['torch']}. "
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
    lines += ["", "Plots: `plots/*.png` (time against N, log-log)."]
    return "\n".join(lines) + "\n"


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
    for name, rows in by_pattern.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        series: dict = {}
        for r in rows:
            series.setdefault(f"{r['backend']} {r['kind']}", []).append((r["N"], r["ms"]))
            if r.get("dense_ms"):
                series.setdefault(f"dense SDPA {r['kind']}", []).append((r["N"], r["dense_ms"]))
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
    return {"json": out / "results.json", "markdown": out / "report.md", "plots": pngs}

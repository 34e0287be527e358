"""Benchmark output: ``results.json``, ``report.md`` (a header, then each suite's section) and every suite's
plots, plus the helpers the suites format with (a number, a target line, a log-log time plot)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def target_lines(targets: list[dict]) -> list[str]:
    """A suite's targets as report bullets; no heading when there are none."""
    if not targets:
        return []
    lines = ["## Targets", ""]
    lines += [f"- {'**met**' if t['met'] else '**missed**'}: {t['target']} — {t['value']}" for t in targets]
    return lines + [""]


def print_targets(targets: list[dict], console) -> None:
    for tg in targets:
        console.print(
            f"[{'green' if tg['met'] else 'red'}]{'MET ' if tg['met'] else 'MISS'}[/] {tg['target']}: {tg['value']}"
        )


def rich_table(title: str, header: list[str], rows: list[list[str]], left: tuple, console) -> None:
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="left" if h in left else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def time_plots(groups: dict[str, list[dict]], folder: Path) -> list[Path]:
    """One log-log plot of time against N per group: a series per ``backend kind``, dense SDPA dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in groups.items():
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


def header(res: dict) -> list[str]:
    m = res["machine"]
    lines = [
        "# attnkit bench",
        "",
        f"Machine: {m['platform']}, {m['threads']} threads, torch {m['torch']}, "
        f"tiled forward: {m.get('tiled_forward', 'torch')}. "
        f"Matrix product (2048², {res['dtype']}): **{res['matmul_gflops']:.0f} GFLOP/s**, measured in this run. "
        f"Suites: {', '.join(res['suites'])}. Run took {res['seconds']:.0f} s"
        + (
            " (" + ", ".join(f"{k} {v:.0f} s" for k, v in res["suite_seconds"].items()) + ")."
            if res.get("suite_seconds")
            else "."
        ),
        "",
    ]
    if res.get("baselines"):
        lines += [
            "## Dense baselines",
            "",
            "Dense SDPA, timed once in this run and shared by the suites that compare against it.",
            "",
            "| baseline | fwd ms | fwd+bwd ms | peak MiB |",
            "|---|---|---|---|",
        ]
        for k, v in res["baselines"].items():
            lines.append(
                f"| {k} | {_fmt(v['fwd_ms'], '.1f')} | {_fmt(v['fwdbwd_ms'], '.1f')} | {_fmt(v['peak_mib'], '.0f')} |"
            )
        lines.append("")
    return lines


def _suite(name: str):
    from .suite import SUITES

    return SUITES[name]()


def markdown(res: dict) -> str:
    """``report.md``: the header (machine, matrix-product rate, dense baselines), then each suite's section."""
    lines = header(res)
    for name, section in res["suites"].items():
        lines += _suite(name).markdown(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def print_table(res: dict, console=None) -> None:
    """Every suite's terminal table, each followed by its targets."""
    from rich.console import Console

    console = console or Console()
    for name, section in res["suites"].items():
        suite = _suite(name)
        suite.table(section, console)
        print_targets(suite.targets(section), console)


def write(res: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "report.md").write_text(markdown(res))
    pngs = []
    for name, section in res["suites"].items():
        pngs += _suite(name).plots(section, out / "plots")
    return {"json": out / "results.json", "markdown": out / "report.md", "plots": pngs}

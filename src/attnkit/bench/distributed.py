"""``attnkit bench --suite distributed``: context-parallel attention on 1, 2 and 4 local gloo processes.

Per pattern and number of processes: the forward and forward + backward time of the slowest rank, the key/value
bytes each rank sends (counted by :func:`attnkit.distributed.record_traffic`, forward only) against what a dense
ring sends, and the per-rank work balance (interacting pairs, from the plan). Beside them: the cost model's
prediction for 8 to 64 ranks (:func:`attnkit.distributed.explain_context_parallel`, no processes), and what
PyTorch's own ``context_parallel`` does with the same cases on this CPU (its error, when it refuses).

This machine has 2 cores: 1 process runs 2 threads, 2 processes 1 thread each, 4 processes share the 2 cores,
so time falls from 1 to 2 processes at best and never from 2 to 4; the bytes and the balance are what carry to a
real cluster. Dense SDPA on one process and the matrix-product rate are measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..distributed import (
    context_parallel_attention,
    context_parallel_linear_attention,
    explain_context_parallel,
    record_traffic,
    run_local,
    shard,
)
from ..patterns import AShape, SlidingWindow
from ..patterns.modality import BlockCausalSpans
from ..sparse import BlockTopK
from .report import _fmt, rich_table, target_lines

CASES = ("causal", "causal_zigzag", "window256", "a_shape", "block_causal_spans", "block_topk", "linear_elu")
PREDICT_RANKS = (8, 16, 32, 64)


@dataclass
class DistributedConfig:
    n: int = 8192
    worlds: tuple = (1, 2, 4)
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    repeats: int = 3
    cases: tuple = CASES
    predict_n: int = 32768  # planning evaluates every 16 x 16 tile: N^2 work (2-9 s here at 32k, 18-25 s at 64k)
    torch_cp: bool = True


def _case(name: str, n: int):
    """``(pattern, causal, balance)`` of a case; ``pattern="linear"`` for linear attention."""
    return {
        "causal": (None, True, "contiguous"),
        "causal_zigzag": (None, True, "zigzag"),
        "window256": (SlidingWindow(left=255, right=0), False, "contiguous"),
        "a_shape": (AShape(sinks=4, window=256), False, "contiguous"),
        "block_causal_spans": (
            BlockCausalSpans(n, tuple((a, a + 512) for a in range(0, n - 511, 1024))),
            False,
            "contiguous",
        ),
        "block_topk": (BlockTopK(block_size=64, budget=0.125, share_group=True), True, "contiguous"),
        "linear_elu": ("linear", True, "contiguous"),
    }[name]


def _median_time(fn, repeats):
    fn()  # warm-up: plans, layouts and first-touch pages
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank_worker(rank, world, cfg: DistributedConfig):
    """On each rank: every case's forward and forward + backward seconds and the bytes it sent (forward)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hk, N, D = 1, cfg.heads, cfg.kv_heads, cfg.n, cfg.head_dim
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (H, Hk, Hk))
    out = {}
    for name in cfg.cases:
        pattern, causal, balance = _case(name, N)
        ql, kl, vl = (shard(t, balance=balance).requires_grad_() for t in (q, k, v))

        def fwd(ql=ql, kl=kl, vl=vl, pattern=pattern, causal=causal, balance=balance):
            if pattern == "linear":
                return context_parallel_linear_attention(ql, kl, vl)
            return context_parallel_attention(ql, kl, vl, pattern=pattern, causal=causal, balance=balance)

        with torch.no_grad():
            fwd_s = _median_time(fwd, cfg.repeats)
            with record_traffic() as t:
                fwd()

        def fwd_bwd(fwd=fwd):
            fwd().sum().backward()

        both_s = _median_time(fwd_bwd, max(1, cfg.repeats - 1))
        out[name] = {"fwd_s": fwd_s, "fwd_bwd_s": both_s, "sent": t.sent, "collective": t.collective}
    return out


def _single(cfg: DistributedConfig) -> dict:
    """One process, no context parallelism: attnkit.attention (and linear attention) per case, and dense SDPA."""
    from ..api import attention
    from ..linear import linear_attention
    from .timing import measure

    g = torch.Generator().manual_seed(0)
    B, H, Hk, N, D = 1, cfg.heads, cfg.kv_heads, cfg.n, cfg.head_dim
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (H, Hk, Hk))
    res = {}
    with torch.no_grad():
        for name in cfg.cases:
            pattern, causal, _ = _case(name, N)
            if pattern == "linear":
                fn = lambda: linear_attention(q, k, v)  # noqa: E731
            else:
                fn = lambda p=pattern, c=causal: attention(q, k, v, pattern=p, causal=c)  # noqa: E731
            res[name] = measure(fn, min_runs=cfg.repeats)["median"]
        res["dense_sdpa_causal"] = measure(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            min_runs=cfg.repeats,
        )["median"]
    return res


def _torch_cp_worker(rank, world):
    """What torch's own context_parallel does on this CPU for the cases attnkit runs (the error, if any)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mesh = init_device_mesh("cpu", (world,))
    F = torch.nn.functional
    res = {}

    def attempt(name, fn):
        try:
            fn()
            res[name] = "runs"
        except Exception as e:  # noqa: BLE001 - the refusal is the measurement
            res[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"

    def run(is_causal=False, mask=False, backward=False, math=False):
        q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=backward) for _ in range(3))
        m = torch.ones(16, 16, dtype=torch.bool).tril() if mask else None
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            if math:
                with sdpa_kernel(SDPBackend.MATH):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, attn_mask=m)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, attn_mask=m)
            if backward:
                o.sum().backward()

    attempt("non-causal, forward", lambda: run())
    attempt("causal, forward", lambda: run(is_causal=True))
    attempt("causal, forward, MATH backend", lambda: run(is_causal=True, math=True))
    attempt("explicit mask, forward", lambda: run(mask=True))
    attempt("non-causal, backward", lambda: run(backward=True))
    return res


def cells(cfg: DistributedConfig) -> int:
    return len(cfg.worlds) + 2 + bool(cfg.torch_cp)


def _planned(name: str) -> bool:
    """Whether a case has a static plan (linear attention and selectors are planned from the data)."""
    pattern = _case(name, 1024)[0]
    return pattern != "linear" and not isinstance(pattern, BlockTopK)


def _plan(cfg: DistributedConfig, name: str, n: int, world: int):
    """The plan of case ``name`` at ``n`` tokens on ``world`` ranks (None: linear or a selector, planned at run
    time from the data)."""
    if not _planned(name):
        return None
    pattern, causal, balance = _case(name, n)
    return explain_context_parallel(
        n,
        world,
        pattern=pattern,
        causal=causal,
        balance=balance,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
    )


def run_distributed(cfg: DistributedConfig, progress=None, context=None) -> dict:
    step = progress or (lambda text: None)
    rows = []
    step("distributed: one process, no context parallelism")
    single = _single(cfg)
    threads = torch.get_num_threads()
    for world in cfg.worlds:
        step(f"distributed: {world} process{'es' * (world > 1)}")
        per_rank = run_local(_rank_worker, world, cfg, threads=max(1, threads // world), timeout=1800)
        for name in cfg.cases:
            plan = _plan(cfg, name, cfg.n, world)
            row_bytes = 2 * cfg.kv_heads * cfg.head_dim * 4
            shard_rows = cfg.n // world
            rows.append(
                {
                    "case": name,
                    "world": world,
                    "fwd_ms": 1e3 * max(r[name]["fwd_s"] for r in per_rank),
                    "fwd_bwd_ms": 1e3 * max(r[name]["fwd_bwd_s"] for r in per_rank),
                    "single_ms": 1e3 * single[name],
                    "sent_max": max(r[name]["sent"] for r in per_rank),
                    "sent_per_rank": [r[name]["sent"] for r in per_rank],
                    "collective_max": max(r[name]["collective"] for r in per_rank),
                    "dense_ring_per_rank": (world - 1) * shard_rows * row_bytes,
                    "imbalance": None if plan is None else plan.imbalance(),
                    "predicted_ms": None if plan is None else 1e3 * plan.predict(plan.choose()),
                    "strategy": None if plan is None else plan.choose(),
                }
            )
    step("distributed: the cost model for 8 to 64 ranks")
    predictions = []
    for name in cfg.cases:
        if not _planned(name):
            continue
        for world in PREDICT_RANKS:
            plan = _plan(cfg, name, cfg.predict_n, world)
            predictions.append(
                {
                    "case": name,
                    "world": world,
                    "sent_max": max(plan.bytes_sent(r) for r in range(world)),
                    "dense_ring_per_rank": plan.dense_ring_bytes(0),
                    "imbalance": plan.imbalance(),
                    "ring_ms": 1e3 * plan.predict("ring"),
                    "allgather_ms": 1e3 * plan.predict("allgather"),
                }
            )
    torch_cp = {}
    if cfg.torch_cp:
        step("distributed: torch's context_parallel on the same cases")
        torch_cp = run_local(_torch_cp_worker, 2, allow_errors=True)[0]
        torch_cp = torch_cp.get("ok", torch_cp)
    section = {
        "config": {
            k: getattr(cfg, k) for k in ("n", "worlds", "heads", "kv_heads", "head_dim", "repeats", "predict_n")
        },
        "rows": rows,
        "single": {k: 1e3 * v for k, v in single.items()},
        "predictions": predictions,
        "torch_context_parallel": torch_cp,
        "matmul_gflops": None if context is None else context.matmul_rate("float32") / 1e9,
    }
    section["targets"] = targets(section)
    return section


def targets(section) -> list[dict]:
    out = []
    win = [r for r in section["rows"] if r["case"] == "window256" and r["world"] == 4]
    if win:
        r = win[0]
        want = 255 * 2 * section["config"]["kv_heads"] * section["config"]["head_dim"] * 4
        out.append(
            {
                "target": "a 256-key window across 4 ranks sends each neighbour only the 255 rows its window reaches",
                "met": r["sent_max"] == want,
                "value": f"{r['sent_max']} bytes per rank (255 rows = {want}; a dense ring sends "
                f"{r['dense_ring_per_rank']})",
            }
        )
    zig = [r for r in section["rows"] if r["case"] == "causal_zigzag" and r["world"] == 4]
    if zig:
        r = zig[0]
        out.append(
            {
                "target": "causal zigzag balances per-rank work within 10% (4 ranks)",
                "met": r["imbalance"] <= 1.10,
                "value": f"max / mean interacting pairs {r['imbalance']:.3f}",
            }
        )
    return out


HEADER = ["case", "ranks", "fwd ms", "fwd+bwd ms", "1 process ms", "sent KiB/rank", "dense ring KiB", "imbalance"]


def table_rows(section) -> list[list[str]]:
    return [
        [
            r["case"],
            str(r["world"]),
            _fmt(r["fwd_ms"], ".1f"),
            _fmt(r["fwd_bwd_ms"], ".1f"),
            _fmt(r["single_ms"], ".1f"),
            _fmt(r["sent_max"] / 1024, ".0f"),
            _fmt(r["dense_ring_per_rank"] / 1024, ".0f"),
            _fmt(r["imbalance"], ".3f"),
        ]
        for r in section["rows"]
    ]


def markdown(section) -> list[str]:
    c = section["config"]
    lines = [
        "# Context parallelism (attnkit.distributed, gloo, local processes)",
        "",
        f"N = {c['n']}, {c['heads']} query heads, {c['kv_heads']} KV heads, head dim {c['head_dim']}, float32; "
        f"slowest rank, median of {c['repeats']}. Dense causal SDPA on one process: "
        f"{section['single'].get('dense_sdpa_causal', 0):.1f} ms"
        + (f"; matrix product {section['matmul_gflops']:.0f} GFLOP/s" if section.get("matmul_gflops") else "")
        + ". 2 cores: processes share them (see the module docstring).",
        "",
    ]
    lines += target_lines(section["targets"])
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(section)]
    lines += ["", f"## The cost model beyond this machine (N = {c['predict_n']})", ""]
    lines += [
        "| case | ranks | sent KiB/rank | dense ring KiB | imbalance | ring ms | allgather ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in section["predictions"]:
        lines.append(
            f"| {p['case']} | {p['world']} | {p['sent_max'] / 1024:.0f} | {p['dense_ring_per_rank'] / 1024:.0f} | "
            f"{p['imbalance']:.3f} | {p['ring_ms']:.2f} | {p['allgather_ms']:.2f} |"
        )
    if section["torch_context_parallel"]:
        lines += ["", "## PyTorch's context_parallel on this CPU (2 gloo processes)", ""]
        lines += [f"- {k}: {v}" for k, v in section["torch_context_parallel"].items()]
    return lines + [""]


class DistributedSuite:
    """Context-parallel attention on local gloo processes: time, bytes per rank, balance, the cost model."""

    name = "distributed"
    title = "context parallelism"

    def __init__(self, config: DistributedConfig | None = None):
        self.config = config or DistributedConfig()

    def cells(self) -> int:
        return cells(self.config)

    def run(self, context, progress) -> dict:
        return run_distributed(self.config, progress, context)

    def targets(self, section: dict) -> list[dict]:
        return section["targets"]

    def markdown(self, section: dict) -> list[str]:
        return markdown(section)

    def table(self, section: dict, console) -> None:
        rich_table("attnkit bench: context parallelism", HEADER, table_rows(section), ("case",), console)

    def plots(self, section: dict, folder) -> list:
        return bytes_plot(section, folder)


def bytes_plot(section, folder) -> list:
    """Bytes sent per rank against ranks, per case, with the dense ring dashed (measured to 4, predicted past)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for case in sorted({p["case"] for p in section["predictions"]}):
        pts = [
            (p["world"], p["sent_max"] / p["dense_ring_per_rank"]) for p in section["predictions"] if p["case"] == case
        ]
        ax.plot(*zip(*pts, strict=True), marker="o", label=case)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("bytes sent by the busiest rank / a dense ring's")
    ax.set_title(f"context parallelism, N = {section['config']['predict_n']} (the cost model's plan)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "distributed_bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]

"""Context-parallel attention on real gloo process groups (2, 3 and 4 processes on this CPU): float64 parity
with single-process attnkit (outputs and the three gradients), the traffic a pattern implies (counted), and
failures that raise on every rank instead of hanging."""

import pytest
import torch

import attnkit as ak
from attnkit.distributed import DistributedError, explain_context_parallel, run_local

from . import workers

TOL = 1e-12
PATTERNS = [r.name for r in ak.registry.records(kind="pattern")]


@pytest.mark.parametrize(("world", "balance"), [(2, "contiguous"), (4, "zigzag")])
def test_every_registered_pattern_matches_one_process(world, balance):
    results = run_local(workers.every_pattern, world, balance)
    assert set(results[0]) == set(PATTERNS)
    for name in PATTERNS:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{name} on {world} ranks ({balance}): {worst:.3g}"


@pytest.mark.parametrize("world", [3, 4])
def test_score_mods_offsets_uneven_shards_padding_and_strategies(world):
    results = run_local(workers.features, world)
    for case in results[0]:
        worst = max(r[case] for r in results)
        assert worst < TOL, f"{case} on {world} ranks: {worst:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_block_selector_selects_globally_and_moves_only_its_blocks(world):
    results = run_local(workers.block_selector, world)
    assert max(r["error"] for r in results) < TOL
    n_rows, row = 1024, 2 * 2 * 16 * 8  # K and V of 2 heads x 16 dims, float64
    # A causal dense exchange, forward (K, V rows) and backward (their gradients back to the owner).
    dense = 2 * sum(n_rows // world * (world - 1 - r) for r in range(world)) * row
    assert 0 < sum(r["sent"] for r in results) < dense


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_low_precision_by_the_two_times_naive_rule(dtype):
    results = run_local(workers.low_precision, 2, dtype)
    for case in results[0]:
        worst = max(r[case] for r in results)
        assert worst <= 2.0, f"{case} in {dtype}: {worst:.2f}x single-process attnkit's error"


@pytest.mark.parametrize("world", [2, 4])
def test_linear_attention_passes_the_state(world):
    results = run_local(workers.linear, world)
    for case in results[0]:
        worst = max(r[case] for r in results)
        assert worst < TOL, f"{case} on {world} ranks: {worst:.3g}"


def test_a_window_sends_each_neighbour_only_the_rows_it_reaches():
    n, window, world = 4096, 256, 4
    results = run_local(workers.window_traffic, world, n, window)
    for rank, r in enumerate(results):
        want = {rank + 1: (window - 1) * r["row_bytes"]} if rank + 1 < world else {}
        assert r["per_peer"] == want
        assert r["received"] == (0 if rank == 0 else (window - 1) * r["row_bytes"])
    plan = explain_context_parallel(n, world, pattern=ak.patterns.SlidingWindow(left=window - 1, right=0))
    assert plan.rows_sent(0) == window - 1 and plan.dense_ring_bytes(0) == (world - 1) * 1024 * plan.kv_row_bytes


@pytest.mark.parametrize("how", ["raise", "die", "bad", "backward"])
def test_a_failing_rank_makes_every_rank_raise_within_the_timeout(how):
    timeout = 5.0
    results = run_local(workers.failure, 3, how, timeout, allow_errors=True, timeout=60)
    others = [results[0], results[2]]
    for r in others:
        got = r["ok"]
        assert got["type"] == "DistributedError", got
        assert got["seconds"] < 2 * timeout + 5
        if how != "die":
            assert "rank 1" in got["message"] or "rank(s) [1]" in got["message"] or how == "backward"
    if how == "raise":
        assert results[1]["ok"]["type"] == "RuntimeError"
    if how == "bad":
        assert results[1]["ok"]["type"] == "ShapeError"


@pytest.mark.parametrize(
    ("mechanism", "balance"), [(None, "zigzag"), ("sliding_window", "contiguous"), ("linear_elu", "contiguous")]
)
def test_a_context_parallel_layer_equals_the_layer_on_one_process(mechanism, balance):
    errs = run_local(workers.layer_parallel, 2, mechanism, balance)
    assert max(errs) < 1e-10


def test_causal_zigzag_balances_the_work():
    for n, world in ((4096, 2), (16384, 4), (16384, 8), (10000, 4)):
        zig = explain_context_parallel(n, world, causal=True, balance="zigzag")
        flat = explain_context_parallel(n, world, causal=True)
        assert zig.imbalance() <= 1.10, (n, world, zig.imbalance())
        assert flat.imbalance() > 1.4
        assert all(d > s for (d, s) in flat.runs)  # a causal mask never sends backwards


def test_bad_arguments_are_named():
    with pytest.raises(ak.errors.ShapeError, match="balance"):
        explain_context_parallel(64, 2, balance="spiral")
    with pytest.raises(ak.errors.ShapeError, match="strategy"):
        explain_context_parallel(64, 2).choose("broadcast")
    with pytest.raises(DistributedError, match="process group"):
        ak.distributed.context_parallel_attention(*(torch.randn(1, 1, 8, 4) for _ in range(3)))


def test_the_ddp_and_context_parallel_example_trains_and_matches_one_process():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[2]
    run = subprocess.run(
        [sys.executable, str(root / "examples" / "train_context_parallel.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 0 equals one process" in run.stdout
    assert "100% of the repeated tokens right" in run.stdout or "9" in run.stdout.split("two processes")[-1][:12]

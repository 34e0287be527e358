"""The context-parallel plan without processes: which key rows each rank needs (against the dense mask), the
sharding, the runs, the cost model's choice."""

import pytest
import torch

import attnkit as ak
from attnkit.distributed import explain_context_parallel, shard
from attnkit.distributed.plan import PatternPairs, make_chunks, runs_of, shard_lengths

PATTERNS = [r for r in ak.registry.records(kind="pattern")]


@pytest.mark.parametrize("rec", PATTERNS, ids=lambda r: r.name)
@pytest.mark.parametrize(("world", "balance"), [(3, "contiguous"), (2, "zigzag")])
def test_the_rows_a_rank_needs_are_exactly_those_its_queries_see(rec, world, balance):
    pat = rec.make(100)
    n = pat.fixed_length or 100
    mask = pat.dense_mask(n, n, heads=4).any(0)  # (N, N) over the head groups
    chunks = make_chunks(shard_lengths(n, world, balance), balance)
    pairs = PatternPairs(pat, n, 0, 4)
    for dst in range(world):
        rows = torch.zeros(n, dtype=torch.bool)
        for c in chunks:
            if c.owner == dst:
                rows[c.start : c.end] = True
        for c in chunks:
            got = pairs.needed(rows, c.start, c.end)
            want = mask[rows][:, c.start : c.end].any(0)
            assert torch.equal(got, want), (rec.name, dst, c)


def test_runs_join_small_gaps_and_cap_their_number():
    m = torch.zeros(100, dtype=torch.bool)
    m[2:5] = m[10:20] = m[60:70] = m[80:81] = True
    assert runs_of(m, 0, 8) == [(2, 5), (10, 20), (60, 70), (80, 81)]
    assert runs_of(m, 5, 8) == [(2, 20), (60, 70), (80, 81)]
    assert runs_of(m, 0, 2) == [(2, 20), (60, 81)]
    assert runs_of(torch.zeros(5, dtype=torch.bool), 0, 8) == []


def test_zigzag_holds_head_and_tail_and_shard_cuts_it():
    chunks = make_chunks(shard_lengths(10, 2, "zigzag"), "zigzag")
    assert [(c.start, c.end, c.owner) for c in chunks] == [(0, 3, 0), (3, 6, 1), (6, 8, 1), (8, 10, 0)]
    x = torch.arange(10)
    assert shard(x, dim=0, balance="zigzag", rank=0, world=2).tolist() == [0, 1, 2, 8, 9]
    assert shard(x, dim=0, balance="zigzag", rank=1, world=2).tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(ak.errors.ShapeError, match="zigzag"):
        make_chunks([4, 6], "zigzag")


def test_the_cost_model_prefers_the_ring_when_little_travels_and_says_why():
    window = explain_context_parallel(16384, 8, pattern=ak.patterns.SlidingWindow(left=255, right=0))
    assert window.choose() == "ring" and window.predict("ring") < window.predict("allgather")
    text = str(window)
    assert "sends 255 key rows" in text and "strategy ring" in text
    # With a huge per-message latency and a dense pattern, one collective beats W - 1 messages.
    slow = ak.distributed.CostModel(latency_s=1.0, bytes_per_s=1e12, flops_per_s=1e15)
    dense = explain_context_parallel(4096, 16, cost=slow)
    assert dense.choose() == "allgather"

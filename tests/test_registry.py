"""The registry's contract: every record's factory follows its kind's signature, makes what its kind promises,
and says truthfully where it is documented."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import records, registry
from attnkit.errors import ShapeError
from attnkit.linear import FeatureMap  # noqa: F401  (the family is loaded)
from attnkit.sparse import Selector

RECORDS = registry.records()
MAKES = {
    "pattern": ak.patterns.Pattern,
    "function": records.Mechanism,
    "module": torch.nn.Module,
    "selector": Selector,
}


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.name)
def test_factory_follows_its_kind(rec):
    records.check_factory(rec.kind, rec.factory)
    assert rec.family in records.FAMILIES and rec.kind in records.KINDS
    assert rec.paper and rec.summary
    assert rec.source is not None and rec.doc, f"{rec.name}: no documented source"
    if rec.kind in MAKES:
        assert isinstance(rec.make(256), MAKES[rec.kind])


@pytest.mark.parametrize("rec", registry.records(kind="selector"), ids=lambda r: r.name)
def test_selector_factories_take_n_first(rec):
    """make(n) is a small instance for about n tokens; the budget is a keyword (it used to come first)."""
    sel = rec.make(512, budget=0.25, heads=4, kv_heads=2, head_dim=16, block=64)
    assert isinstance(sel, Selector)


def test_signatures_are_checked_at_registration():
    with pytest.raises(ShapeError, match="first positional parameter named n"):
        records.check_factory("pattern", lambda budget: None)
    with pytest.raises(ShapeError, match="keyword-only"):
        records.check_factory("selector", lambda n, budget=0.1: None)
    with pytest.raises(ShapeError, match="keywords of kind 'selector'"):
        records.check_factory("selector", lambda n, *, budget=0.1: None)
    with pytest.raises(ShapeError, match="defaults"):
        records.check_factory("policy", lambda n, *, model, budget=0.25: None)
    with pytest.raises(ShapeError, match="kind"):
        records.register(
            "x", family="A", kind="nope", paper="p", exact=True, supports=(), factory=lambda n: 0, summary=""
        )


def test_queries():
    assert registry.get("composite_attention").family == "A"
    assert set(registry.names(kind="policy")) >= {"streaming_llm", "sparse_prefill", "head_aware_kv"}
    with pytest.raises(ShapeError, match="name"):
        registry.get("nope")
    with pytest.raises(ShapeError, match="family"):
        registry.records(family="Z")


def test_the_readme_counts_what_the_registry_holds():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| ([A-J]) \| .*? \| (\d+) \| ", text, flags=re.M)
    assert rows, "the README's family table"
    for family, count in rows:
        assert int(count) == len(registry.records(family=family)), f"README says {count} records in family {family}"

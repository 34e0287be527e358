"""The generator behind the gallery (docs/_gen): its runnable calls run, it reads the recorded benchmark, and
the RST in the docstrings becomes Markdown. No browser needed."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkit import registry

from .conftest import ROOT, load_gallery

gallery = load_gallery()


def _rst():
    spec = importlib.util.spec_from_file_location("_attnkit_docs_rst", ROOT / "docs" / "_gen" / "rst.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


RUNNABLE = [r.name for r in registry.records() if r.kind not in ("policy", "analysis", "intervention", "pruner")]
POLICIES = [r.name for r in registry.records(kind="policy")]
ANALYSES = [r.name for r in registry.records() if r.kind in ("analysis", "intervention", "pruner")]


@pytest.mark.parametrize("name", RUNNABLE)
def test_record_call_runs(name):
    """The call on the record's page runs as shown (a policy needs SmolLM2: compiled only, below)."""
    code = gallery.snippet(registry.get(name))
    torch.manual_seed(0)
    start = time.perf_counter()
    exec(compile(code, f"<gallery {name}>", "exec"), {"__name__": "__gallery__"})
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("name", POLICIES)
def test_policy_call_compiles_and_names_the_public_api(name):
    code = gallery.snippet(registry.get(name))
    compile(code, f"<gallery {name}>", "exec")
    assert "attnkit.hf.apply(model, policy)" in code and f'ak.registry.get("{name}")' in code


@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_call_compiles(name):
    """An analysis needs SmolLM2 and seconds to minutes: its call is compiled here, run by tests/analysis."""
    code = gallery.snippet(registry.get(name))
    compile(code, f"<gallery {name}>", "exec")
    assert f'ak.registry.get("{name}")' in code and ("load_smollm2()" in code or "load_minilm()" in code)


def test_the_calls_have_the_forms_of_their_kind():
    forms = {
        "pattern": ["pat = ak.registry.get(", ".make(1024)", "ak.attention(q, k, v, pattern=pat)"],
        "function": [".make(1024)\nout = m(q, k, v)"],
        "module": ["layer = ak.registry.get(", ".make(256)"],
        "layer": ["layer = ak.registry.get(", ".make(256, dim=64, heads=4)"],
        "selector": ["sel = ak.registry.get("],
        "policy": ["attnkit.hf.apply(model, "],
        "analysis": ["tool = ak.registry.get("],
        "intervention": ["steer = ak.registry.get(", "attnkit.hf.applied(model, steer)"],
        "pruner": ["pruner = ak.registry.get(", "pruned_"],
        "task": ["task = ak.registry.get(", ".make(64, seed=0)", "task.batch("],
    }
    for rec in registry.records():
        code = gallery.snippet(rec)
        assert rec.kind != "pruner" or "pruned_forward(" in code or "pruned_encode(" in code, rec.name
        for piece in forms[rec.kind]:
            assert piece in code, (rec.name, piece)


def test_every_non_policy_record_has_a_documented_source():
    for rec in registry.records():
        path = gallery.source_path(rec)
        if rec.kind == "policy" and getattr(rec, "source", None) is None:
            assert path is None  # never made: it needs a model
        else:
            assert path and path.startswith("attnkit."), (rec.name, path)


def test_benchmark_rows_are_found_with_their_table_header():
    tables = gallery.bench_tables((ROOT / "BENCHMARKS.md").read_text())
    rows = gallery.bench_rows("sliding_window", tables)
    static = [t for t in rows if t.where.endswith("All measurements") and t.header.startswith("| pattern | N |")]
    assert static and all(r.startswith("| sliding_window |") for r in static[0].rows)
    assert gallery.bench_rows("linear_elu", tables) and gallery.bench_rows("moba", tables)
    assert not gallery.bench_rows("no_such_record", tables)


def test_record_page_says_when_it_is_not_benchmarked():
    fam = gallery.families()
    text = gallery.record_page(registry.get("causal"), [], fam)
    assert "Not in the recorded benchmark." in text
    assert "../patterns/causal.png" in text


def test_index_lists_every_family_and_record():
    fam = gallery.families()
    text = gallery.index_page(registry.records(), fam)
    for letter in "ABCDEFGHIJ":
        assert f"{{#family-{letter.lower()}}}" in text
    for rec in registry.records():
        assert f"]({rec.name}.md)" in text


def test_rst_to_markdown():
    rst = _rst()
    text = (
        "Weights :math:`w_{ij}` from :class:`~attnkit.patterns.Causal` and :func:`attnkit.attention`.\n\n"
        ".. math::\n    a = b\n\n    c = d\n\n"
        "=====  =====\nname   value\n=====  =====\n``x``  :math:`1`\n=====  =====\n\n"
        "Picture::\n\n    #.\n    ##\n\n"
        ">>> 1 + 1\n2\n"
    )
    md = rst.rst_to_markdown(text)
    assert "$w_{ij}$" in md
    assert '<autoref identifier="attnkit.patterns.Causal" optional><code>Causal</code></autoref>' in md
    assert "<code>attnkit.attention()</code>" in md
    assert "$$\na = b\n$$" in md and "$$\nc = d\n$$" in md
    assert "| name | value |\n|---|---|\n| ``x`` | $1$ |" in md
    assert "Picture:\n\n```text\n#.\n##\n```" in md
    assert "```pycon\n>>> 1 + 1\n2\n```" in md
    assert ":math:" not in md and ".. math::" not in md


def test_site_sources_hold_no_cdn_link():
    """No page, stylesheet or script of the site names a network address to load from."""
    for path in [ROOT / "mkdocs.yml", *(p for p in (ROOT / "docs").rglob("*") if p.suffix in {".md", ".js", ".css"})]:
        text = path.read_text()
        for host in ("cdn.", "unpkg", "jsdelivr", "googleapis", "cdnjs", "polyfill.io"):
            assert host not in text, (path, host)


def test_examples_folder_is_what_the_tutorials_include():
    for md in (ROOT / "docs" / "tutorials").glob("*.md"):
        for line in md.read_text().splitlines():
            if line.startswith('--8<-- "'):
                assert (ROOT / line.split('"')[1]).exists(), (md.name, line)
    assert Path(gallery.__file__).parent == ROOT / "docs" / "_gen"

"""The built site in a real browser: the gallery lists every registry record, every record page loads with
its pictures, the home page and the tutorials load without console errors, the math is typeset, and nothing
is fetched from anywhere but the local server."""

from __future__ import annotations

import pytest

from attnkit import registry

TUTORIALS = ["compute", "build", "apply", "see", "compare"]


def _clean(v, what: str) -> list[str]:
    problems = [f"{what}: {e}" for e in v.errors]
    problems += [f"{what}: fetched from outside the site: {u}" for u in v.external]
    problems += [f"{what}: image did not load: {src}" for src in v.broken_images()]
    return problems


def test_gallery_index_lists_every_record(visitor):
    response = visitor.visit("gallery/index.html")
    assert response is not None and response.ok
    links = set(visitor.page.eval_on_selector_all("article a[href]", "els => els.map(e => e.getAttribute('href'))"))
    text = visitor.page.inner_text("article")
    missing = [r.name for r in registry.records() if f"{r.name}.html" not in links or r.name not in text]
    assert not missing, f"the gallery index does not list: {missing}"
    assert visitor.image_count() > 0  # the pattern thumbnails
    assert not _clean(visitor, "gallery/index.html")


def test_every_record_page_loads(visitor):
    """Each record's page: its title, its sections, its paper, its pictures loaded, no errors."""
    problems = []
    for rec in registry.records():
        path = f"gallery/{rec.name}.html"
        response = visitor.visit(path)
        if response is None or not response.ok:
            problems.append(f"{path}: HTTP {response.status if response else 'no response'}")
            continue
        title = visitor.page.inner_text("article h1")
        if title.strip().rstrip("¶").strip() != rec.name:
            problems.append(f"{path}: title {title!r}")
        body = visitor.page.inner_text("article")
        for needed in ("Run it", "The math", "Recorded benchmark", rec.paper.split(";")[0][:30]):
            if needed not in body:
                problems.append(f"{path}: no {needed!r}")
        if rec.kind == "pattern":  # its picture, drawn by `attnkit pictures`
            srcs = visitor.page.eval_on_selector_all("article img", "els => els.map(e => e.src)")
            if not any(s.endswith(f"/patterns/{rec.name}.png") for s in srcs):
                problems.append(f"{path}: no picture patterns/{rec.name}.png")
        problems += _clean(visitor, path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", ["index.html", "install.html", "benchmarks.html", *(f"tutorials/{t}.html" for t in TUTORIALS)]
)
def test_page_loads_without_console_errors(visitor, path):
    response = visitor.visit(path)
    assert response is not None and response.ok
    assert visitor.page.inner_text("article h1")
    problems = _clean(visitor, path)
    assert not problems, "\n".join(problems)


def test_tutorials_show_the_examples_the_tests_run(visitor):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    for tutorial, example in (
        ("compute", "quickstart.py"),
        ("compute", "linear_attention.py"),
        ("compute", "dynamic_sparse.py"),
        ("build", "build_layers.py"),
        ("build", "train_transformer.py"),
        ("build", "train_context_parallel.py"),
        ("apply", "kv_policies.py"),
        ("see", "see_attention.py"),
        ("see", "see_heads.py"),
    ):
        visitor.visit(f"tutorials/{tutorial}.html")
        code = "\n".join(visitor.page.eval_on_selector_all("article pre code", "els => els.map(e => e.innerText)"))
        lines = [ln for ln in (examples / example).read_text().splitlines() if ln.strip()]
        missing = [ln for ln in lines if ln.strip() not in code]
        assert not missing, f"tutorials/{tutorial} does not show {example} exactly: {missing[:3]}"


@pytest.mark.parametrize("path", ["reference/linear.html", "gallery/linear_elu.html", "reference/attnkit.html"])
def test_math_is_typeset_and_visible(visitor, path):
    visitor.visit(path)
    state = visitor.page.evaluate(
        """() => {
          const math = Array.from(document.querySelectorAll('.arithmatex'));
          const glyph = document.querySelector('mjx-container mjx-c');
          return {
            math: math.length,
            typeset: math.filter(e => e.querySelector('mjx-container')).length,
            glyph: glyph ? getComputedStyle(glyph, '::before').content : null,
          };
        }"""
    )
    assert state["math"] > 0, f"{path} has no math"
    assert state["typeset"] == state["math"], state
    # MathJax draws each glyph with a CSS rule; without it the math is typeset but invisible.
    assert state["glyph"] not in (None, "none", "normal", '""'), state
    assert not _clean(visitor, path)

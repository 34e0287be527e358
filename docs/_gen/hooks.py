"""MkDocs hooks (mkdocs.yml: ``hooks:``): the pages generated at build time, and the offline MathJax.

* the gallery (``gallery.py``): an index and one page per registry record, and its part of the navigation;
* ``benchmarks.md``: the repository's ``BENCHMARKS.md`` as a page, so the site links the recorded numbers;
* MathJax 3 from the ``django-static-mathjax`` wheel, served from ``assets/mathjax/`` (no CDN anywhere).

The registry is imported from this checkout's ``src/`` (the same source mkdocstrings documents).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

_spec = importlib.util.spec_from_file_location("_attnkit_docs_gallery", HERE / "gallery.py")
gallery = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gallery
_spec.loader.exec_module(gallery)

# What MathJax's tex-chtml component loads: itself, its fonts, and what it may load later (TeX extensions on
# first use of their macros, the menu's accessibility parts).
MATHJAX_PARTS = ("tex-chtml.js", "input", "output/chtml", "a11y", "ui", "sre", "adaptors")


def mathjax_dir() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax is missing: run `bash scripts/docs.sh` (it installs docs/requirements.txt)")
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").exists():
        raise RuntimeError(f"MathJax's tex-chtml.js is not in {es5}: reinstall django-static-mathjax")
    return es5


def on_config(config):
    nav = config.get("nav") or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and "Gallery" in item:
            nav[i] = {"Gallery": gallery.nav()}
    return config


def on_files(files, config):
    for path, text in gallery.pages().items():
        files.append(File.generated(config, path, content=text))
    bench = ROOT / "BENCHMARKS.md"
    if bench.exists():
        files.append(File.generated(config, "benchmarks.md", content=bench.read_text()))
    es5 = mathjax_dir()
    for part in MATHJAX_PARTS:
        src = es5 / part
        for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(es5).as_posix()
            files.append(
                File.generated(
                    config, f"assets/mathjax/{rel}", abs_src_path=str(f), inclusion=InclusionLevel.NOT_IN_NAV
                )
            )
    return files

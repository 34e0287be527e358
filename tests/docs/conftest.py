"""The documentation site's tests: the site is built (or reused when fresh), served on 127.0.0.1 and opened in
headless Chromium. `bash scripts/docs.sh` installs what they need; without it they fail and say so."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "site"
SETUP = "run `bash scripts/docs.sh` first (it installs docs/requirements.txt and Debian's chromium)"
# What the site is built from: site/ is reused only when it is newer than all of it.
SOURCES = ("mkdocs.yml", "docs", "src", "examples", "BENCHMARKS.md")


def pytest_configure(config):
    config.addinivalue_line("markers", "docs: the documentation site (needs `bash scripts/docs.sh`)")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docs)


def load_gallery():
    """docs/_gen/gallery.py, the generator the site's hook runs."""
    spec = importlib.util.spec_from_file_location("_attnkit_docs_gallery", ROOT / "docs" / "_gen" / "gallery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _require(module: str, what: str):
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{what} is not installed: {SETUP}", pytrace=False)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(f"chromium is not on PATH: {SETUP}", pytrace=False)
    return path


def _newest(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return max(times, default=0.0)


def site_is_fresh(site: Path = SITE) -> bool:
    index = site / "index.html"
    if not index.exists() or not (site / "gallery" / "index.html").exists():
        return False
    built = min(index.stat().st_mtime, (site / "gallery" / "index.html").stat().st_mtime)
    return all(_newest(ROOT / s) < built for s in SOURCES if (ROOT / s).exists())


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    for module, what in (
        ("mkdocs", "mkdocs"),
        ("material", "mkdocs-material"),
        ("mkdocstrings_handlers.python", "mkdocstrings[python]"),
        ("mathjax", "django-static-mathjax (MathJax)"),
    ):
        _require(module, what)
    if site_is_fresh():
        return SITE
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode:
        pytest.fail(f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}", pytrace=False)
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def base_url(site_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    _require("playwright", "playwright")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Visitor:
    """One browser page that records, per visit, console errors, page errors, failed responses and any request
    that leaves the local server (aborted: the site must work offline)."""

    def __init__(self, context, base: str):
        self.base = base
        self.page = context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("response", lambda r: self.errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        context.route("**/*", self._route)

    def _route(self, route):
        if route.request.url.startswith(self.base) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def visit(self, path: str):
        self.errors.clear()
        self.external.clear()
        response = self.page.goto(self.base + path, wait_until="load")
        # MathJax typesets after load; wait for it where the page has math.
        self.page.evaluate(
            "() => (window.MathJax && MathJax.startup && MathJax.startup.promise) ? "
            "MathJax.startup.promise.then(() => true) : true"
        )
        return response

    def broken_images(self) -> list[str]:
        return self.page.evaluate(
            "() => Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
        )

    def image_count(self) -> int:
        return self.page.evaluate("() => document.images.length")


@pytest.fixture(scope="session")
def visitor(browser, base_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield Visitor(context, base_url)
    context.close()

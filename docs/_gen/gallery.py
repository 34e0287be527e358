"""The gallery: one page per registry record and an index grouped by family, generated at build time.

``hooks.py`` (beside this file, named in mkdocs.yml) calls :func:`pages` and :func:`nav`; nothing here is
written to disk. Each record page holds what the registry says (name, family, kind, paper, exact or approximate,
supports, summary), the math (the docstring of the object the record documents, rendered by mkdocstrings), its
pictures (``docs/patterns/<name>.png`` from ``attnkit pictures``, ``docs/bench/<name>.png`` from the benchmark),
a runnable call, and its rows of the recorded benchmark (the Markdown tables of ``BENCHMARKS.md`` whose first
column is the record's name).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

N = 1024  # the sequence length of every runnable call
PREAMBLE = """import torch
import attnkit as ak

q = torch.randn(1, {hq}, {n}, 64)  # (batch, query heads, seq, dim)
k = torch.randn(1, {hkv}, {n}, 64)  # {hkv} key/value heads: grouped-query attention
v = torch.randn(1, {hkv}, {n}, 64)
"""


def registry():
    from attnkit import registry as reg

    return reg


def families() -> dict[str, str]:
    return {letter: title[0].upper() + title[1:] for letter, title in registry().FAMILIES.items()}


def records():
    return list(registry().records())


def page_path(rec) -> str:
    return f"gallery/{rec.name}.md"


# -- the object whose docstring holds the math ----------------------------------------------------------------


def _dotted(obj) -> str | None:
    obj = inspect.unwrap(obj) if callable(obj) else obj
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qual or "<" in qual:  # a lambda or a local function: no stable path
        return None
    return f"{module}.{qual}"


def module_of(path: str) -> str | None:
    """The module that defines ``path`` when it is a plain module (not a package's ``__init__``) with a
    docstring: its docstring usually states the rule or the math that the object's own docstring refers to."""
    import importlib
    import sys

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        if hasattr(mod, "__path__") or not (mod.__doc__ or "").strip():
            return None
        return name
    return None


def source_path(rec) -> str | None:
    """Dotted path of the object whose docstring documents the record (``rec.source``)."""
    return _dotted(rec.source) if rec.source is not None else None


# -- a runnable call --------------------------------------------------------------------------------------------


def snippet(rec) -> str:
    """Python that runs the record on random tensors (a policy: on SmolLM2), for the record page and the tests."""
    name = rec.name
    get = f'ak.registry.get("{name}")'
    if rec.kind == "policy":
        make = f"{get}.make({N}, model=model)"
        return (
            "import attnkit as ak\n"
            "import attnkit.hf\n"
            "from attnkit.models import load_smollm2\n\n"
            "model, tok = load_smollm2()  # SmolLM2-135M, offline (about 16 s)\n"
            f"# the policy for {N} tokens of context at a 1/4 KV budget\npolicy = {make}\n"
            "handle = attnkit.hf.apply(model, policy)\n"
            'enc = tok("Sinks are the first tokens. " * 8, return_tensors="pt")\n'
            "cache = handle.new_cache()  # per-head: evicted entries free memory\n"
            "out = model.generate(\n"
            "    **enc, past_key_values=cache, max_new_tokens=8, do_sample=False\n"
            ")\n"
            "print(tok.decode(out[0, enc.input_ids.shape[1]:]))\n"
            "handle.remove()  # the model is exactly as before\n"
        )
    if rec.kind == "pruner" and getattr(rec.source, "__module__", "").endswith("encoder_prune"):
        return (
            "import attnkit as ak\n"
            "import attnkit.hf\n"
            "from attnkit.hf.encoder_prune import pruned_encode\n"
            "from attnkit.models import load_minilm\n\n"
            "model, tok = load_minilm()  # all-MiniLM-L6-v2, offline\n"
            f"pruner = {get}.make({N}, model=model, budget=0.5)\n"
            'enc = tok(["A passage to embed with half of its tokens. " * 12], return_tensors="pt")\n'
            "res = pruned_encode(model, enc, pruner=pruner)\n"
            "print(res.embedding.shape, res.tokens_per_layer)  # tokens leave mid-encoder\n"
        )
    if rec.kind == "pruner":
        return (
            "import torch\n"
            "import attnkit as ak\n"
            "import attnkit.hf\n"
            "from attnkit.models import load_smollm2\n\n"
            "model, tok = load_smollm2()  # SmolLM2-135M, offline (about 16 s)\n"
            f"pruner = {get}.make({N}, model=model, budget=0.5)\n"
            'ids = tok("A passage to prune. " * 40 + "What was it about?", return_tensors="pt").input_ids\n'
            "res = attnkit.hf.pruned_forward(model, ids, span=(0, 160), pruner=pruner)\n"
            "print(res.tokens_per_layer, res.seconds)  # the span's tokens really leave\n"
        )
    if rec.kind == "intervention":
        return (
            "import attnkit as ak\n"
            "import attnkit.hf\n"
            "from attnkit.models import load_smollm2\n\n"
            "model, tok = load_smollm2()  # SmolLM2-135M, offline (about 16 s)\n"
            f"steer = {get}.make({N}, model=model)  # a policy holding the intervention\n"
            'enc = tok("Sinks are the first tokens. " * 4, return_tensors="pt")\n'
            "with attnkit.hf.applied(model, steer):\n"
            "    out = model.generate(**enc, max_new_tokens=8, do_sample=False)\n"
            "print(tok.decode(out[0, enc.input_ids.shape[1]:]))\n"
        )
    if rec.kind == "analysis":
        tool = rec.make(N)
        head = (
            "import attnkit as ak\n"
            "import attnkit.analysis\n"
            "from attnkit.models import load_smollm2\n\n"
            "model, tok = load_smollm2()  # SmolLM2-135M, offline (about 16 s)\n"
            f"tool = {get}.make({N}, model=model)\n"
        )
        if hasattr(tool, "run"):
            return head + (
                "scores = tool.run(model, tok)  # one forward (or one generation), no N x N map\n"
                "print(scores.top(5) if hasattr(scores, 'top') else scores.markdown())\n"
            )
        fn = getattr(tool, "__name__", name)
        return head + (
            f"# tool is attnkit.analysis.{fn}: its call and arguments are under The math below;\n"
            "# `attnkit analyze --task ioi|induction|needle|text` runs it on generated prompts\n"
            "help(tool)\n"
        )
    if rec.kind == "module":
        layer = rec.make(256)
        dim = getattr(layer, "dim", 64)
        return (
            "import torch\n"
            "import attnkit as ak\n\n"
            f"layer = {get}.make(256)  # over (batch, tokens, {dim})\n"
            f"x = torch.randn(2, 256, {dim}, requires_grad=True)\n"
            "y = layer(x)\n"
            "y.sum().backward()\n"
            "print(tuple(y.shape))\n"
        )
    if rec.kind == "layer":
        layer = rec.make(256, dim=64, heads=4)
        code = (
            "import torch\n"
            "import attnkit as ak\n\n"
            f"layer = {get}.make(256, dim=64, heads=4)  # over (batch, tokens, 64)\n"
            "x = torch.randn(2, 256, 64, requires_grad=True)\n"
            "y = layer(x)\n"
            "y.sum().backward()\n"
            "print(tuple(y.shape))\n"
        )
        if "decode" in rec.supports and hasattr(layer, "make_cache"):
            code += (
                "# decode: the prompt, then one token at a time over the cache\n"
                "cache = layer.make_cache(2, 257)\n"
                "with torch.no_grad():\n"
                "    layer(x, cache=cache)\n"
                "    step = layer(torch.randn(2, 1, 64), cache=cache)\n"
                "print(cache.length, cache.bytes_per_token, 'bytes per token')\n"
            )
        return code
    if rec.kind == "task" and "spatial" in rec.supports:
        what = "a fifth held out" if rec.name == "digits" else "generated by seed (the quality suite's are 12 x 12)"
        return (
            "import attnkit as ak\n\n"
            f"task = {get}.make(64, seed=0)  # 8 x 8 images, {what}\n"
            "images, labels = task.batch(8, step=0)  # numpy (8, 8, 8, 1) in [0, 1], (8,) class indices\n"
            "print(images.shape, task.classes, 'classes,', len(task.test_labels), 'held-out images')\n"
            "# `attnkit bench --suite quality` trains a small ViT per 2-D mechanism on it\n"
        )
    if rec.kind == "task" and "cross" in rec.supports:
        return (
            "import attnkit as ak\n\n"
            f"task = {get}.make(64, seed=0)  # a source of 64 tokens and a target that cross-attends it\n"
            "source, inputs, targets = task.batch(8, step=0)  # numpy (8, 64), (8, n_target), (8, n_target)\n"
            "print(source.shape, inputs.shape, task.classes, 'answers; causal:', task.causal)\n"
            "# `attnkit bench --suite quality` trains a small cross-attention model per mechanism on it\n"
        )
    if rec.kind == "task":
        return (
            "import attnkit as ak\n\n"
            f"task = {get}.make(64, seed=0)  # sequences of 64 tokens, generated here\n"
            "inputs, targets = task.batch(8, step=0)  # numpy (8, 64); targets -100 where nothing is scored\n"
            "print(inputs.shape, task.vocab, (targets != -100).sum(), 'scored positions')\n"
            "# `attnkit bench --suite quality` trains a small model per mechanism on it\n"
        )
    if rec.kind == "pattern":
        pat = rec.make(N)
        n = getattr(pat, "fixed_length", None) or N
        hq = getattr(pat, "num_heads", None) or 8
        code = PREAMBLE.format(hq=hq, hkv=2 if hq % 2 == 0 else 1, n=n)
        notes = ""
        if n != N:
            notes += f"# a spatial pattern chooses its grid: pat.fixed_length = {n} tokens\n"
        if hq != 8:
            notes += f"# a per-head pattern: pat.num_heads = {hq} query heads\n"
        return (
            code
            + notes
            + f"pat = {get}.make({N})\n"
            + "out = ak.attention(q, k, v, pattern=pat)\n"
            + "print(ak.explain(q, k, v, pattern=pat))\n"
        )
    code = PREAMBLE.format(hq=8, hkv=2, n=N)
    if rec.kind == "function":
        return code + f"m = {get}.make({N})\nout = m(q, k, v)\nprint(tuple(out.shape))\n"
    if rec.kind == "selector":
        causal = "causal" in rec.supports
        shape = "heads=8, kv_heads=2, head_dim=64"
        make = f"{get}.make(\n    {N}, budget=0.125, {shape}\n)"
        code += f"# a budget of 1/8 of the key blocks\nsel = {make}\n"
        return (
            code
            + f"out = ak.attention(q, k, v, pattern=sel, causal={causal})  # selects, then attends\n"
            + f"print(ak.explain(q, k, v, pattern=sel, causal={causal}))  # selection cost, density, kernel\n"
        )
    return code + f"obj = {get}.make({N})\n"


# -- the recorded benchmark -------------------------------------------------------------------------------------


@dataclass
class Table:
    where: str  # "Recorded benchmark › All measurements"
    header: str
    rows: list[str]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def bench_tables(text: str) -> list[Table]:
    """Every Markdown table of BENCHMARKS.md with the headings it stands under."""
    tables: list[Table] = []
    h1 = h2 = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# "):
            h1, h2 = line[2:].strip(), ""
        elif line.startswith("## "):
            h2 = line[3:].strip()
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            header = line.rstrip()
            j = i + 2
            rows = []
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(lines[j].rstrip())
                j += 1
            tables.append(Table(" › ".join(x for x in (h1, h2) if x), header, rows))
            i = j
            continue
        i += 1
    return tables


def bench_rows(name: str, tables: list[Table]) -> list[Table]:
    out = []
    for t in tables:
        rows = [r for r in t.rows if _cells(r)[0].strip("`*") == name]
        if rows:
            out.append(Table(t.where, t.header, rows))
    return out


def _read_bench() -> list[Table]:
    path = ROOT / "BENCHMARKS.md"
    return bench_tables(path.read_text()) if path.exists() else []


# -- pictures ---------------------------------------------------------------------------------------------------


def pictures(name: str) -> list[str]:
    """Paths relative to docs/ of the record's pictures."""
    found = []
    for folder in ("patterns", "bench"):
        p = DOCS / folder / f"{name}.png"
        if p.exists():
            found.append(f"{folder}/{name}.png")
    return found


# -- pages ------------------------------------------------------------------------------------------------------


def _family_label(letter: str, fam: dict[str, str]) -> str:
    return f"{letter} · {fam.get(letter, 'unlisted')}"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


def record_page(rec, tables: list[Table], fam: dict[str, str]) -> str:
    supports = ", ".join(f"`{s}`" for s in sorted(rec.supports)) or "—"
    lines = [
        f"# {rec.name}",
        "",
        f"{rec.summary}.",
        "",
        f"| name | `{rec.name}` |",
        "|---|---|",
        f"| family | [{_family_label(rec.family, fam)}](index.md#family-{rec.family.lower()}) |",
        f"| kind | {rec.kind} |",
        f"| paper | {_esc(rec.paper)} |",
        f"| exact | {'exact' if rec.exact else 'approximate'} |",
        f"| supports | {supports} |",
        f"| summary | {_esc(rec.summary)} |",
        "",
    ]
    pics = pictures(rec.name)
    if pics:
        lines += ["## Pictures", ""]
        for p in pics:
            what = (
                "its mask at 64 tokens, drawn by `attnkit pictures`"
                if p.startswith("patterns/")
                else f"its timings in the recorded benchmark (`docs/{p}`)"
            )
            lines += [f"![{rec.name}: {what}](../{p})", "", f"*{what}*", ""]
    lines += ["## Run it", "", "```python", snippet(rec).rstrip(), "```", ""]
    src = source_path(rec)
    lines += ["## The math", ""]
    if src:
        # No heading: the API reference holds the object's anchor, this page only shows its docstring.
        lines += [
            f'From the docstring of <autoref identifier="{src}" optional><code>{src}</code></autoref>:',
            "",
            f"::: {src}",
            "    options:",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "      heading_level: 3",
            "      members: false",
            "      show_bases: false",
            "",
        ]
        # A pattern's module docstring holds its picture and conventions; a source shared by several records
        # (the linear engine) documents them all in its module.
        module = module_of(src)
        if module:
            lines += [
                f"From the docstring of its module, `{module}`:",
                "",
                f"::: {module}",
                "    options:",
                "      show_root_heading: false",
                "      show_root_toc_entry: false",
                "      heading_level: 3",
                "      members: false",
                "",
            ]
    elif rec.kind == "policy":
        lines += [
            "A policy is made from a model, so the gallery does not make one to find its class; its classes and",
            "their docstrings are in the [`attnkit.hf` reference](../reference/hf.md).",
            "",
        ]
    else:
        lines += ["No docstring is recorded for this mechanism yet.", ""]
    lines += ["## Recorded benchmark", ""]
    found = bench_rows(rec.name, tables)
    if not found:
        lines += ["Not in the recorded benchmark.", ""]
    for t in found:
        lines += [f"**{t.where}**", "", t.header, "|" + "---|" * len(_cells(t.header)), *t.rows, ""]
    if found:
        lines += ["All of it, with the command that produced it: [the recorded benchmark](../benchmarks.md).", ""]
    return "\n".join(lines)


def index_page(recs, fam: dict[str, str]) -> str:
    lines = [
        "# Gallery",
        "",
        f"Every mechanism in the registry ({len(recs)} records), grouped by family. This page and the one per",
        "record are generated from `attnkit.registry` each time the site is built, so they list exactly what",
        "`attnkit list` prints.",
        "",
    ]
    by_family: dict[str, list] = {}
    for r in recs:
        by_family.setdefault(r.family, []).append(r)
    for letter in list(fam) + sorted(set(by_family) - set(fam)):
        group = by_family.get(letter, [])
        lines += [f"## {_family_label(letter, fam)} {{#family-{letter.lower()}}}", ""]
        if not group:
            lines += ["Nothing registered in this family yet.", ""]
            continue
        thumbs = any(pictures(r.name) for r in group)
        lines += [
            "| name |" + (" picture |" if thumbs else "") + " exact | summary | paper |",
            "|---|" + ("---|" if thumbs else "") + "---|---|---|",
        ]
        for r in group:
            pics = pictures(r.name)
            pic = f" [![{r.name}](../{pics[0]}){{ .thumb }}]({r.name}.md) |" if pics else " |"
            lines.append(
                f"| [{r.name}]({r.name}.md) |" + (pic if thumbs else "") + f" {'exact' if r.exact else 'approx.'} | "
                f"{_esc(r.summary)} | {_esc(r.paper)} |"
            )
        lines.append("")
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """``{path under docs/: Markdown}`` for the gallery."""
    recs = records()
    fam = families()
    tables = _read_bench()
    out = {"gallery/index.md": index_page(recs, fam)}
    for r in recs:
        out[page_path(r)] = record_page(r, tables, fam)
    return out


def nav() -> list:
    """The gallery's part of the navigation: the index, then one section per family with records."""
    fam = families()
    by_family: dict[str, list] = {}
    for r in records():
        by_family.setdefault(r.family, []).append(r)
    items: list = ["gallery/index.md"]
    for letter in list(fam) + sorted(set(by_family) - set(fam)):
        if by_family.get(letter):
            items.append({_family_label(letter, fam): [{r.name: page_path(r)} for r in by_family[letter]]})
    return items

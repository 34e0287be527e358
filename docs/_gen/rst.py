"""Turn the RST that attnkit's docstrings use into the Markdown that mkdocstrings renders.

The docstrings are Google-style (``Args:`` / ``Returns:``) with a few RST constructs inside; this module rewrites
exactly those, and nothing else:

* ``.. math::`` blocks (the body indented below, or begun on the directive's line) -> ``$$ ... $$`` blocks
  (one per blank-line-separated equation), rendered by ``pymdownx.arithmatex`` and MathJax;
* ``:math:`x``` -> ``$x$``;
* ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:`` -> an optional
  cross-reference (a link where the API reference documents the target, code otherwise; never a warning);
* RST simple tables (``====  ====`` borders) -> Markdown tables;
* literal blocks introduced by ``::`` -> fenced ``text`` blocks; doctest blocks (``>>>``) -> fenced ``pycon``.

It has no dependencies so that the griffe extension and the tests can import it by path.
"""

from __future__ import annotations

import re
import textwrap

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj):`(~?)([^`<]+?)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<ind>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
_BORDER = re.compile(r"^[ \t]*=+(?:[ \t]+=+)+[ \t]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _role(m: re.Match, resolve=None) -> str:
    kind, tilde, target = m.group(1), m.group(2), m.group(3).strip()
    name = target.rstrip("()")
    title = name.rsplit(".", 1)[-1] if tilde else name
    if kind in ("func", "meth"):
        title += "()"
    ident = (resolve(name) if resolve else None) or name
    return f'<autoref identifier="{ident}" optional><code>{title}</code></autoref>'


def _inline(text: str, resolve=None) -> str:
    text = _MATH_ROLE.sub(lambda m: "$" + m.group(1).strip() + "$", text)
    return _ROLE.sub(lambda m: _role(m, resolve), text)


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        ind = m.group("ind")
        base = len(ind)
        body = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        # one $$ block per equation (RST separates equations by blank lines)
        equations: list[list[str]] = [[]]
        for line in body:
            if line.strip():
                equations[-1].append(line.strip())
            elif equations[-1]:
                equations.append([])
        if out and out[-1].strip():
            out.append("")
        for eq in equations:
            if eq:
                out += [ind + "$$", *(ind + line for line in eq), ind + "$$", ""]
        if i < len(lines) and lines[i].strip() and out and out[-1] != "":
            out.append("")
    return out


def _table(rows: list[str], resolve=None) -> list[str] | None:
    """An RST simple table (its lines, borders included) as Markdown, or None if it is not one."""
    border = rows[0]
    ind = _indent(border)
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
    borders = [j for j, r in enumerate(rows) if _BORDER.match(r)]
    if len(borders) < 2:
        return None

    def cells(line: str) -> list[str]:
        out = []
        for c, (a, _b) in enumerate(spans):
            end = spans[c + 1][0] if c + 1 < len(spans) else len(line)
            out.append(line[a:end].strip())
        return out

    header = [cells(r) for r in rows[1 : borders[1]]] if len(borders) >= 3 else []
    body_start = borders[1] + 1 if len(borders) >= 3 else 1
    body: list[list[str]] = []
    for r in rows[body_start:]:
        if _BORDER.match(r) or not r.strip():
            continue
        c = cells(r)
        if body and not c[0]:  # a continuation line: the first column is empty
            body[-1] = [(a + " " + b).strip() for a, b in zip(body[-1], c, strict=True)]
        else:
            body.append(c)
    head = [" ".join(col).strip() for col in zip(*header, strict=True)] if header else [""] * len(spans)
    pad = " " * ind

    def row(cs):
        return pad + "| " + " | ".join(_inline(x, resolve) for x in cs) + " |"

    return [row(head), pad + "|" + "---|" * len(spans), *(row(b) for b in body)]


def _tables(lines: list[str], resolve=None) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if _BORDER.match(lines[i]):
            j = i + 1
            borders = 1
            while j < len(lines) and lines[j].strip() and borders < 3:
                if _BORDER.match(lines[j]):
                    borders += 1
                j += 1
            md = _table(lines[i:j], resolve)
            if md is not None:
                if out and out[-1].strip():
                    out.append("")
                out += md
                if j < len(lines) and lines[j].strip():
                    out.append("")
                i = j
                continue
        out.append(lines[i])
        i += 1
    return out


def _literals(lines: list[str]) -> list[str]:
    """``text::`` + an indented block -> ``text:`` + a fenced block; ``>>>`` runs -> fenced pycon."""
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        stripped = line.strip()
        if stripped.startswith(">>>"):
            ind = " " * _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(ind) :] if lines[i].startswith(ind) else lines[i].strip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [ind + "```pycon", *(ind + b for b in block), ind + "```"]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > base:
                block = []
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
                    block.append(lines[k])
                    k += 1
                while block and not block[-1].strip():
                    block.pop()
                head = line.rstrip()[:-2].rstrip()
                if head.strip():
                    out.append(head + ":")
                ind = " " * base
                code = textwrap.dedent("\n".join(block)).splitlines()
                out += ["", ind + "```text", *(ind + c if c else "" for c in code), ind + "```"]
                if k < len(lines) and lines[k].strip():
                    out.append("")
                i = k
                continue
        out.append(line)
        i += 1
    return out


def rst_to_markdown(text: str, resolve=None) -> str:
    """The Markdown of one (dedented) docstring. ``resolve(name)`` may turn a role's target (``LinearState``)
    into the full path the API reference documents it under (``attnkit.linear.engine.LinearState``)."""
    if not text:
        return text
    lines = text.splitlines()
    lines = _math_blocks(lines)
    lines = _tables(lines, resolve)
    lines = _literals(lines)
    # inline roles everywhere except inside fenced blocks and $$ blocks
    out, fenced, math = [], False, False
    for line in lines:
        s = line.strip()
        if _FENCE.match(line):
            fenced = not fenced
        elif s == "$$" and not fenced:
            math = not math
        elif not fenced and not math and not s.startswith("|"):
            line = _inline(line, resolve)
        out.append(line)
    return "\n".join(out)

"""A griffe extension (loaded by mkdocstrings, see mkdocs.yml): rewrite the RST inside attnkit's Google-style
docstrings as Markdown before mkdocstrings parses and renders them (``rst.py`` beside this file says what)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import griffe

_spec = importlib.util.spec_from_file_location("_attnkit_docs_rst", Path(__file__).with_name("rst.py"))
rst = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rst
_spec.loader.exec_module(rst)


def _resolver(obj):
    """Resolve a role's bare target (``LinearState``, ``probs``) from where the docstring stands."""

    def resolve(name: str):
        if "." in name:
            return None
        scopes = []
        o = obj
        while o is not None:
            scopes.append(o)
            o = o.parent
        for scope in scopes:
            try:
                member = scope.members.get(name)
            except Exception:  # noqa: BLE001 - an unresolvable alias: leave the name as it is
                member = None
            if member is not None:
                try:
                    return member.target_path if member.is_alias else member.path
                except Exception:  # noqa: BLE001
                    return member.path
        return None

    return resolve


class RstToMarkdown(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        seen = set()

        def walk(obj):
            if obj.is_alias or id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None and not getattr(obj.docstring, "_attnkit_md", False):
                obj.docstring.value = rst.rst_to_markdown(obj.docstring.value, _resolver(obj))
                obj.docstring._attnkit_md = True
            for member in list(obj.members.values()):
                walk(member)

        walk(pkg)

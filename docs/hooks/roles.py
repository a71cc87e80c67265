"""A mkdocs hook: the docstrings' Sphinx-style cross-references (``:func:`igrad.gradient```, ``:class:`~a.B```)
rendered as links to the API reference where the target is documented there, else as code. mkdocstrings
renders a docstring as Markdown, so a role arrives in the page as ``:func:<code>name</code>``."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj|const)[:`]?\s*<code>~?([\w.]+)(\(\))?</code>")
_ANCHOR = re.compile(r'id="(igrad[\w.]*)"')
#: The sections of docs/method.md the docstrings cite ("docs/method.md §Metrics"), with their anchors.
_SECTIONS = {
    "The loss": "the-loss",
    "Networks and recipes": "networks-and-recipes",
    "Saliency methods": "saliency-methods",
    "Metrics": "metrics",
    "The reproduction table": "the-reproduction-table",
}
_METHOD = re.compile(r"docs/method\.md(?: §(" + "|".join(map(re.escape, _SECTIONS)) + "))?")
_anchors: set[str] = set()


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Record the API page's anchors; replace each role by a link (on the API page) or by its code."""
    if page.file.src_uri == "api.md":
        _anchors.update(_ANCHOR.findall(html))

    def link(m: re.Match[str]) -> str:
        target = m.group(1)
        shown = m.group(0).split("<code>", 1)[1].split("</code>", 1)[0]
        short = shown.lstrip("~").rsplit(".", 1)[-1] if shown.startswith("~") else shown
        for candidate in (target, f"igrad.{target}"):
            if candidate in _anchors and page.file.src_uri == "api.md":
                return f'<a href="#{candidate}"><code>{short}</code></a>'
        return f"<code>{short}</code>"

    def method(m: re.Match[str]) -> str:
        anchor = f"#{_SECTIONS[m.group(1)]}" if m.group(1) else ""
        depth = "../" * page.file.src_uri.count("/") + ("../" if page.file.src_uri != "index.md" else "")
        return f'<a href="{depth}method/{anchor}">{m.group(0)}</a>'

    return _METHOD.sub(method, _ROLE.sub(link, html))

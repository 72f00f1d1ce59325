"""The views and named analyses as Markdown: the README's reference is generated from here.

``python -m query.catalogue`` rewrites the README between its ``<!-- catalogue:... -->``
markers; a test fails when the README and the code disagree, so the documented columns are
always the ones a query gets.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from query.analyses import list_analyses
from query.views import VIEWS

MARKERS = ("views", "analyses")


def views_markdown() -> str:
    """Every view: what one row is, then its columns with type and meaning."""
    out = []
    for v in VIEWS:
        out.append(f"**`{v.name}`**{' (lazy)' if v.heavy else ''}: {v.doc}.\n")
        out.append("| column | type | meaning |\n|---|---|---|")
        out += [f"| `{c.name}` | {c.type} | {c.doc.replace('|', '/')} |" for c in v.columns]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def analyses_markdown() -> str:
    """Every named analysis: description, parameters with defaults, result columns."""
    out = []
    for a in list_analyses():
        out.append(f"**`{a.name}`**: {a.description}\n")
        if a.params:
            ps = "; ".join(
                f"`{p.name}` {p.type}{_choices(p.choices)} = {'NULL' if p.default is None else repr(p.default)} ({p.doc})"
                for p in a.params
            )
            out.append(f"Parameters: {ps}.\n")
        out.append("Columns: " + ", ".join(f"`{c[0]}`" for c in a.columns) + ".\n")
    return "\n".join(out).rstrip() + "\n"


def _choices(choices: tuple[str, ...]) -> str:
    return " {" + ", ".join(choices) + "}" if choices else ""


def render(name: str) -> str:
    return {"views": views_markdown, "analyses": analyses_markdown}[name]()


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- catalogue:{name} -->\n)(.*?)(<!-- /catalogue:{name} -->)", re.S)


def section(readme: str, name: str) -> str | None:
    """The README's current text between the markers of ``name`` (None: no markers)."""
    m = _block(name).search(readme)
    return m.group(2) if m else None


def update(readme: str) -> str:
    for name in MARKERS:
        readme = _block(name).sub(lambda m, n=name: m.group(1) + render(n) + m.group(3), readme)
    return readme


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path("README.md")
    text = path.read_text(encoding="utf-8")
    new = update(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

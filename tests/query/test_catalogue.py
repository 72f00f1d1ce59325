"""The README's view and analysis reference is the code's own metadata, word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

from query import VIEWS, list_analyses
from query.catalogue import MARKERS, render, section, update

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", MARKERS)
def test_readme_reference_is_up_to_date(name: str) -> None:
    got = section(README.read_text(encoding="utf-8"), name)
    assert got is not None, f"README.md lacks the <!-- catalogue:{name} --> markers"
    assert got == render(name), "README.md is stale: run `.venv/bin/python -m query.catalogue`"


def test_every_view_column_and_analysis_is_documented() -> None:
    views, analyses = render("views"), render("analyses")
    for v in VIEWS:
        assert f"**`{v.name}`**" in views
        for c in v.columns:
            assert f"| `{c.name}` | {c.type} |" in views, (v.name, c.name)
    for a in list_analyses():
        assert f"**`{a.name}`**: {a.description}" in analyses
        for p in a.params:
            choices = " {" + ", ".join(p.choices) + "}" if p.choices else ""
            assert f"`{p.name}` {p.type}{choices} =" in analyses, (a.name, p.name)


def test_update_replaces_only_between_markers() -> None:
    text = "intro\n<!-- catalogue:views -->\nold\n<!-- /catalogue:views -->\noutro\n"
    new = update(text)
    assert new.startswith("intro\n<!-- catalogue:views -->\n") and new.endswith("<!-- /catalogue:views -->\noutro\n")
    assert "old" not in new and "**`prompts`**" in new

"""The view registry: declared types are DuckDB's, every light view has one loader, and
registering a kind refuses what would make the catalogue ambiguous."""

from __future__ import annotations

import pytest

from query import registry
from query.columns import PROMPT, Column, T
from query.light import LIGHT
from query.registry import View, ViewKind
from query.views import VIEWS
from query.warehouse import Warehouse
from tests.query.conftest import D


def test_declared_types_are_the_types_duckdb_reports(wh: Warehouse) -> None:
    for v in VIEWS:
        got = [str(t) for t in wh.con.sql(f"SELECT * FROM {v.name} LIMIT 0").types]
        want = [str(c.type).replace("[D]", f"[{D}]") for c in v.columns]
        assert got == want, v.name


def test_every_light_view_has_exactly_one_loader() -> None:
    assert sorted(LIGHT) == sorted(v.name for v in VIEWS if v.is_light)
    assert all(v.heavy is not None or v.sql for v in VIEWS if v.name not in LIGHT)


def test_the_catalogue_holds_every_registered_view_once() -> None:
    assert len(VIEWS) == len({v.name for v in VIEWS}) and set(VIEWS) == set(registry.views())


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch) -> list[ViewKind]:
    """The registry as it is, on a copy that the test may extend."""
    kinds = list(registry.kinds())
    monkeypatch.setattr(registry, "_KINDS", list(kinds))
    return kinds


def _light(name: str) -> View:
    return View(name, "a test view", (PROMPT, Column("x", T.FLOAT, "a number")))


def test_a_new_kind_joins_the_catalogue_where_listed(fresh: list[ViewKind]) -> None:
    derived = View("edges_total", "derived", (PROMPT,), depends=("edges", "prompts"), sql="SELECT 1")
    kind = registry.register(ViewKind("task_vectors", (_light("edges"), derived), light={"edges": lambda s: None}))
    views = registry.catalogue((*fresh, kind))
    assert [v.name for v in views[-2:]] == ["edges", "edges_total"]
    assert registry.light_loaders()["edges"] is kind.light["edges"]


@pytest.mark.parametrize(("kind", "message"), [
    (ViewKind("sinks", (_light("other"),), loaders_in="elsewhere"), "registered twice"),
    (ViewKind("new", (_light("prompts"),), loaders_in="elsewhere"), "already taken: prompts"),
    (ViewKind("new", (_light("a"), _light("a")), loaders_in="elsewhere"), "already taken: a"),
    (ViewKind("new", (_light("a"),), light={"a": print, "b": print}), "not its light views: b"),
    (ViewKind("new", (View("d", "derived", (PROMPT,), sql="SELECT 1"),), light={"d": print}), "not its light views: d"),
    (ViewKind("new", (_light("a"), _light("b")), light={"a": print}), "light views without a loader: b"),
])
def test_register_refuses(fresh: list[ViewKind], kind: ViewKind, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.register(kind)
    assert registry.kinds() == tuple(fresh)


def test_catalogue_refuses_a_missing_kind_or_an_unknown_dependency(fresh: list[ViewKind]) -> None:
    kind = registry.register(ViewKind("new", (View("d", "derived", (PROMPT,), depends=("nosuch",), sql="SELECT 1"),)))
    with pytest.raises(ValueError, match="must list every registered kind"):
        registry.catalogue(fresh)
    with pytest.raises(ValueError, match="depends on unknown views nosuch"):
        registry.catalogue((*fresh, kind))


def test_a_column_type_is_a_sql_type() -> None:
    with pytest.raises(TypeError, match="SqlType"):
        Column("x", "INTEGER", "a number")  # type: ignore[arg-type]
    assert Column("x", T.INTEGER, "a number").type == "INTEGER"  # prints as DuckDB's name

"""The differential query corpus: hand-written statements (corpus.sql) plus a seeded generator.

The generator composes statements from the views' declared columns: filters with
comparisons, IN lists, BETWEEN, IS [NOT] NULL, OR / NOT and expressions on columns; aliases
and columns renamed by position (with names that collide with the view's own); the same view
twice with different predicates; CTEs; UNION / EXCEPT; correlated and uncorrelated
subqueries; ``query_table`` and ``query``. Results are made deterministic (no LIMIT without a
total ORDER BY), so two correct engines must agree.
"""

from __future__ import annotations

import random
from pathlib import Path

import duckdb

from query.views import VIEWS, View

HAND = Path(__file__).with_name("corpus.sql")
SEED = 8  # issue 8; change only to grow the corpus, never to hide a failure
N_GENERATED = 320

# small constants around the tiny warehouse's ranges (L = 3, H = 3, T = 5, 4 prompts)
_INTS = [-2, -1, 0, 1, 2, 3, 4, 5]
_FLOATS = ["-0.5", "0.0", "0.1", "0.3", "0.5", "0.9", "2.0"]
_STRINGS = ["'cat'", "'dog'", "'zero'", "'mean'", "'head'", "'attn'", "'mlp'", "'embed'", "'word'", "'last'"]
HEAVY = [v for v in VIEWS if v.heavy is not None]
# the circuit and task-vector views are empty in the corpus' warehouse (no --circuits or
# --task-vectors): their own tests (test_circuits.py, test_taskvec_views.py) check them on data
LIGHT = [v for v in VIEWS if v.heavy is None and not v.name.startswith(("circuit_", "taskvec_"))]


def hand_written() -> list[str]:
    """The statements of corpus.sql, split by DuckDB's own parser."""
    con = duckdb.connect()
    try:
        return [s.query.strip() for s in con.extract_statements(HAND.read_text(encoding="utf-8"))]
    finally:
        con.close()


class Gen:
    """Random statements from one seeded ``random.Random``."""

    def __init__(self, seed: int = SEED) -> None:
        self.r = random.Random(seed)

    def pick(self, xs: list) -> object:
        return self.r.choice(xs)

    # -- predicates -----------------------------------------------------------------------------
    def atom(self, v: View, q: str = "", names: dict[str, str] | None = None) -> str:
        """One condition on a column of ``v`` (``q``: qualifier, ``names``: renamed columns)."""
        names = names or {}
        col = self.pick([c for c in v.columns if c.type != "FLOAT[D]"] or list(v.columns))
        ref = f"{q}{names.get(col.name, col.name)}"
        r = self.r.random()
        if col.type in ("INTEGER", "TINYINT"):
            a, b = sorted(self.r.sample(_INTS, 2))
            forms = [f"{ref} = {a}", f"{ref} <> {a}", f"{ref} < {b}", f"{ref} >= {a}", f"{a} = {ref}",
                     f"{ref} IN ({', '.join(map(str, self.r.sample(_INTS, 3)))})",
                     f"{ref} NOT IN ({a}, {b})", f"{ref} BETWEEN {a} AND {b}", f"{ref} IS NULL",
                     f"{ref} IS NOT NULL", f"{ref} + 1 = {b}", f"{ref} % 2 = {abs(a) % 2}",
                     f"abs({ref} - 1) <= {abs(a)}", f"{ref} IN ({a}, NULL)", f"coalesce({ref}, -9) = {a}",
                     f"{ref}::VARCHAR = '{a}'", f"{ref} * 2 > {b}"]
            return forms[int(r * len(forms))]
        if col.type in ("FLOAT", "DOUBLE"):
            x = self.pick(_FLOATS)
            return self.pick([f"{ref} > {x}", f"{ref} <= {x}", f"round({ref}, 1) = {x}", f"{ref} IS NOT NULL"])
        if col.type == "VARCHAR":
            s = self.pick(_STRINGS)
            return self.pick([f"{ref} = {s}", f"{ref} <> {s}", f"{ref} LIKE '%a%'", f"{ref} IS NULL",
                              f"{ref} IN ({s}, {self.pick(_STRINGS)})"])
        if col.type == "BOOLEAN":
            return self.pick([ref, f"NOT {ref}", f"{ref} IS NOT DISTINCT FROM true"])
        return f"{ref}[1] > {self.pick(_FLOATS)}"  # a vector's first component

    def pred(self, v: View, q: str = "", names: dict[str, str] | None = None, depth: int = 0) -> str:
        r = self.r.random()
        if depth < 2 and r < 0.45:
            op = self.pick([" AND ", " AND ", " OR "])
            return f"({self.pred(v, q, names, depth + 1)}{op}{self.pred(v, q, names, depth + 1)})"
        if depth < 2 and r < 0.52:
            return f"NOT ({self.pred(v, q, names, depth + 1)})"
        return self.atom(v, q, names)

    # -- outputs ---------------------------------------------------------------------------------
    def output(self, v: View, q: str = "", names: dict[str, str] | None = None) -> str:
        names = names or {}
        ints = [names.get(c.name, c.name) for c in v.columns if c.type in ("INTEGER", "TINYINT")]
        floats = [names.get(c.name, c.name) for c in v.columns if c.type in ("FLOAT", "DOUBLE")]
        vecs = [names.get(c.name, c.name) for c in v.columns if c.type == "FLOAT[D]"]
        outs = ["count(*)"]
        if ints:
            i = self.pick(ints)
            outs += [f"sum({q}{i})", f"count(DISTINCT {q}{i})", f"min({q}{i})",
                     f"list(DISTINCT {q}{i} ORDER BY {q}{i})"]
        if floats:
            outs.append(f"sum({q}{self.pick(floats)})")
        if vecs:
            outs.append(f"sum({q}{vecs[0]}[1])")
        return f"{self.pick(outs)}, count(*)"

    # -- statements ------------------------------------------------------------------------------
    def view(self, heavy_bias: float = 0.75) -> View:
        return self.pick(HEAVY if self.r.random() < heavy_bias else LIGHT)

    def renamed(self, v: View) -> tuple[str, dict[str, str]]:
        """``alias(c1, c2, ...)`` renaming the first columns, often to another column's name."""
        n = self.r.randint(1, min(3, len(v.columns)))
        pool = list(v.names)
        new = []
        for c in v.names[:n]:
            choice = self.pick([x for x in pool if x not in new] + [f"{c}_x"])
            new.append(choice)
        names = dict(zip(v.names[:n], new, strict=True))
        # a later column keeps its name unless that name is taken: DuckDB renames it (name_1)
        return f"t({', '.join(new)})", names

    def statement(self) -> str:
        kind = self.r.randrange(10)
        v = self.view()
        if kind in (2, 5, 7, 8, 9) and "prompt" not in v.names:
            v = self.pick([x for x in HEAVY + LIGHT if "prompt" in x.names])
        if kind == 0:  # plain filter, maybe aliased
            q = self.pick(["", "t."])
            alias = " t" if q else ""
            return f"SELECT {self.output(v, q)} FROM {v.name}{alias} WHERE {self.pred(v, q)}"
        if kind == 1:  # renamed columns: only predicates on the renamed names or untouched ones
            alias, names = self.renamed(v)
            untouched = [c for c in v.columns if c.name not in names and c.name not in names.values()]
            keep = View(v.name, v.doc, tuple(c for c in v.columns if c.name in names) + tuple(untouched))
            return f"SELECT count(*), {self.output(keep, 't.', names)} FROM {v.name} {alias} WHERE {self.pred(keep, 't.', names)}"
        if kind == 2:  # the same view twice, different predicates
            return (f"SELECT count(*), sum(a.prompt) FROM {v.name} a JOIN {v.name} b ON a.prompt = b.prompt "
                    f"WHERE {self.pred(v, 'a.')} AND {self.pred(v, 'b.')}")
        if kind == 3:  # CTE
            return (f"WITH x AS (SELECT * FROM {v.name} WHERE {self.pred(v)}) "
                    f"SELECT {self.output(v)} FROM x WHERE {self.pred(v)}")
        if kind == 4:  # UNION / UNION ALL / EXCEPT of two filters of one view
            cols = ", ".join(c.name for c in v.columns if c.type in ("INTEGER", "TINYINT")) or v.names[0]
            op = self.pick(["UNION", "UNION ALL", "EXCEPT", "INTERSECT"])
            return (f"SELECT count(*) FROM (SELECT {cols} FROM {v.name} WHERE {self.pred(v)} {op} "
                    f"SELECT {cols} FROM {v.name} WHERE {self.pred(v)})")
        if kind == 5:  # correlated subquery from prompts
            return (f"SELECT p.prompt, (SELECT count(*) FROM {v.name} s WHERE s.prompt = p.prompt AND "
                    f"{self.pred(v, 's.')}) AS n FROM prompts p")
        if kind == 6:  # query_table next to a filtered reference of the same view
            return (f"SELECT (SELECT {self.output(v).split(', ')[0]} FROM {v.name} WHERE {self.pred(v)}) a, "
                    f"(SELECT count(*) FROM query_table('{v.name}') WHERE {self.pred(v)}) b")
        if kind == 7:  # query('...') with a filter inside and outside
            inner = self.pred(v).replace("'", "''")
            return f"SELECT {self.output(v)} FROM query('SELECT * FROM {v.name} WHERE {inner}') WHERE {self.pred(v)}"
        if kind == 8:  # IN (subquery) from a light view
            lv = self.pick([x for x in LIGHT if "prompt" in x.names])
            return (f"SELECT {self.output(v)} FROM {v.name} WHERE prompt IN (SELECT prompt FROM {lv.name} "
                    f"WHERE {self.pred(lv)}) AND {self.pred(v)}")
        # a heavy view joined with a light one
        lv = self.pick([x for x in LIGHT if "prompt" in x.names])
        return (f"SELECT count(*), count(DISTINCT h.prompt) FROM {v.name} h JOIN {lv.name} l USING (prompt) "
                f"WHERE {self.pred(v, 'h.')} AND {self.pred(lv, 'l.')}")


def generated(n: int = N_GENERATED, seed: int = SEED) -> list[str]:
    g = Gen(seed)
    return [g.statement() for _ in range(n)]

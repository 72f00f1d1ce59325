"""Named analyses: one ``.sql`` file each under ``query/analyses/``, self-describing.

Each file starts with a header of ``--`` comment lines::

    -- name: head_dla
    -- description: DLA of every head at a layer (default: each prompt's emergence layer).
    -- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer
    -- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode ({...}: the allowed values)
    -- column: dla FLOAT | the head's direct logit attribution to the target

Parameters reach DuckDB as prepared-statement values (``$layer``), never pasted into the
text, so a user's value cannot change what the statement does.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from query.errors import QueryError

TYPES = ("INTEGER", "DOUBLE", "VARCHAR", "BOOLEAN")
COMPARE_PREFIX = "compare_"
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # one of TYPES
    default: Any
    doc: str
    choices: tuple[str, ...] = ()  # allowed VARCHAR values (a typo is an error, not 0 rows)

    def convert(self, value: Any) -> Any:
        """A Python or command-line value as this parameter's type; QueryError if it is not."""
        value = self._convert(value)
        if self.choices and value is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise QueryError(f"parameter {self.name} takes one of {', '.join(self.choices)} "
                             f"(or NULL), got {value!r}{hint}")
        return value

    def _convert(self, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            if text.upper() == "NULL":
                return None
            try:
                if self.type == "INTEGER":
                    value = int(text)
                    if not -2**31 <= value < 2**31:  # SQL INTEGER
                        raise QueryError(f"parameter {self.name} takes an INTEGER (32-bit), got {text}")
                    return value
                if self.type == "DOUBLE":
                    return float(text)
                if self.type == "BOOLEAN":
                    if text.lower() in _TRUE | _FALSE:
                        return text.lower() in _TRUE
                    raise ValueError(text)
            except ValueError:
                raise QueryError(f"parameter {self.name} takes {self.type}, got {value!r}") from None
            return value
        ok = {
            "INTEGER": isinstance(value, int) and not isinstance(value, bool),
            "DOUBLE": isinstance(value, int | float) and not isinstance(value, bool),
            "BOOLEAN": isinstance(value, bool),
            "VARCHAR": False,
        }[self.type]
        if not ok:
            raise QueryError(f"parameter {self.name} takes {self.type}, got {value!r}")
        return float(value) if self.type == "DOUBLE" else value


@dataclass(frozen=True)
class Analysis:
    name: str
    description: str
    params: tuple[Param, ...]
    columns: tuple[tuple[str, str, str], ...]  # (name, type, doc) of the result
    sql: str

    def bind(self, values: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``values``, converted; unknown names are an error."""
        known = {p.name: p for p in self.params}
        for k in values:
            if k not in known:
                names = ", ".join(known) or "none"
                raise QueryError(f"analysis {self.name} has no parameter {k!r} (parameters: {names})")
        return {p.name: p.convert(values[p.name]) if p.name in values else p.default for p in self.params}


_HEADER = re.compile(r"^--\s*(name|description|param|column):\s*(.*)$")
_PARAM = re.compile(r"^(\w+)\s+(\w+)(?:\s*\{([^}]*)\})?\s*=\s*(.*?)\s*\|\s*(.*)$")


def parse_analysis(text: str, fallback_name: str) -> Analysis:
    """Read the header of one analysis file."""
    meta: dict[str, str] = {}
    params: list[Param] = []
    columns: list[tuple[str, str, str]] = []
    last = ""
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        m = _HEADER.match(line)
        if m is None:
            cont = line[2:].strip()
            if last == "description" and cont:
                meta["description"] += " " + cont
            continue
        key, val = m.group(1), m.group(2).strip()
        last = key
        if key == "param":
            pm = _PARAM.match(val)
            if pm is None or pm.group(2).upper() not in TYPES:
                raise ValueError(f"{fallback_name}: bad param line {val!r}")
            choices = tuple(c.strip() for c in (pm.group(3) or "").split(",") if c.strip())
            p = Param(pm.group(1), pm.group(2).upper(), None, pm.group(5), choices)
            params.append(Param(p.name, p.type, p.convert(pm.group(4).strip("'")), p.doc, choices))
        elif key == "column":
            left, doc = val.split("|", 1)
            cname, ctype = left.split(None, 1)
            columns.append((cname.strip(), ctype.strip(), doc.strip()))
        else:
            meta[key] = val
    return Analysis(meta.get("name", fallback_name), meta.get("description", ""), tuple(params),
                    tuple(columns), text)


@cache
def _all() -> dict[str, Analysis]:
    out = {}
    for f in sorted(resources.files("query").joinpath("analyses").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".sql"):
            a = parse_analysis(f.read_text(), f.name[:-4])
            out[a.name] = a
    return out


def list_analyses() -> list[Analysis]:
    """Every named analysis, sorted by name."""
    return list(_all().values())


def is_comparison(a: Analysis) -> bool:
    """A comparison analysis (``compare_*``) reads the ``model`` column: it runs over
    ``query.Comparison`` (one or more warehouses), never over a single ``Warehouse``."""
    return a.name.startswith(COMPARE_PREFIX)


def get_analysis(name: str) -> Analysis:
    """The analysis called ``name``; an unknown name suggests the closest."""
    found = _all().get(name)
    if found is None:
        close = difflib.get_close_matches(name, list(_all()), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise QueryError(f"no analysis named {name!r}{hint} (`echowh analyses` lists them)")
    return found

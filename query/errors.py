"""The one exception the query layer raises for a user's mistake."""

from __future__ import annotations


class QueryError(Exception):
    """A user-facing problem: bad SQL, a write, an unknown analysis or parameter, no warehouse."""

"""Load the named statements of ``queries.sql`` and bind them to a schema."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _raw() -> dict[str, str]:
    text = resources.files("pgjobs").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


class Queries:
    """The statements of ``queries.sql`` with ``{schema}`` bound to one schema.

    Attribute access returns a composed, ready-to-execute statement:
    ``cur.execute(queries.get_job, {"id": 1})``.
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema
        ident = sql.Identifier(schema)
        self._bound = {name: sql.SQL(body).format(schema=ident) for name, body in _raw().items()}

    def __getattr__(self, name: str) -> sql.Composed:
        try:
            return self._bound[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None

    def names(self) -> list[str]:
        """The names of every statement."""
        return sorted(self._bound)

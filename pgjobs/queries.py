"""Load the named statements of pgjobs' SQL files and bind them to a schema.

``queries.sql`` holds what applications and workers run (enqueue, claim, complete, rescue);
``operations.sql`` what operators run (listing, retrying, pruning, stats, doctor);
``dashboard.sql`` the dashboard's pages; ``partitioning.sql`` the retention pass of a
partitioned jobs table. A name is unique across them.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


SQL_FILES = ("queries.sql", "operations.sql", "dashboard.sql", "partitioning.sql")


@cache
def _raw() -> dict[str, str]:
    statements: dict[str, str] = {}
    for filename in SQL_FILES:
        resource = resources.files("pgjobs").joinpath(filename)
        if not resource.is_file():
            continue
        parts = _NAME.split(resource.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in statements:
                raise RuntimeError(f"query {name!r} is defined twice ({filename})")
            statements[name] = body.strip()
    return statements


def _compact(body: str) -> str:
    """``body`` without its comment lines and indentation. The comments are for readers of
    the SQL files; sent along, they made the hot statements longer than the 4 kB up to
    which psycopg caches a statement's conversion, and every execution parsed them again
    (about 30 us per claim or outcome batch)."""
    lines = (line.strip() for line in body.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


# kept_until of every job not archived (in jobs_current, when the jobs table is
# partitioned): a time every client reads in any time zone, which 'infinity' is not.
KEPT = "9999-12-31 00:00+00"
_CURRENT = f"kept_until = '{KEPT}'"


def _current_only(body: str, partitioned: bool) -> str:
    """``body`` with its ``{and_current}`` conditions spelled out for a partitioned jobs
    table, or left out (see queries.sql)."""
    return body.replace("{and_current_j}", f" AND j.{_CURRENT}" if partitioned else "").replace(
        "{and_current}", f" AND {_CURRENT}" if partitioned else ""
    )


class Queries:
    """The statements of ``queries.sql`` with ``{schema}`` bound to one schema.

    Attribute access returns a ready-to-execute statement:
    ``cur.execute(queries.get_job, {"id": 1})``. Each is rendered to text once, here, so
    that executing it composes nothing.
    """

    def __init__(self, schema: str, *, partitioned: bool = False) -> None:
        self.schema = schema
        self.partitioned = partitioned
        ident = sql.Identifier(schema)
        self._bound = {
            name: sql.SQL(
                sql.SQL(_current_only(_compact(body), partitioned))
                .format(schema=ident)
                .as_string(None)
            )
            for name, body in _raw().items()
        }

    def __getattr__(self, name: str) -> sql.SQL:
        try:
            return self._bound[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None

    def names(self) -> list[str]:
        """The names of every statement."""
        return sorted(self._bound)

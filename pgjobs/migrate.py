"""Run pgjobs' Alembic migrations from the installed package (``pgjobs migrate``)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from pgjobs.database import CONNECT_TIMEOUT, connect, libpq_url
from pgjobs.settings import DEFAULT_SCHEMA, validate_schema


def _config(schema: str, buffer: io.StringIO | None = None) -> Config:
    from pgjobs.migrations import LOCATION

    config = Config(output_buffer=buffer) if buffer is not None else Config()
    config.set_main_option("script_location", str(LOCATION))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(LOCATION / "versions"))
    config.attributes["pgjobs_schema"] = validate_schema(schema)
    return config


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    # pgjobs connects, not SQLAlchemy: a server that is down or does not answer gives a
    # one-line DatabaseError within the connect timeout, not a driver traceback or a hang.
    target = libpq_url(url)
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: connect(target, connect_timeout=CONNECT_TIMEOUT),
        poolclass=pool.NullPool,
    )
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision this version of pgjobs knows."""
    heads = ScriptDirectory.from_config(_config(DEFAULT_SCHEMA)).get_heads()
    assert len(heads) == 1, f"pgjobs migrations must have one head, found {heads}"
    return heads[0]


def upgrade(url: str, schema: str = DEFAULT_SCHEMA, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``. Idempotent."""
    with _connection(url) as conn:
        config = _config(schema)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(url: str, schema: str = DEFAULT_SCHEMA, revision: str = "-1") -> None:
    """Migrate down to ``revision`` ("base" removes everything pgjobs created)."""
    with _connection(url) as conn:
        config = _config(schema)
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
    if current(url, schema) is None:
        _drop_leftovers(url, schema)


def current(url: str, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The revision the database is at, or None when pgjobs is not installed there."""
    from pgjobs.migrations import VERSION_TABLE

    with _connection(url) as conn:
        context = MigrationContext.configure(
            conn,
            opts={"version_table": VERSION_TABLE, "version_table_schema": validate_schema(schema)},
        )
        heads = context.get_current_heads()
    return heads[0] if heads else None


def sql_script(schema: str = DEFAULT_SCHEMA, revision: str = "head", *, down: bool = False) -> str:
    """The DDL of an upgrade to ``revision`` (or a downgrade from head to it), as text,
    without touching a database. A downgrade "to head" means all the way down to base."""
    buffer = io.StringIO()
    config = _config(schema, buffer=buffer)
    if down:
        # `pgjobs migrate sql --down` keeps the default revision "head", and a downgrade
        # from head to head would print an empty script.
        target = "base" if revision == "head" else revision
        command.downgrade(config, f"{head()}:{target}", sql=True)
    else:
        command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


def _drop_leftovers(url: str, schema: str) -> None:
    """After a downgrade to base only Alembic's version table is left: drop it, and the
    schema if nothing of the application's lives there."""
    from pgjobs.migrations import VERSION_TABLE

    ident = sql.Identifier(validate_schema(schema))
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}.{}").format(ident, sql.Identifier(VERSION_TABLE))
        )
        # RESTRICT: the application may keep objects of its own there.
        with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(ident))

"""Alembic environment for pgjobs' own migrations (``pgjobs migrate``).

pgjobs keeps its version table inside its own schema, never in the application's
``alembic_version``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool, text

from pgjobs.migrations import VERSION_TABLE, target_schema
from pgjobs.settings import DATABASE_URL_ENV

config = context.config
schema = target_schema()


def _url() -> str:
    from pgjobs.database import sqlalchemy_url

    url = config.get_main_option("sqlalchemy.url") or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise SystemExit(f"set {DATABASE_URL_ENV} (or sqlalchemy.url) to the database to migrate")
    return sqlalchemy_url(url)


def run_offline() -> None:
    context.configure(
        url="postgresql+psycopg://",
        dialect_name="postgresql",
        literal_binds=True,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(_url(), poolclass=pool.NullPool)
        with engine.connect() as conn:
            _migrate(conn)
    else:
        _migrate(connection)


def _migrate(connection: object) -> None:
    # Two installers racing on one fresh database must not both create the schema.
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('pgjobs.migrate'))"))  # type: ignore[attr-defined]
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))  # type: ignore[attr-defined]
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()  # type: ignore[attr-defined]


if context.is_offline_mode():
    run_offline()
else:
    run_online()

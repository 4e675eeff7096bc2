"""pgjobs' Alembic migrations, shipped inside the package as ``pgjobs.migrations``.

Revisions read the target schema from (first match): the Alembic config attribute
``pgjobs_schema``, ``-x pgjobs_schema=NAME``, the ``PGJOBS_SCHEMA`` environment variable,
then the default ``pgjobs``. That lets an application include these revisions in its own
Alembic history (``version_locations``) and still choose the schema.
"""

from __future__ import annotations

from pathlib import Path

from pgjobs.settings import DEFAULT_SCHEMA, SCHEMA_ENV, validate_schema

LOCATION = Path(__file__).resolve().parent
BRANCH = "pgjobs"
VERSION_TABLE = "alembic_version"


def target_schema() -> str:
    """The schema the running migration acts on, validated."""
    import os

    from alembic import context

    name = context.config.attributes.get("pgjobs_schema")
    if not name:
        name = context.get_x_argument(as_dictionary=True).get("pgjobs_schema")
    return validate_schema(name or os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA)


def ddl(statement: str) -> str:
    """``statement`` with ``{schema}`` replaced by the quoted, validated target schema."""
    return statement.replace("{schema}", f'"{target_schema()}"')


def execute(statements: list[str]) -> None:
    """Run each of ``statements`` (``{schema}`` bound, see :func:`ddl`) in the migration."""
    from alembic import op

    for statement in statements:
        op.execute(ddl(statement))

"""Migrations: upgrade is idempotent, ``downgrade base`` leaves the database exactly as it
found it, up/down/up works, ``pgjobs migrate sql`` prints the same DDL without a database,
custom schemas coexist, the SQLAlchemy mirror matches the migrated tables, and an
application's own Alembic history can include pgjobs' revisions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from ops_helpers import CLOSED_PORT_URL, plain_table_only
from typer.testing import CliRunner

import pgjobs
import pgjobs.schema
from pgjobs import migrate
from pgjobs.cli import cli as pgjobs_cli
from pgjobs.database import sqlalchemy_url
from pgjobs.migrations import LOCATION

PGJOBS = Path(sys.executable).parent / "pgjobs"


def catalog(url: str, schema: str | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every object of the database outside PostgreSQL's own schemas (or of one schema), with
    its definition, so that two snapshots compare equal only if nothing changed. (TOAST
    tables are left out: they are named after table OIDs and go with their tables.)"""
    namespaces = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    params: dict[str, Any] = {}
    if schema is not None:
        namespaces, params = "n.nspname = %(schema)s", {"schema": schema}
    queries = {
        "namespaces": f"SELECT n.nspname FROM pg_namespace n WHERE {namespaces}",
        "relations": f"""
            SELECT n.nspname, c.relname, c.relkind, c.reloptions::text
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {namespaces}""",
        "columns": f"""
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attidentity
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attnum > 0 AND NOT a.attisdropped AND {namespaces}""",
        "constraints": f"""
            SELECT co.conname, pg_get_constraintdef(co.oid)
            FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
            WHERE {namespaces}""",
        "indexes": f"""
            SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {namespaces}""",
        "types": f"""
            SELECT n.nspname, t.typname, t.typtype,
                   array(SELECT enumlabel FROM pg_enum WHERE enumtypid = t.oid
                         ORDER BY enumsortorder)::text
            FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {namespaces}""",
        "views": f"""
            SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'v' AND {namespaces}""",
        "functions": f"""
            SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE {namespaces}""",
    }
    with psycopg.connect(url) as conn:
        return {name: sorted(conn.execute(q, params).fetchall()) for name, q in queries.items()}


def cli(*args: str, database_url: str) -> str:
    """Run the installed ``pgjobs`` command the way an operator would; return its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
    env["PGJOBS_DATABASE_URL"] = database_url
    result = subprocess.run(
        [str(PGJOBS), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def cli_in_process(*args: str, database_url: str) -> str:
    """The same command in this process (a second faster than a new interpreter)."""
    result = CliRunner().invoke(
        pgjobs_cli, list(args), env={"PGJOBS_DATABASE_URL": database_url, "PGJOBS_SCHEMA": None}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    with pgjobs.App(db_url, strict_tasks=False) as producer:
        job_id = producer.enqueue("kept", {"n": 1})
    before = catalog(db_url)
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)
    assert catalog(db_url) == before
    assert migrate.current(db_url) == migrate.head()
    with pgjobs.App(db_url) as again:
        assert again.get_job(job_id).args == {"n": 1}  # type: ignore[arg-type]


def test_downgrade_to_base_removes_everything_and_up_again_works(empty_db_url: str) -> None:
    pristine = catalog(empty_db_url)
    assert migrate.current(empty_db_url) is None
    migrate.upgrade(empty_db_url)
    installed = catalog(empty_db_url)
    assert {("pgjobs", "jobs", "r"), ("pgjobs", "workers", "r"), ("pgjobs", "dead_jobs", "v")} <= {
        r[:3] for r in installed["relations"]
    }
    assert migrate.current(empty_db_url) == migrate.head()

    migrate.downgrade(empty_db_url, revision="base")
    after = catalog(empty_db_url)
    assert ("pgjobs",) not in after["namespaces"]
    assert after == pristine
    assert migrate.current(empty_db_url) is None

    migrate.upgrade(empty_db_url)
    assert catalog(empty_db_url) == installed
    with pgjobs.App(empty_db_url, strict_tasks=False) as app:
        job_id = app.enqueue("after.reinstall", {"ok": True})
        assert app.get_job(job_id).task == "after.reinstall"  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_migrating_a_database_that_is_down_fails_with_one_line() -> None:
    for call in (migrate.upgrade, migrate.downgrade, migrate.current):
        with pytest.raises(pgjobs.DatabaseError, match="cannot connect to the database"):
            call(CLOSED_PORT_URL)
    for args in (["migrate", "upgrade"], ["migrate", "current"], ["bench", "--jobs", "10"]):
        result = CliRunner().invoke(
            pgjobs_cli, ["--database-url", CLOSED_PORT_URL, *args], env={"PGJOBS_SCHEMA": None}
        )
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("pgjobs: error: cannot connect to the database"), (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@plain_table_only
def test_migrate_sql_needs_no_database_and_matches_upgrade(empty_db_url: str, db_url: str) -> None:
    # A closed port: any attempt to connect would fail the command.
    up = cli("migrate", "sql", database_url=CLOSED_PORT_URL)
    assert 'CREATE TABLE "pgjobs".jobs' in up and 'CREATE TYPE "pgjobs".job_state' in up
    assert "INSERT INTO pgjobs.alembic_version" in up
    down = cli_in_process("migrate", "sql", "--down", database_url=CLOSED_PORT_URL)
    for dropped in ("VIEW", "TABLE", "TYPE"):
        assert f"DROP {dropped} IF EXISTS" in down
    assert 'DROP TABLE IF EXISTS "pgjobs".jobs' in down

    # The printed script builds the same schema as `pgjobs migrate upgrade` does...
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(up.encode())
    assert catalog(empty_db_url, "pgjobs") == catalog(db_url, "pgjobs")
    assert migrate.current(empty_db_url) == migrate.head()
    # ...and the printed downgrade takes it away again (Alembic's version table stays).
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(down.encode())
    relations = [r[1] for r in catalog(empty_db_url, "pgjobs")["relations"]]
    assert sorted(relations) == ["alembic_version", "alembic_version_pkc"]


def test_migrate_current(db_url: str, empty_db_url: str) -> None:
    head = migrate.head()
    assert cli("migrate", "current", database_url=db_url).strip() == f"{head} (head)"
    out = cli_in_process("migrate", "current", database_url=empty_db_url).strip()
    assert out == f"not installed (newest: {head})"


@plain_table_only
def test_custom_schema_coexists_with_the_default(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    out = cli_in_process("--schema", "tenant_a", "migrate", "upgrade", database_url=db_url)
    assert "tenant_a" in out and migrate.head() in out
    assert migrate.current(db_url, "tenant_a") == migrate.head()
    tenant_columns = str(catalog(db_url, "tenant_a")["columns"]).replace("tenant_a.", "pgjobs.")
    assert tenant_columns == str(catalog(db_url, "pgjobs")["columns"])

    with (
        pgjobs.App(db_url, schema="tenant_a", strict_tasks=False) as tenant,
        pgjobs.App(db_url, strict_tasks=False) as default,
    ):
        assert tenant.channel == "pgjobs_tenant_a"
        tenant_job = tenant.enqueue("t.a", {"who": "tenant"}, unique_key="same")
        default_job = default.enqueue("t.a", {"who": "default"}, unique_key="same")
        # Each schema has its own table, ids and unique keys.
        assert tenant.get_job(tenant_job).args == {"who": "tenant"}  # type: ignore[arg-type]
        assert default.get_job(default_job).args == {"who": "default"}  # type: ignore[arg-type]
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM tenant_a.jobs), (SELECT count(*) FROM pgjobs.jobs)"
    ).fetchone()
    assert counts == (1, 1)

    cli_in_process("--schema", "tenant_a", "migrate", "downgrade", "base", database_url=db_url)
    assert conn.execute("SELECT to_regnamespace('tenant_a')").fetchone() == (None,)
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (1,)
    assert migrate.current(db_url) == migrate.head()


def test_downgrade_keeps_a_schema_the_application_also_uses(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, "shared_space")
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE shared_space.app_table (id int)")
        migrate.downgrade(empty_db_url, "shared_space", "base")
        rows = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'shared_space'::regnamespace "
            "ORDER BY relname"
        ).fetchall()
    assert rows == [("app_table",)]


@plain_table_only
def test_sqlalchemy_metadata_matches_the_migrated_database(db_url: str) -> None:
    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "schema":
            return name == "pgjobs"
        return not (type_ == "table" and name == "alembic_version")

    engine = sqlalchemy.create_engine(sqlalchemy_url(db_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": include_name,
                    "compare_type": True,
                    "compare_server_default": True,
                    "target_metadata": pgjobs.schema.metadata,
                },
            )
            diff = compare_metadata(context, pgjobs.schema.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_application_alembic_history_includes_pgjobs(empty_db_url: str, tmp_path: Path) -> None:
    """An app's Alembic project lists pgjobs' versions directory beside its own."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(APP_ENV)
    (tmp_path / "script.py.mako").write_text((LOCATION / "script.py.mako").read_text())
    (tmp_path / "versions" / "app_0001_widgets.py").write_text(APP_REVISION)
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations",
        os.pathsep.join([str(tmp_path / "versions"), str(LOCATION / "versions")]),
    )
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(empty_db_url).replace("%", "%%"))

    command.upgrade(config, "heads")

    with psycopg.connect(empty_db_url) as conn:
        versions = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
        assert sorted(versions) == [("app_0001",), (migrate.head(),)]
        assert conn.execute("SELECT to_regclass('public.widgets')").fetchone() == ("widgets",)
        assert conn.execute("SELECT to_regclass('pgjobs.jobs')").fetchone() == ("pgjobs.jobs",)
        # pgjobs' own version table is not used in this setup.
        assert conn.execute("SELECT to_regclass('pgjobs.alembic_version')").fetchone() == (None,)
    with pgjobs.App(empty_db_url, strict_tasks=False) as app:
        assert app.enqueue("widgets.build", {"id": 1}) is not None

    # The app can take pgjobs out again through the branch label.
    command.downgrade(config, "pgjobs@base")
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('pgjobs.jobs')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('public.widgets')").fetchone() == ("widgets",)
        schemas = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgjobs'").fetchall()
        assert schemas == [], "the emptied pgjobs schema is left behind"


APP_ENV = """
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""

APP_REVISION = """
from alembic import op
import sqlalchemy as sa

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("widgets")
"""


def test_branch_label_sits_on_the_first_revision_and_names_the_branch() -> None:
    """Alembic's convention: the label is on the branch's root, and ``pgjobs@head`` /
    ``pgjobs@base`` name its ends, however many revisions follow."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    scripts = ScriptDirectory.from_config(config)
    assert scripts.get_revision("pgjobs@head").revision == migrate.head()  # type: ignore[union-attr]
    labelled = [s.revision for s in scripts.walk_revisions() if "pgjobs" in s.branch_labels]
    root = [s.revision for s in scripts.walk_revisions() if s.down_revision is None]
    assert root == ["pgjobs_0001"]
    # Alembic lists a label on every revision of the branch; it is declared on the root only.
    assert "pgjobs_0001" in labelled and scripts.get_revision("pgjobs_0001").branch_labels

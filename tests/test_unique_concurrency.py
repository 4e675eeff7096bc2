"""Unique keys under concurrency: 20 callers enqueue the same ``unique_key`` at once, each in
its own transaction, and some roll back. Exactly one live job exists if anyone committed,
none otherwise; no caller gets an error or an aborted transaction; every committer gets the
id of the one job.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import pgbouncer
import psycopg
import pytest
from ops_helpers import server_pid

import pgjobs
from pgjobs.admin import Admin

CALLERS = 20


@dataclass
class Outcome:
    """What one caller saw."""

    commits: bool
    job_id: int | None = None
    error: BaseException | None = None
    followed_up: bool = False


def enqueue_in_transaction(
    task: pgjobs.Task[Any, Any], url: str, barrier: threading.Barrier, outcome: Outcome, key: str
) -> None:
    try:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1")  # connected and in a transaction before the start line
            barrier.wait(timeout=30)
            outcome.job_id = task.enqueue(n=1, unique_key=key, conn=conn)
            # The transaction must still be usable after a (possibly skipped) duplicate;
            # the short sleep keeps it open so that others queue up behind its key.
            row = conn.execute("SELECT 1 FROM pg_sleep(0.005)").fetchone()
            outcome.followed_up = row == (1,)
            if outcome.commits:
                conn.commit()
            else:
                conn.rollback()
    except BaseException as exc:  # recorded and asserted on in the main thread
        outcome.error = exc


def run_round(
    task: pgjobs.Task[Any, Any], url: str, commit_flags: list[bool], key: str
) -> list[Outcome]:
    barrier = threading.Barrier(len(commit_flags))
    outcomes = [Outcome(commits=flag) for flag in commit_flags]
    threads = [
        threading.Thread(target=enqueue_in_transaction, args=(task, url, barrier, o, key))
        for o in outcomes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an enqueuer hung"
    return outcomes


@pytest.mark.parametrize(
    "seed, rollback_share",
    [(1, 0.5), (2, 0.5), (3, 0.8), (4, 0.95), (5, 0.0), (6, 1.0)],
)
def test_same_key_from_twenty_concurrent_transactions(
    module_db_url: str, seed: int, rollback_share: float
) -> None:
    # Rounds share one database (each its own key) to save creating one per round.
    app = pgjobs.App(module_db_url)

    @app.task(name="sync_account")
    def sync_account(n: int) -> None: ...

    rng = random.Random(seed)
    flags = [rng.random() >= rollback_share for _ in range(CALLERS)]
    key = f"account-{seed}"
    outcomes = run_round(sync_account, module_db_url, flags, key)

    errors = [o.error for o in outcomes if o.error is not None]
    assert errors == []
    assert all(o.followed_up for o in outcomes)
    assert all(isinstance(o.job_id, int) for o in outcomes)
    with psycopg.connect(module_db_url) as conn:
        live = conn.execute("SELECT id FROM pgjobs.jobs WHERE unique_key = %s", (key,)).fetchall()
    if any(flags):
        assert len(live) == 1
        [(job_id,)] = live
        assert {o.job_id for o in outcomes if o.commits} == {job_id}
    else:
        assert live == []


def test_on_duplicate_none_returns_none(app: pgjobs.App, db_url: str) -> None:
    @app.task(name="digest")
    def digest(day: str) -> None: ...

    first = digest.enqueue(day="mon", unique_key="digest:mon")
    assert isinstance(first, int)
    assert digest.enqueue(day="mon", unique_key="digest:mon", on_duplicate="none") is None
    assert digest.enqueue(day="mon", unique_key="digest:mon") == first
    assert (
        app.enqueue("digest", {"day": "mon"}, unique_key="digest:mon", on_duplicate="none") is None
    )
    with psycopg.connect(db_url) as caller:
        assert digest.enqueue(day="mon", unique_key="digest:mon", conn=caller) == first
        assert caller.execute("SELECT 1").fetchone() == (1,)


def test_longest_accepted_unique_key_is_indexed(module_db_url: str) -> None:
    # 1024 bytes of UTF-8 (512 two-byte characters, incompressible enough): the limit
    # pgjobs checks must sit below what the unique index can hold.
    key = "".join(chr(0x100 + (i * 7919) % 0x700) for i in range(512))
    assert len(key.encode()) == 1024
    with pgjobs.App(module_db_url) as app:
        task = app.task(name="long_key")(lambda n: None)
        first = task.enqueue(n=1, unique_key=key)
        assert task.enqueue(n=2, unique_key=key) == first


def _waiting_on_a_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
    row = conn.execute(query, (pid,)).fetchone()
    return bool(row and row[0])


def _wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def test_bulk_enqueues_with_overlapping_keys_in_any_order_never_deadlock(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # The interleaving that deadlocked when rows were inserted in input order: first's
    # batch takes "a" and waits for "x" (held by a third transaction), second's takes "c"
    # and waits for "a"; once "x" is free, first would wait for "c". Taken in key order,
    # first holds "a" and "c" before it waits, and second only ever waits for first.
    @app.task(name="sync")
    def sync(k: str) -> None: ...

    by_k = {"unique_key": lambda args: args["k"]}
    holder = psycopg.connect(db_url)
    callers = [psycopg.connect(db_url) for _ in range(2)]
    orders = [["a", "x", "c"], ["c", "a"]]
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = sync.enqueue_many([{"k": k} for k in orders[i]], conn=callers[i], **by_k)
            callers[i].commit()
        except BaseException as exc:
            results[i] = exc

    # The server's pid of each caller's transaction (through PgBouncer, the pid psycopg
    # knows is the pooler's).
    pids = [server_pid(c) for c in callers]
    try:
        sync.enqueue(k="x", unique_key="x", conn=holder)
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for i, thread in enumerate(threads):
            thread.start()
            pid = pids[i]
            _wait_for(lambda pid=pid: _waiting_on_a_lock(conn, pid), f"caller {i} waits")
        holder.rollback()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "an enqueuer hung"
    finally:
        for c in (holder, *callers):
            c.close()
    assert not any(isinstance(r, BaseException) for r in results), results
    first, second = results
    assert len(set(first)) == 3 and all(first)
    # second's keys were both taken by first, which committed first: the same jobs.
    assert second == [first[2], first[0]]
    ids = conn.execute("SELECT unique_key, id FROM pgjobs.jobs ORDER BY id").fetchall()
    assert [k for k, _ in ids] == ["a", "x", "c"]  # ids ascend in input order


def test_mixed_bulk_enqueues_and_dead_retries_never_deadlock(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Producers enqueue batches of overlapping keys in random orders while an operator
    # retries every dead job (which makes their keys live again) and another session keeps
    # killing live jobs: every lock is taken in key order or id order, so nobody deadlocks,
    # and every error a caller could see would be a pgjobs error.
    @app.task(name="sync")
    def sync(k: str) -> None: ...

    keys = [f"k{i:03d}" for i in range(120)]
    conn.execute(
        "INSERT INTO pgjobs.jobs (task, state, attempts, unique_key, finished_at) "
        "SELECT 'sync', 'dead', 3, k, now() FROM unnest(%s::text[]) AS k",
        (keys,),
    )
    admin = Admin(app)
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(db_url) as caller:
            while not stop.is_set():
                batch = rng.sample(keys, 25)
                try:
                    sync.enqueue_many(
                        [{"k": k} for k in batch], conn=caller, unique_key=lambda a: a["k"]
                    )
                    caller.commit()
                    rounds[0] += 1
                except BaseException as exc:
                    errors.append(exc)
                    return

    def retry() -> None:
        while not stop.is_set():
            try:
                admin.retry_dead(all_jobs=True)
            except BaseException as exc:
                errors.append(exc)
                return

    def kill() -> None:
        with psycopg.connect(db_url, autocommit=True) as killer:
            while not stop.is_set():
                killer.execute(
                    "UPDATE pgjobs.jobs SET state = 'dead', finished_at = now(), attempts = 3 "
                    "WHERE id IN (SELECT id FROM pgjobs.jobs WHERE state = 'available' "
                    "ORDER BY id LIMIT 40 FOR UPDATE)"
                )
                time.sleep(0.01)

    threads = [threading.Thread(target=produce, args=(seed,)) for seed in range(3)]
    threads += [threading.Thread(target=retry), threading.Thread(target=kill)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert errors == []
    assert rounds[0] > 10
    live = conn.execute(
        "SELECT count(*), count(DISTINCT unique_key) FROM pgjobs.jobs "
        "WHERE state IN ('available', 'scheduled', 'running', 'retryable', 'pending')"
    ).fetchone()
    assert live is not None and live[0] == live[1]


def test_a_deadlock_of_the_callers_own_making_reaches_it_as_a_pgjobs_error(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Two transactions enqueue the same keys one call at a time in opposite orders: that
    # order is theirs, and PostgreSQL breaks the deadlock by rolling one back.
    @app.task(name="sync")
    def sync(k: str) -> None: ...

    callers = [psycopg.connect(db_url) for _ in range(2)]
    outcome: list[BaseException | None] = [None, None]

    def second_key(i: int, key: str) -> None:
        try:
            sync.enqueue(k=key, unique_key=key, conn=callers[i])
        except BaseException as exc:
            outcome[i] = exc

    try:
        sync.enqueue(k="a", unique_key="a", conn=callers[0])
        sync.enqueue(k="b", unique_key="b", conn=callers[1])
        threads = [
            threading.Thread(target=second_key, args=(0, "b")),
            threading.Thread(target=second_key, args=(1, "a")),
        ]
        pid = server_pid(callers[0])
        threads[0].start()
        _wait_for(lambda: _waiting_on_a_lock(conn, pid), "the first caller waits")
        threads[1].start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for c in callers:
            c.close()
    errors = [e for e in outcome if e is not None]
    assert len(errors) == 1, outcome
    (error,) = errors
    assert isinstance(error, pgjobs.DatabaseError) and error.sqlstate == "40P01", repr(error)
    assert error.retry_transaction and "run it again" in str(error)
    assert isinstance(error.__cause__, psycopg.errors.DeadlockDetected)


def test_enqueue_on_the_pool_runs_a_transaction_that_lost_a_race_again(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # pgjobs' own connections under SERIALIZABLE (the role's default): a duplicate that
    # commits while the enqueue waits for it fails that transaction, and pgjobs, which
    # owns it, runs it again and finds the job.
    # A session setting: no PgBouncer in between.
    serializable = psycopg.conninfo.make_conninfo(
        pgbouncer.direct(db_url), options="-c default_transaction_isolation=serializable"
    )
    with pgjobs.App(serializable) as app:

        @app.task(name="sync")
        def sync(k: str) -> None: ...

        with psycopg.connect(db_url) as producer:
            job_id = sync.enqueue(k="a", unique_key="a", conn=producer)
            found: list[Any] = []
            waiter = threading.Thread(
                target=lambda: found.append(
                    sync.enqueue_many([{"k": "a"}, {"k": "b"}], unique_key=lambda a: a["k"])
                )
            )
            waiter.start()
            _wait_for(
                lambda: scalar_of(conn, "SELECT count(*) FROM pg_locks WHERE NOT granted"),
                "the enqueue waits",
            )
            producer.commit()
            waiter.join(timeout=30)
        assert len(found) == 1
        ids = found[0]
        assert ids[0] == job_id and ids[0].duplicate and not ids[1].duplicate


def scalar_of(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return row[0] if row else None

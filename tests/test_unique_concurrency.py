"""Unique keys under concurrency: 20 callers enqueue the same ``unique_key`` at once, each in
its own transaction, and some roll back. Exactly one live job exists if anyone committed,
none otherwise; no caller gets an error or an aborted transaction; every committer gets the
id of the one job.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import pgjobs

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

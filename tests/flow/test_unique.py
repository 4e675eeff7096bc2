"""Unique jobs: keys derived from the task and chosen arguments (``unique=True``,
``unique_by=``), held while the job is live or for a period (``unique_for=``), enforced by
the partial unique index with ON CONFLICT: in bulk, on every kind of connection, and
under 50 concurrent transactions that randomly roll back. Also limit keys (enqueue side).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

import pgjobs
from pgjobs.admin import Admin, Retention
from pgjobs.cli import cli
from pgjobs.database import sqlalchemy_url


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


@pytest.fixture
def enroll(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    """The seed case: one job per user and course."""

    @app.task(name="courses.enroll", unique_by=("user_id", "course_id"))
    def enroll(user_id: int, course_id: int, source: str = "web") -> None: ...

    return enroll


@pytest.fixture
def digest(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    """Unique over all its arguments."""

    @app.task(name="mail.digest", unique=True)
    def digest(user_id: int, lang: str = "en", sections: list[str] | None = None) -> None: ...

    return digest


@pytest.fixture
def plain(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    """No uniqueness of its own."""

    @app.task(name="plain.task")
    def plain(n: int, extra: dict[str, Any] | None = None) -> None: ...

    return plain


def expected_key(task: str, chosen: Any) -> str:
    """The documented key: task, colon, SHA-256 of the canonical JSON."""
    text = json.dumps(chosen, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{task}:{hashlib.sha256(text.encode()).hexdigest()}"


def key_of(app: pgjobs.App, job_id: int) -> str | None:
    return app.get_job(job_id).unique_key


def count(conn: psycopg.Connection[Any], where: str = "true", params: Any = None) -> int:
    row = conn.execute(f"SELECT count(*) FROM pgjobs.jobs WHERE {where}", params).fetchone()
    assert row is not None
    return int(row[0])


def finish(conn: psycopg.Connection[Any], job_id: int, state: str = "succeeded") -> None:
    conn.execute(
        "UPDATE pgjobs.jobs SET state = %s, finished_at = now() WHERE id = %s", (state, job_id)
    )


# -- derivation ---------------------------------------------------------------------------


def test_unique_by_one_job_per_user_and_course(
    app: pgjobs.App, enroll: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    first = enroll.enqueue(user_id=1, course_id=7)
    assert isinstance(first, pgjobs.JobId) and isinstance(first, int)
    assert first.created and not first.duplicate
    # Other arguments do not matter; neither does their order.
    again = enroll.enqueue(course_id=7, user_id=1, source="api")
    assert again == first and not again.created and again.duplicate
    other_course = enroll.enqueue(user_id=1, course_id=8)
    other_user = enroll.enqueue(user_id=2, course_id=7)
    assert len({first, other_course, other_user}) == 3
    assert other_course.created and other_user.created
    assert key_of(app, first) == expected_key("courses.enroll", {"course_id": 7, "user_id": 1})
    assert count(conn) == 3


def test_unique_true_keys_on_every_argument_with_defaults(
    app: pgjobs.App, digest: pgjobs.Task[Any, Any]
) -> None:
    first = digest.enqueue(user_id=1)
    # An argument given with its default value is the same job as one left out.
    assert digest.enqueue(user_id=1, lang="en", sections=None) == first
    assert digest.enqueue(user_id=1, lang="fr").created
    listed = digest.enqueue(user_id=1, sections=["a", "b"])
    assert listed.created and digest.enqueue(sections=["a", "b"], user_id=1) == listed
    assert digest.enqueue(user_id=1, sections=["b", "a"]).created  # list order matters
    assert key_of(app, first) == expected_key(
        "mail.digest", {"lang": "en", "sections": None, "user_id": 1}
    )


def test_per_call_options_override_the_task(
    app: pgjobs.App, plain: pgjobs.Task[Any, Any], digest: pgjobs.Task[Any, Any]
) -> None:
    # A task without uniqueness: per call unique=True, unique_by names or a function.
    a = plain.enqueue(n=1, extra={"x": 1}, unique=True)
    assert plain.enqueue(extra={"x": 1}, n=1, unique=True) == a
    assert plain.enqueue(n=1, extra={"x": 2}, unique=True).created
    b = plain.enqueue(n=5, extra={"x": 1}, unique_by=["n"])
    assert plain.enqueue(n=5, extra={"x": 9}, unique_by=("n",)) == b
    c = plain.enqueue(n=6, unique_by=lambda args: args["n"] % 2)
    assert plain.enqueue(n=8, unique_by=lambda args: args["n"] % 2) == c
    assert key_of(app, c) == expected_key("plain.task", 0)
    # Without any option the task stays non-unique.
    assert plain.enqueue(n=1, extra={"x": 1}) != a
    # A task's uniqueness turned off for one call, or replaced by an explicit key.
    d = digest.enqueue(user_id=9)
    assert digest.enqueue(user_id=9, unique=False).created
    assert key_of(app, digest.enqueue(user_id=9, unique_key="mine")) == "mine"
    assert digest.enqueue(user_id=9) == d


def test_by_name_enqueue_derives_keys_too(app: pgjobs.App, enroll: pgjobs.Task[Any, Any]) -> None:
    first = app.enqueue("courses.enroll", {"user_id": 3, "course_id": 4})
    assert app.enqueue("courses.enroll", {"user_id": 3, "course_id": 4, "source": "x"}) == first
    with pgjobs.App(app.database_url, strict_tasks=False) as producer:
        # A task of another code base: per-call derivation on the given arguments.
        one = producer.enqueue("remote.task", {"a": 1}, unique=True)
        two = producer.enqueue("remote.task", {"a": 1}, unique=True)
        assert one == two and not two.created  # type: ignore[union-attr]
        assert key_of(app, one) == expected_key("remote.task", {"a": 1})  # type: ignore[arg-type]


def test_bad_unique_options(app: pgjobs.App, plain: pgjobs.Task[Any, Any], db_url: str) -> None:
    with pytest.raises(pgjobs.ConfigurationError, match="not its parameters"):
        app.task(name="bad.names", unique_by=("nope",))(lambda n: None)
    with pytest.raises(pgjobs.ConfigurationError, match="unique_for"):
        app.task(name="bad.period", unique_for=0)(lambda n: None)
    with pytest.raises(pgjobs.ConfigurationError, match="limit_by"):
        app.task(name="bad.limit", limit_by=("nope",))(lambda n: None)
    with pytest.raises(pgjobs.ConfigurationError, match="clash"):
        app.task(name="bad.param")(lambda unique: None)
    with psycopg.connect(db_url) as caller:
        caller.execute("SELECT 1")
        for bad in (
            {"unique_by": ("nope",)},
            {"unique_by": 5},
            {"unique_for": -1},
            {"unique": "yes"},
            {"unique_by": lambda args: object()},
        ):
            with pytest.raises(pgjobs.InvalidJobError):
                plain.enqueue(n=1, conn=caller, **bad)
        assert caller.execute("SELECT 1").fetchone() == (1,)  # still usable


# -- scope --------------------------------------------------------------------------------


def test_a_live_key_is_released_when_the_job_finishes(
    enroll: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    first = enroll.enqueue(user_id=1, course_id=1)
    finish(conn, first)
    second = enroll.enqueue(user_id=1, course_id=1)
    assert second != first and second.created


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The clock unique periods are bucketed by, under the test's control."""
    now = [1_700_000_000.0]  # a multiple of 3600 plus 800 s: 2023-11-14 22:13:20 UTC
    for module in ("pgjobs.task", "pgjobs.app"):
        monkeypatch.setattr(f"{module}.now", lambda: now[0])
    yield now


def test_unique_for_holds_the_key_in_every_state_for_the_period(
    app: pgjobs.App,
    plain: pgjobs.Task[Any, Any],
    conn: psycopg.Connection[Any],
    clock: list[float],
) -> None:
    hour = timedelta(hours=1)
    first = plain.enqueue(n=1, unique_for=hour)
    job = app.get_job(first)
    bucket = int(clock[0] // 3600)
    assert job.unique_key == expected_key("plain.task", {"n": 1, "extra": None}) + (
        f"@3600s:{bucket}"
    )
    assert job.unique_until == datetime.fromtimestamp((bucket + 1) * 3600, tz=UTC)
    for state in ("succeeded", "dead", "cancelled"):
        finish(conn, first, state)
        again = plain.enqueue(n=1, unique_for=3600)
        assert again == first and again.duplicate
    clock[0] += 2000  # still in the same hour: 22:46:40
    assert plain.enqueue(n=1, unique_for=hour) == first
    clock[0] += 1000  # 23:03:20: the next hour, a new job
    second = plain.enqueue(n=1, unique_for=hour)
    assert second.created and app.get_job(second).unique_key != job.unique_key
    # Another period length is another key.
    assert plain.enqueue(n=1, unique_for=timedelta(minutes=30)).created


def test_task_level_period(app: pgjobs.App, clock: list[float]) -> None:
    @app.task(name="report.daily", unique_by=("account",), unique_for=timedelta(days=1))
    def daily(account: int, force: bool = False) -> None: ...

    first = daily.enqueue(account=1)
    assert daily.enqueue(account=1, force=True) == first
    assert daily.enqueue(account=2).created
    clock[0] += 86_400
    assert daily.enqueue(account=1).created
    # unique_for alone (no unique_by) keys on every argument.
    assert daily.enqueue(account=1, unique_for=60).created


def test_retention_keeps_rows_whose_period_is_not_over(
    app: pgjobs.App, plain: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    held = plain.enqueue(n=1, unique_for=timedelta(days=30))
    expired = plain.enqueue(n=2, unique_for=timedelta(days=30))
    ordinary = plain.enqueue(n=3)
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'succeeded', finished_at = now() - interval '2 days'"
    )
    conn.execute(
        "UPDATE pgjobs.jobs SET unique_until = now() - interval '1 second' WHERE id = %s",
        (expired,),
    )
    deleted = Admin(app).prune(Retention(succeeded=timedelta(days=1)))
    assert deleted["succeeded"] == 2
    assert [r[0] for r in conn.execute("SELECT id FROM pgjobs.jobs").fetchall()] == [held]
    assert plain.enqueue(n=1, unique_for=timedelta(days=30)) == held
    assert ordinary not in (held, expired)


# -- bulk, connections ----------------------------------------------------------------------


def test_bulk_duplicates_within_and_across_calls(
    app: pgjobs.App, enroll: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    existing = enroll.enqueue(user_id=1, course_id=1)
    ids = enroll.enqueue_many(
        [
            {"user_id": 1, "course_id": 1},  # held by a job from before
            {"user_id": 2, "course_id": 1},
            {"user_id": 2, "course_id": 1, "source": "api"},  # same key as the one before
            {"user_id": 3, "course_id": 1},
        ]
    )
    assert ids[0] == existing and ids[2] == ids[1]
    assert [i.created for i in ids if i is not None] == [False, True, False, True]
    assert count(conn) == 3
    assert enroll.enqueue_many(
        [{"user_id": 2, "course_id": 1}, {"user_id": 9, "course_id": 9}], on_duplicate="none"
    ) == [None, pytest.approx(int(ids[3] or 0) + 3, abs=10)]
    # By name, periods bucketed once for the batch.
    timed = app.enqueue_many("courses.enroll", [{"user_id": 5, "course_id": 5}] * 3, unique_for=60)
    assert len(set(timed)) == 1 and [t.created for t in timed if t] == [True, False, False]


def test_every_connection_kind_learns_new_or_existing(
    db_url: str, app: pgjobs.App, enroll: pgjobs.Task[Any, Any]
) -> None:
    with psycopg.connect(db_url) as caller:
        first = enroll.enqueue(user_id=1, course_id=1, conn=caller)
        assert first.created
        assert enroll.enqueue(user_id=1, course_id=1, conn=caller) == first
        caller.commit()
    engine = create_engine(sqlalchemy_url(db_url))
    try:
        with Session(engine) as session:
            again = enroll.enqueue(user_id=1, course_id=1, conn=session)
            assert again == first and not again.created
            bulk = enroll.enqueue_many([{"user_id": 1, "course_id": 1}], conn=session)
            assert bulk == [first] and not bulk[0].created  # type: ignore[union-attr]
            session.commit()
    finally:
        engine.dispose()


async def test_async_enqueue_learns_new_or_existing(
    db_url: str, app: pgjobs.App, enroll: pgjobs.Task[Any, Any]
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as caller:
        first = await enroll.enqueue_async(user_id=1, course_id=1, conn=caller)
        again = await enroll.enqueue_async(user_id=1, course_id=1, source="x", conn=caller)
        assert first is not None and first.created and again == first and not again.created
        await caller.commit()
    engine = create_async_engine(sqlalchemy_url(db_url))
    try:
        async with AsyncSession(engine) as session:
            ids = await enroll.enqueue_many_async(
                [{"user_id": 1, "course_id": 1}, {"user_id": 1, "course_id": 2}], conn=session
            )
            assert ids[0] == first and [i.created for i in ids if i] == [False, True]
            await session.commit()
    finally:
        await engine.dispose()
    by_name = await app.enqueue_async("courses.enroll", {"user_id": 1, "course_id": 2})
    assert by_name == ids[1] and by_name is not None and by_name.duplicate
    await app.aclose()


def test_job_id_behaves_as_an_int() -> None:
    import pickle

    assert pgjobs.JobId(41).created
    job_id = pgjobs.JobId.existing(42)
    assert isinstance(job_id, pgjobs.JobId) and not job_id.created
    assert job_id == 42 and hash(job_id) == hash(42) and f"{job_id}" == "42"
    assert str(job_id) == "42" and json.dumps([job_id]) == "[42]"
    restored = pickle.loads(pickle.dumps(job_id))
    assert restored == 42 and restored.duplicate


# -- 50 concurrent transactions -----------------------------------------------------------

CALLERS = 50


@dataclass
class Caller:
    """What one concurrent enqueuer saw."""

    commits: bool
    job_id: pgjobs.JobId | None = None
    error: BaseException | None = None
    usable_after: bool = False


def _enqueue_and_maybe_commit(
    task: pgjobs.Task[Any, Any], url: str, barrier: threading.Barrier, caller: Caller, bulk: bool
) -> None:
    try:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1")  # in a transaction before the start line
            barrier.wait(timeout=60)
            if bulk:
                ids = task.enqueue_many(
                    [{"user_id": 1, "course_id": 1}, {"user_id": 1, "course_id": 1}], conn=conn
                )
                assert ids[0] == ids[1]
                caller.job_id = ids[0]
            else:
                caller.job_id = task.enqueue(user_id=1, course_id=1, source="t", conn=conn)
            # The transaction must be intact after a skipped duplicate; the short sleep
            # keeps it open so that others queue up behind its key.
            caller.usable_after = conn.execute("SELECT 1 FROM pg_sleep(0.002)").fetchone() == (1,)
            if caller.commits:
                conn.commit()
            else:
                conn.rollback()
    except BaseException as exc:  # asserted on in the main thread
        caller.error = exc


@pytest.mark.parametrize(
    "seed, rollback_share, bulk",
    [
        (1, 0.5, False),
        (2, 0.9, False),
        (3, 0.98, False),
        (4, 0.0, False),
        (5, 1.0, False),
        (6, 0.5, True),
        (7, 1.0, True),
    ],
)
def test_fifty_concurrent_enqueues_of_one_key_with_random_rollbacks(
    db_url: str,
    enroll: pgjobs.Task[Any, Any],
    conn: psycopg.Connection[Any],
    seed: int,
    rollback_share: float,
    bulk: bool,
) -> None:
    rng = random.Random(seed)
    callers = [Caller(commits=rng.random() >= rollback_share) for _ in range(CALLERS)]
    barrier = threading.Barrier(CALLERS)
    threads = [
        threading.Thread(
            target=_enqueue_and_maybe_commit, args=(enroll, db_url, barrier, c, bulk), daemon=True
        )
        for c in callers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an enqueuer hung"

    assert [c.error for c in callers if c.error is not None] == []
    assert all(c.usable_after for c in callers)
    jobs = conn.execute("SELECT id FROM pgjobs.jobs").fetchall()
    if any(c.commits for c in callers):
        assert len(jobs) == 1
        [(job_id,)] = jobs
        assert {c.job_id for c in callers if c.commits} == {job_id}
        # Exactly one committer learned that it created the job.
        assert sum(1 for c in callers if c.commits and c.job_id and c.job_id.created) == 1
    else:
        assert jobs == []


# -- limit keys ---------------------------------------------------------------------------


def test_limit_keys_explicit_and_derived(
    app: pgjobs.App, plain: pgjobs.Task[Any, Any], db_url: str
) -> None:
    @app.task(name="sync.customer", limit_by=("customer",))
    def by_customer(customer: str | int, n: int = 0) -> None: ...

    @app.task(name="sync.pair", limit_by=("region", "tier"))
    def by_pair(region: str, tier: int) -> None: ...

    @app.task(name="sync.fn", limit_by=lambda args: f"acct-{args['a']}" if args["a"] else None)
    def by_fn(a: int) -> None: ...

    def limit_key(job_id: int | None) -> str | None:
        assert job_id is not None
        return app.get_job(job_id).limit_key

    assert limit_key(plain.enqueue(n=1, limit_key="tenant-7")) == "tenant-7"
    assert limit_key(plain.enqueue(n=1)) is None
    assert limit_key(by_customer.enqueue(customer="acme")) == "acme"
    assert limit_key(by_customer.enqueue(customer=42)) == "42"
    assert limit_key(by_customer.enqueue(customer="acme", limit_key="other")) == "other"
    assert limit_key(by_pair.enqueue(region="eu", tier=2)) == '["eu",2]'
    assert limit_key(by_fn.enqueue(a=3)) == "acct-3"
    assert limit_key(by_fn.enqueue(a=0)) is None
    ids = by_customer.enqueue_many([{"customer": "a"}, {"customer": "b"}])
    assert [limit_key(i) for i in ids] == ["a", "b"]
    with psycopg.connect(db_url) as caller:
        caller.execute("SELECT 1")
        for bad in ("", "x" * 1025, "a\x00b", 5):
            with pytest.raises(pgjobs.InvalidJobError, match="limit_key"):
                plain.enqueue(n=1, limit_key=bad, conn=caller)  # type: ignore[arg-type]
        with pytest.raises(pgjobs.InvalidJobError, match="limit_key"):
            by_customer.enqueue(customer="é" * 600, conn=caller)
        assert caller.execute("SELECT 1").fetchone() == (1,)
    assert limit_key(plain.enqueue(n=1, limit_key="é" * 512)) == "é" * 512  # 1024 bytes


def test_jobs_show_prints_the_new_columns(
    app: pgjobs.App, plain: pgjobs.Task[Any, Any], db_url: str
) -> None:
    parent = plain.enqueue(n=1, unique_for=60, limit_key="tenant-1")
    child = plain.enqueue(n=2, depends_on=[parent], on_parent_failure="cancel")
    runner = CliRunner()
    shown = runner.invoke(cli, ["--database-url", db_url, "jobs", "show", str(child)])
    assert shown.exit_code == 0, shown.stderr
    assert "pending" in shown.stdout and "waiting_for" in shown.stdout
    assert f"depends_on  {parent}" in shown.stdout and "cancel" in shown.stdout
    shown = runner.invoke(cli, ["--database-url", db_url, "jobs", "show", str(parent), "--json"])
    detail = json.loads(shown.stdout)
    assert detail["limit_key"] == "tenant-1" and detail["dependents"] == [child]
    assert detail["unique_until"] is not None and detail["waiting_for"] is None

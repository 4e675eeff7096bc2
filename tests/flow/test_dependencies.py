"""Dependencies: ``depends_on`` keeps a job ``pending`` until its parents succeed; a failed
or cancelled parent ends it per ``on_parent_failure`` (cascading down chains); chains and
fan-ins enqueue whole graphs in one transaction; parents' results reach the child.

Most tests drive the worker's own statements (finish_jobs, rescue_jobs) from the test, so
every interleaving they check is forced, not hoped for; the races (a child enqueued while
its parent finishes, parents finishing at the same moment in different workers) are run
many times from threads with a barrier. The last tests run real ``pgjobs work`` processes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from deps_helpers import (
    FINAL,
    Q,
    Workers,
    deps,
    deps_workers,
    finish,
    row,
    run,
    scalar,
    start,
    states,
    wait_until,
)

import pgjobs

__all__ = ["deps", "deps_workers"]  # fixtures


@pytest.fixture
def step(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="d.step", queue="d")
    def step(n: int = 0) -> None: ...

    return step


def errors_of(conn: psycopg.Connection[Any], job_id: int) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = row(conn, job_id)["errors"]
    return errors


# -- waiting and settling -----------------------------------------------------------------


def test_a_child_waits_until_all_its_parents_succeed(
    app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    a, b = step.enqueue(n=1), step.enqueue(n=2)
    child = step.enqueue(n=3, depends_on=[a, b, a])
    job = app.get_job(child)
    assert job.state == "pending" and job.depends_on == [a, b] and job.waiting_for == [a, b]
    assert job.on_parent_failure == "dead"
    assert app.get_job(a).dependents == [child] and app.get_job(b).dependents == [child]
    assert run(conn, b) == 0
    assert app.get_job(child).waiting_for == [a] and states(conn, [child]) == ["pending"]
    run_at_before = row(conn, child)["run_at"]
    assert run(conn, a) == 1  # finish_jobs reports the child it made runnable
    job = app.get_job(child)
    assert job.state == "available" and job.waiting_for == []
    assert job.run_at > run_at_before  # it queues from the moment it became runnable


def test_cancelling_a_parent_settles_its_children(
    app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    """An operator's cancel (waiting or running parent) ends the children per their
    policy, cascading down, and releases those that run whatever happens."""
    waiting, running = step.enqueue(n=1), step.enqueue(n=2)
    start(conn, [running])
    dead_child = step.enqueue(depends_on=[waiting])
    grandchild = step.enqueue(depends_on=[dead_child])
    runs_anyway = step.enqueue(depends_on=[running], on_parent_failure="run")
    app.cancel(waiting)
    app.cancel(running)
    assert states(conn, [dead_child, grandchild, runs_anyway]) == ["dead", "dead", "available"]
    assert errors_of(conn, dead_child)[-1]["parent_state"] == "cancelled"


def test_a_child_of_finished_parents_is_settled_at_enqueue(
    step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    ok, dead, cancelled = step.enqueue(n=1), step.enqueue(n=2), step.enqueue(n=3)
    run(conn, ok)
    run(conn, dead, "dead")
    run(conn, cancelled, "cancelled")
    assert states(conn, [step.enqueue(depends_on=[ok])]) == ["available"]
    assert states(conn, [step.enqueue(depends_on=[ok], delay=60)]) == ["scheduled"]
    dead_child = step.enqueue(depends_on=[ok, cancelled, dead])
    assert states(conn, [dead_child]) == ["dead"]
    [error] = errors_of(conn, dead_child)
    assert (error["type"], error["parent"], error["parent_state"]) == ("ParentFailed", dead, "dead")
    assert error["message"] == f"parent job {dead} ended dead"
    cancel_child = step.enqueue(depends_on=[cancelled], on_parent_failure="cancel")
    assert states(conn, [cancel_child]) == ["cancelled"]
    assert errors_of(conn, cancel_child)[0]["parent_state"] == "cancelled"
    assert states(conn, [step.enqueue(depends_on=[dead], on_parent_failure="run")]) == ["available"]
    # Finished parents are not told about children that do not wait for them.
    assert row(conn, ok)["dependents"] is None


@pytest.mark.parametrize(
    "parent_end, policy, child_end",
    [
        ("dead", "dead", "dead"),
        ("cancelled", "dead", "dead"),
        ("dead", "cancel", "cancelled"),
        ("cancelled", "cancel", "cancelled"),
        ("dead", "run", "available"),
        ("cancelled", "run", "available"),
    ],
)
def test_failure_policies(
    step: pgjobs.Task[Any, Any],
    conn: psycopg.Connection[Any],
    parent_end: str,
    policy: str,
    child_end: str,
) -> None:
    failing, other = step.enqueue(n=1), step.enqueue(n=2)
    child = step.enqueue(n=3, depends_on=[failing, other], on_parent_failure=policy)
    assert run(conn, failing, parent_end) == 0
    if policy == "run":
        # It still waits for the other parent, then runs whatever became of the first.
        assert states(conn, [child]) == ["pending"] and row(conn, child)["waiting_for"] == [other]
        assert run(conn, other) == 1
    else:
        # Ended at once, with the reason on the child; the other parent is not waited for.
        assert row(conn, child)["finished_at"] is not None
        [error] = errors_of(conn, child)
        assert (error["parent"], error["parent_state"]) == (failing, parent_end)
        assert run(conn, other) == 0
    assert states(conn, [child]) == [child_end]


def test_task_default_policy(app: pgjobs.App, conn: psycopg.Connection[Any]) -> None:
    @app.task(name="d.tolerant", on_parent_failure="run")
    def tolerant() -> None: ...

    parent = app.enqueue("d.tolerant")
    assert parent is not None
    child = tolerant.enqueue(depends_on=[parent])
    assert row(conn, child)["on_parent_failure"] == "run"
    run(conn, parent, "dead")
    assert states(conn, [child]) == ["available"]
    with pytest.raises(pgjobs.ConfigurationError, match="on_parent_failure"):
        app.task(name="d.bad", on_parent_failure="ignore")(lambda: None)  # type: ignore[arg-type]


def test_a_failure_cascades_down_a_chain(
    app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    a, b, c, d, e = app.chain(
        step.job(n=1),
        step.job(n=2),
        step.job(n=3, on_parent_failure="cancel"),
        step.job(n=4, on_parent_failure="run"),
        step.job(n=5),
    )
    assert states(conn, [a, b, c, d, e]) == ["available"] + ["pending"] * 4
    # d runs once c has finished, whatever became of it: the only one made runnable.
    assert run(conn, a, "dead") == 1
    assert states(conn, [a, b, c, d, e]) == ["dead", "dead", "cancelled", "available", "pending"]
    assert errors_of(conn, b)[0]["parent"] == a and errors_of(conn, c)[0]["parent"] == b
    assert errors_of(conn, c)[0]["parent_state"] == "dead"
    assert run(conn, d) == 1
    assert states(conn, [e]) == ["available"]


def test_a_rescued_parent_that_goes_dead_settles_its_children(
    step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    parent = step.enqueue(n=1, max_attempts=1)
    child = step.enqueue(n=2, depends_on=[parent])
    start(conn, [parent], worker="gone")  # a worker whose row is gone: rescued
    available, dead, _ = conn.execute(
        Q.rescue_jobs, {"timeout": 30, "worker": None, "held": []}
    ).fetchone()  # type: ignore[misc]
    assert (available, dead) == (0, 1)
    assert states(conn, [parent, child]) == ["dead", "dead"]
    assert errors_of(conn, child)[0]["parent"] == parent


def test_a_parent_finishing_again_changes_nothing(
    step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    # An operator retries a dead parent: its children were settled when it died.
    parent = step.enqueue(n=1)
    dead_child = step.enqueue(depends_on=[parent])
    run(conn, parent, "dead")
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'available', finished_at = NULL WHERE id = %s", (parent,)
    )
    assert run(conn, parent) == 0
    assert states(conn, [dead_child]) == ["dead"]


def test_settle_dependents_for_one_parent(
    step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    # The form an operator's cancel uses: settle_dependents(id, final state, dependents).
    parent = step.enqueue(n=1)
    child = step.enqueue(depends_on=[parent])
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'cancelled', finished_at = now() WHERE id = %s", (parent,)
    )
    settled = scalar(
        conn,
        "SELECT pgjobs.settle_dependents(id, 'cancelled', dependents) FROM pgjobs.jobs "
        "WHERE id = %s",
        (parent,),
    )
    assert settled == 0 and states(conn, [child]) == ["dead"]
    assert scalar(conn, "SELECT pgjobs.settle_dependents(1::bigint, 'dead', NULL)") == 0


# -- enqueue: input, transactions, helpers --------------------------------------------------


def test_missing_parents_write_nothing_and_keep_the_transaction(
    db_url: str, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    real = step.enqueue(n=1)
    with psycopg.connect(db_url) as caller:
        step.enqueue(n=2, conn=caller)  # the caller's own work in this transaction
        with pytest.raises(pgjobs.MissingParentError) as raised:
            step.enqueue(n=3, depends_on=[real, 10**12, 10**12 + 1], conn=caller)
        assert raised.value.missing == [10**12, 10**12 + 1]
        assert isinstance(raised.value, pgjobs.InvalidJobError)
        with pytest.raises(pgjobs.MissingParentError):
            step.enqueue_many([{"n": 4}, {"n": 5}], depends_on=[10**12], conn=caller)
        assert caller.execute("SELECT 1").fetchone() == (1,)  # still usable
        caller.commit()
    assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs") == 2
    assert row(conn, real)["dependents"] is None
    # A parent enqueued by a transaction that has not committed is not there yet.
    with psycopg.connect(db_url) as other:
        uncommitted = step.enqueue(n=6, conn=other)
        with pytest.raises(pgjobs.MissingParentError):
            step.enqueue(n=7, depends_on=[uncommitted])
        other.rollback()


def test_bad_dependency_options(step: pgjobs.Task[Any, Any]) -> None:
    for bad in ([0], [-1], ["1"], [True], 5, "12", [2**63]):
        with pytest.raises(pgjobs.InvalidJobError, match="depends_on"):
            step.enqueue(depends_on=bad)  # type: ignore[arg-type]
    with pytest.raises(pgjobs.InvalidJobError, match="on_parent_failure"):
        step.enqueue(depends_on=[1], on_parent_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(pgjobs.InvalidJobError, match="conn"):
        step.job(conn=None)
    with pytest.raises(pgjobs.InvalidJobError, match="bad arguments"):
        step.job(nope=1)


def test_bulk_children_and_empty_depends_on(
    app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    parent = step.enqueue(n=0)
    children = step.enqueue_many([{"n": i} for i in range(1, 4)], depends_on=[parent])
    assert states(conn, children) == ["pending"] * 3  # type: ignore[arg-type]
    assert app.get_job(parent).dependents == children
    by_name = app.enqueue_many("d.step", [{"n": 9}], depends_on=[parent])
    assert app.get_job(parent).dependents == [*children, *by_name]
    assert states(conn, [step.enqueue(n=5, depends_on=[])]) == ["available"]
    assert run(conn, parent) == 4


def test_a_duplicate_child_resolves_to_the_existing_job(
    step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    a, b = step.enqueue(n=1), step.enqueue(n=2)
    child = step.enqueue(n=3, depends_on=[a], unique_key="child")
    again = step.enqueue(n=3, depends_on=[b], unique_key="child")
    assert again == child and again.duplicate
    assert row(conn, b)["dependents"] is None  # the duplicate was never linked
    assert row(conn, child)["depends_on"] == [a]


def test_chain_and_fan_in_are_one_transaction(
    db_url: str, app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(db_url) as caller:
        ids = app.chain(step.job(n=1), step.job(n=2), conn=caller)
        *parents, child = app.fan_in([step.job(n=3), step.job(n=4)], then=step.job(), conn=caller)
        caller.rollback()
    assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs") == 0
    with psycopg.connect(db_url, autocommit=True) as caller:
        # An autocommit connection still gets the whole graph in one transaction.
        with pytest.raises(pgjobs.InvalidJobError):
            app.chain(step.job(n=1), "not a job", conn=caller)  # type: ignore[arg-type]
        ids = app.chain(step.job(n=1), step.job(n=2), step.job(n=3), conn=caller)
    assert [row(conn, i)["depends_on"] for i in ids] == [None, [ids[0]], [ids[1]]]
    *parents, child = app.fan_in(
        [step.job(n=1), step.job(n=2, depends_on=[ids[2]])], then=step.job(n=9)
    )
    assert row(conn, child)["depends_on"] == parents
    assert states(conn, [*parents, child]) == ["available", "pending", "pending"]
    with pytest.raises(pgjobs.InvalidJobError, match="at least one"):
        app.fan_in([], then=step.job())


async def test_chain_and_fan_in_async(
    db_url: str, app: pgjobs.App, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as caller:
        ids = await app.chain_async(step.job(n=1), step.job(n=2), conn=caller)
        fan = await app.fan_in_async([step.job(n=3), step.job(n=4)], then=step.job(), conn=caller)
        child = await step.enqueue_async(depends_on=[fan[-1]], conn=caller)
        await caller.commit()
    assert states(conn, [*ids, *fan, child]) == [
        *("available", "pending"),
        *("available", "available", "pending"),
        "pending",
    ]
    own = await app.fan_in_async([step.job(n=5)], then=step.job(n=6))
    assert row(conn, own[1])["depends_on"] == [own[0]]
    await app.aclose()


# -- races ------------------------------------------------------------------------------


def _together(*actions: Callable[[], None]) -> None:
    """Run ``actions`` on threads released at one barrier; re-raise the first failure."""
    barrier = threading.Barrier(len(actions))
    failures: list[BaseException] = []

    def go(action: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=30)
            action()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=go, args=(a,), daemon=True) for a in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if failures:
        raise failures[0]


def test_a_child_enqueued_while_its_parent_finishes_is_never_stranded(
    db_url: str, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    rng = random.Random(7)
    with (
        psycopg.connect(db_url) as producer,
        psycopg.connect(db_url, autocommit=True) as worker,
    ):
        for i in range(150):
            parent = step.enqueue(n=i)
            [token] = start(conn, [parent])
            end = rng.choice(["succeeded", "succeeded", "dead"])
            hold, lag = rng.uniform(0, 0.004), rng.uniform(0, 0.004)
            commits = rng.random() < 0.9
            children: list[int] = []

            def enqueue_child(
                parent: int = parent, hold: float = hold, commits: bool = commits
            ) -> None:
                children.append(step.enqueue(n=-i, depends_on=[parent], conn=producer))  # noqa: B023
                time.sleep(hold)  # the parent's row stays locked until the commit
                producer.commit() if commits else producer.rollback()

            def finish_parent(
                parent: int = parent, token: Any = token, end: str = end, lag: float = lag
            ) -> None:
                time.sleep(lag)
                finish(worker, [(parent, token, end)])

            _together(enqueue_child, finish_parent)
            [child] = children
            expected = ("available" if end == "succeeded" else "dead") if commits else "missing"
            assert states(conn, [child]) == [expected], (i, end, hold, lag)


def test_parents_finishing_at_once_in_different_workers_settle_the_child_once(
    db_url: str, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    rng = random.Random(11)
    with (
        psycopg.connect(db_url, autocommit=True) as w1,
        psycopg.connect(db_url, autocommit=True) as w2,
    ):
        for i in range(100):
            p1, p2 = step.enqueue(n=1), step.enqueue(n=2)
            child = step.enqueue(n=3, depends_on=[p1, p2])
            t1, t2 = start(conn, [p1, p2])
            ends = rng.choice([("succeeded", "succeeded")] * 3 + [("succeeded", "dead")])
            released: list[int] = []
            _together(
                lambda: released.append(finish(w1, [(p1, t1, ends[0])], "w1")[1]),  # noqa: B023
                lambda: released.append(finish(w2, [(p2, t2, ends[1])], "w2")[1]),  # noqa: B023
            )
            expected = "available" if ends == ("succeeded", "succeeded") else "dead"
            assert states(conn, [child]) == [expected], i
            assert sum(released) == (1 if expected == "available" else 0)
            # A dead child keeps what it was still waiting for: the failed parent at least.
            waiting = row(conn, child)["waiting_for"]
            assert waiting == [] if expected == "available" else p2 in waiting


def test_crossing_fan_ins_in_two_batches_do_not_deadlock(
    db_url: str, step: pgjobs.Task[Any, Any], conn: psycopg.Connection[Any]
) -> None:
    # Parents 1-4; fan-in D waits for 1 and 4, C for 2 and 3. Worker 1 finishes 1 and 2 in
    # one batch, worker 2 finishes 3 and 4: each batch reaches both children, from parents
    # in opposite orders. Children are locked in id order per batch, so neither waits for
    # the other in a cycle.
    with (
        psycopg.connect(db_url, autocommit=True) as w1,
        psycopg.connect(db_url, autocommit=True) as w2,
    ):
        for _ in range(60):
            p = [step.enqueue(n=i) for i in range(4)]
            d = step.enqueue(depends_on=[p[0], p[3]])
            c = step.enqueue(depends_on=[p[1], p[2]])
            tokens = start(conn, p)
            _together(
                lambda: finish(w1, [(p[0], tokens[0], "succeeded"), (p[1], tokens[1], "succeeded")]),  # noqa: B023, E501
                lambda: finish(w2, [(p[2], tokens[2], "succeeded"), (p[3], tokens[3], "succeeded")]),  # noqa: B023, E501
            )  # fmt: skip
            assert states(conn, [c, d]) == ["available", "available"]


# -- real workers -------------------------------------------------------------------------


def _wait_final(conn: psycopg.Connection[Any], ids: list[int], timeout: float = 60) -> None:
    wait_until(
        lambda: all(s in FINAL for s in states(conn, ids)),
        timeout,
        f"jobs {ids} final: {list(zip(ids, states(conn, ids), strict=True))}",
    )


def _result(conn: psycopg.Connection[Any], job_id: int) -> Any:
    return row(conn, job_id)["result"]


def test_chains_and_fan_ins_across_worker_processes(
    deps: pgjobs.App, deps_workers: Workers, conn: psycopg.Connection[Any]
) -> None:
    import deps_app

    for _ in range(3):
        deps_workers.start(queues="flow", concurrency=3)
    s, collect = deps_app.step, deps_app.collect
    chain = deps.chain(
        s.job(label="a", sleep=0.05), s.job(label="b"), deps_app.acollect.job(label="c")
    )
    fan_ins: dict[str, list[list[int]]] = {k: [] for k in ("ok", "dead", "cancel", "run", "ctl")}
    for i in range(12):
        kind = list(fan_ins)[i % 5]
        parents = [
            s.job(label=f"{i}.0", sleep=0.02 * (i % 3)),
            s.job(label=f"{i}.1", fail=kind in ("dead", "cancel", "run")),
            s.job(label=f"{i}.2", cancel=kind == "ctl", sleep=0.01),
        ]
        policy = {"cancel": "cancel", "run": "run"}.get(kind, "dead")
        then = collect.job(label=f"{i}.then", on_parent_failure=policy)
        fan_ins[kind].append(deps.fan_in(parents, then=then))
    broken = deps.chain(s.job(label="x", fail=True), s.job(label="y"), s.job(label="z"))
    everything = [*chain, *broken, *(i for group in fan_ins.values() for f in group for i in f)]
    _wait_final(conn, everything)

    a, b, c = chain
    assert states(conn, chain) == ["succeeded"] * 3
    assert _result(conn, c)["parents"] == {str(b): {"label": "b", "pid": _result(conn, b)["pid"]}}
    assert row(conn, b)["started_at"] >= row(conn, a)["finished_at"]
    assert states(conn, broken) == ["dead", "dead", "dead"]
    for *parents, child in fan_ins["ok"]:
        assert states(conn, [child]) == ["succeeded"]
        got = _result(conn, child)["parents"]
        assert sorted(got) == sorted(map(str, parents))
        assert row(conn, child)["started_at"] >= max(row(conn, p)["finished_at"] for p in parents)
    for kind, child_end in (("dead", "dead"), ("cancel", "cancelled"), ("ctl", "dead")):
        for *parents, child in fan_ins[kind]:
            assert states(conn, [child]) == [child_end]
            failing = parents[1] if kind != "ctl" else parents[2]
            assert errors_of(conn, child)[-1]["parent"] == failing
    for *parents, child in fan_ins["run"]:
        assert states(conn, [child]) == ["succeeded"]  # ran without the failed parent's result
        assert sorted(_result(conn, child)["parents"]) == sorted(str(p) for p in parents[::2])
    pids = {r[0] for r in conn.execute("SELECT DISTINCT worker FROM pgjobs.jobs").fetchall()}
    assert len(pids - {None}) >= 2  # several processes took part


def test_children_start_at_once_without_waiting_for_a_poll(
    deps: pgjobs.App, deps_workers: Workers, conn: psycopg.Connection[Any]
) -> None:
    import deps_app

    # A 60 s fallback poll: only the finishing worker's own claim can start the children
    # (workers send no NOTIFY), so a chain of 6 finishing well within it shows the hook.
    deps_workers.start(queues="flow", concurrency=2, poll_interval=60)
    ids = deps.chain(*(deps_app.step.job(label=str(i)) for i in range(6)))
    _wait_final(conn, ids, timeout=20)
    assert states(conn, ids) == ["succeeded"] * 6


def test_children_enqueued_while_workers_finish_their_parents(
    deps: pgjobs.App, deps_workers: Workers, conn: psycopg.Connection[Any], db_url: str
) -> None:
    import deps_app

    for _ in range(2):
        deps_workers.start(queues="flow", concurrency=4)
    rng = random.Random(3)
    children: list[int] = []
    with psycopg.connect(db_url) as producer:
        for i in range(60):
            parent = deps_app.step.enqueue(label=f"p{i}", sleep=rng.choice([0, 0.005, 0.02]))
            time.sleep(rng.uniform(0, 0.01))  # the parent may be running or done by now
            children.append(
                deps_app.step.enqueue(label=f"c{i}", depends_on=[parent], conn=producer)
            )
            time.sleep(rng.uniform(0, 0.005))
            producer.commit()
    _wait_final(conn, children)
    assert states(conn, children) == ["succeeded"] * len(children)

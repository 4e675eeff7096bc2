"""Chains and fan-ins: several jobs that wait for each other, enqueued in one transaction.

``task.job(**args, **options)`` makes a :class:`JobCall` (a job not enqueued yet);
:meth:`pgjobs.App.chain` and :meth:`pgjobs.App.fan_in` enqueue them with ``depends_on``
filled in, one statement per step, all in the caller's transaction (or in one transaction
of pgjobs' own when no ``conn`` is given): the whole graph exists, or none of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from pgjobs.connections import async_connection, sync_connection
from pgjobs.enqueue import JobId, JobSpec, Options
from pgjobs.errors import InvalidJobError

if TYPE_CHECKING:
    from pgjobs.app import App
    from pgjobs.task import Task

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobCall:
    """A job of a task with its arguments and enqueue options, checked but not enqueued:
    ``task.job(**args, **options)``. Enqueue it as a step of :meth:`pgjobs.App.chain` or
    :meth:`pgjobs.App.fan_in`."""

    task: Task[Any, Any]
    args: dict[str, Any]
    options: Options

    def spec(self, parents: Sequence[int] = ()) -> JobSpec:
        """The job to insert, waiting for ``parents`` besides its own ``depends_on``."""
        options = self.options.with_parents(parents) if parents else self.options
        return self.task._spec(self.args, options)


def check_calls(app: App, calls: Sequence[object], what: str) -> list[JobCall]:
    """``calls`` if they are JobCalls of tasks of ``app`` (the jobs go to its schema)."""
    checked = []
    for call in calls:
        if not isinstance(call, JobCall):
            raise InvalidJobError(f"{what} takes task.job(...) calls, not {call!r}")
        if call.task.app is not app:
            raise InvalidJobError(f"{what}: task {call.task.name!r} belongs to another App")
        checked.append(call)
    if not checked:
        raise InvalidJobError(f"{what} needs at least one job")
    return checked


def chain_writer(calls: list[JobCall]) -> Callable[[Insert], list[JobId]]:
    """Write ``calls`` so that each waits for the one before it."""

    def write(insert: Insert) -> list[JobId]:
        ids: list[JobId] = []
        for call in calls:
            ids.append(_one(insert([call.spec(ids[-1:])])))
        return ids

    return write


def fan_in_writer(parents: list[JobCall], then: JobCall) -> Callable[[Insert], list[JobId]]:
    """Write ``parents`` with one statement, then ``then`` waiting for all of them."""

    def write(insert: Insert) -> list[JobId]:
        ids = [_one([job_id]) for job_id in insert([call.spec() for call in parents])]
        return [*ids, _one(insert([then.spec(ids)]))]

    return write


def chain_writer_async(calls: list[JobCall]) -> Callable[[AsyncInsert], Awaitable[list[JobId]]]:
    """The async twin of :func:`chain_writer`."""

    async def write(insert: AsyncInsert) -> list[JobId]:
        ids: list[JobId] = []
        for call in calls:
            ids.append(_one(await insert([call.spec(ids[-1:])])))
        return ids

    return write


def fan_in_writer_async(
    parents: list[JobCall], then: JobCall
) -> Callable[[AsyncInsert], Awaitable[list[JobId]]]:
    """The async twin of :func:`fan_in_writer`."""

    async def write(insert: AsyncInsert) -> list[JobId]:
        ids = [_one([job_id]) for job_id in await insert([call.spec() for call in parents])]
        return [*ids, _one(await insert([then.spec(ids)]))]

    return write


Insert = Callable[[list[JobSpec]], list[JobId | None]]
AsyncInsert = Callable[[list[JobSpec]], Awaitable[list[JobId | None]]]


def _one(ids: list[JobId | None]) -> JobId:
    # Steps resolve duplicates to the existing job ("existing"), so there is always an id.
    [job_id] = ids
    assert job_id is not None
    return job_id


def in_transaction(app: App, conn: Any, write: Callable[[Insert], T]) -> T:
    """Run ``write`` with an insert function bound to the caller's transaction (``conn``)
    or to one transaction of pgjobs' own."""
    if conn is not None:
        caller = sync_connection(conn)
        if not caller.autocommit:
            return write(_inserter(app, caller))
        with caller.transaction():  # an autocommit connection: still all or nothing
            return write(_inserter(app, caller))
    with app.pool.connection() as own, own.transaction():
        return write(_inserter(app, own))


async def in_transaction_async(
    app: App, conn: Any, write: Callable[[AsyncInsert], Awaitable[T]]
) -> T:
    """The async twin of :func:`in_transaction`."""
    if conn is not None:
        caller = await async_connection(conn)
        if not caller.autocommit:
            return await write(_async_inserter(app, caller))
        async with caller.transaction():
            return await write(_async_inserter(app, caller))
    pool = await app.async_pool()
    async with pool.connection() as own, own.transaction():
        return await write(_async_inserter(app, own))


def _inserter(app: App, conn: psycopg.Connection[Any]) -> Insert:
    return lambda specs: app.writer.insert(conn, specs, "existing")


def _async_inserter(app: App, conn: psycopg.AsyncConnection[Any]) -> AsyncInsert:
    return lambda specs: app.writer.insert_async(conn, specs, "existing")

"""Server-sent event streams: the dashboard's live feed and the per-job progress feed.

A stream ends when the browser goes away (Starlette cancels it), when the hub closes, or,
for one job, after the job's final event. Comments every ``KEEPALIVE`` seconds keep
proxies from timing out an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from pgjobs.dashboard.hub import CLOSED, FINAL_KINDS, RESYNC, Hub, Message, Subscription
from pgjobs.job import FINAL_STATES, Job

KEEPALIVE = 15.0
# How long a browser waits before reconnecting a dropped stream (milliseconds).
RETRY_MS = 2000

ReadJob = Callable[[int], Awaitable[Job | None]]


def encode(message: Message) -> str:
    """One event in the text/event-stream format (multi-line data split over lines)."""
    lines = message.data.split("\n")
    return f"event: {message.name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def response(events: AsyncIterator[str]) -> StreamingResponse:
    """A text/event-stream response, never cached nor buffered by a proxy."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def feed(hub: Hub, sub: Subscription) -> AsyncIterator[str]:
    """The dashboard's feed: job events of the subscription and page snapshots."""
    try:
        yield f"retry: {RETRY_MS}\n\n"
        yield encode(Message("hello", "{}"))
        while True:
            message = await sub.get(KEEPALIVE)
            if message is None:
                yield ": keepalive\n\n"
            elif message is CLOSED:
                return
            else:
                yield encode(message)
    finally:
        hub.unsubscribe(sub)


def job_snapshot(job: Job) -> Message:
    """A job's current state, as the first event of its feed (and after a resync)."""
    data = {
        "id": job.id,
        "queue": job.queue,
        "task": job.task,
        "state": job.state.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": job.progress,
    }
    return Message("snapshot", json.dumps(data, default=str))


async def job_feed(hub: Hub, job_id: int, read_job: ReadJob) -> AsyncIterator[str]:
    """One job's feed: a snapshot, then its events until the final one.

    The subscription starts before the snapshot is read, so no event falls between them
    (one may arrive twice: applying it again changes nothing).
    """
    sub = hub.subscribe(frozenset({job_id}))
    try:
        yield f"retry: {RETRY_MS}\n\n"
        if not (snapshot := await _snapshot(job_id, read_job)):
            yield encode(Message("gone", json.dumps({"id": job_id})))
            return
        yield encode(snapshot[0])
        if snapshot[1]:
            return
        async for chunk in _job_events(sub, job_id, read_job):
            yield chunk
    finally:
        hub.unsubscribe(sub)


async def _snapshot(job_id: int, read_job: ReadJob) -> tuple[Message, bool] | None:
    job = await read_job(job_id)
    if job is None:
        return None
    return job_snapshot(job), job.state in FINAL_STATES


async def _job_events(sub: Subscription, job_id: int, read_job: ReadJob) -> AsyncIterator[str]:
    while True:
        message = await sub.get(KEEPALIVE)
        if message is None:
            yield ": keepalive\n\n"
            continue
        if message is CLOSED:
            return
        if message is RESYNC:
            snapshot = await _snapshot(job_id, read_job)
            if snapshot is None:
                yield encode(Message("gone", json.dumps({"id": job_id})))
                return
            yield encode(snapshot[0])
            if snapshot[1]:
                return
            continue
        yield encode(message)
        if _kind(message) in FINAL_KINDS:
            return


def _kind(message: Message) -> Any:
    try:
        return json.loads(message.data).get("kind")
    except (ValueError, AttributeError):
        return None

"""Live updates over server-sent events, fed by the hub's LISTEN connection, with real
worker processes; and the metrics a worker serves itself (``--metrics-port``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx2
import psycopg
from dash_helpers import LiveServer, read_events, subscribed, wait_until
from ops_helpers import add_job
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount
from worker_processes import Workers

import pgjobs
from pgjobs.dashboard import create_app, progress_app

# Every wait on a stream is bounded by this read timeout (keepalives come every 15 s).
READ = httpx2.Timeout(5.0, read=20.0)


def _job_events(events: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [json.loads(data) for name, data in events if name == "job"]


def test_a_job_feed_streams_progress_until_the_job_succeeds(
    dapp: pgjobs.App,
    conn: psycopg.Connection[Any],
    serve: Callable[[Any], LiveServer],
    workers: Workers,
) -> None:
    from dash_app import progress

    server = serve(create_app(dapp))
    job_id = progress.enqueue(steps=2, pause=0.1)
    url = f"{server.url}/api/jobs/{job_id}/events"
    with httpx2.stream("GET", url, timeout=READ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = read_events(lines, lambda events: bool(events))
        assert first[0][0] == "snapshot"
        assert json.loads(first[0][1])["state"] == "available"
        # The worker sees the dashboard's subscriber when it starts: events flow at once.
        wait_until(lambda: subscribed(conn), 10, "the hub listens")
        workers.start()
        rest = read_events(
            lines, lambda events: any(n == "job" and '"succeeded"' in d for n, d in events)
        )
    seen = _job_events(rest)
    kinds = [event["kind"] for event in seen]
    assert kinds == ["started", "progress", "progress", "succeeded"], kinds
    assert seen[1]["progress"] == 0.5 and seen[1]["progress_data"] == {"step": 1}
    assert seen[2]["progress"] == 1.0 and seen[0]["state"] == "running"
    assert seen[-1]["state"] == "succeeded" and all(e["id"] == job_id for e in seen)


def test_a_job_feed_of_a_finished_or_unknown_job_ends_at_once(
    dapp: pgjobs.App, conn: psycopg.Connection[Any], serve: Callable[[Any], LiveServer]
) -> None:
    server = serve(create_app(dapp))
    done = add_job(conn, state="succeeded")
    with httpx2.stream("GET", f"{server.url}/api/jobs/{done}/events", timeout=READ) as response:
        events = read_events(response.iter_lines(), lambda events: False)
    assert [name for name, _ in events] == ["snapshot"]
    assert json.loads(events[0][1])["state"] == "succeeded"
    with httpx2.stream("GET", f"{server.url}/api/jobs/777/events", timeout=READ) as response:
        events = read_events(response.iter_lines(), lambda events: False)
    assert events == [("gone", '{"id": 777}')]


def test_the_overview_feed_sends_a_fresh_snapshot_when_jobs_change(
    dapp: pgjobs.App,
    conn: psycopg.Connection[Any],
    serve: Callable[[Any], LiveServer],
    workers: Workers,
) -> None:
    from dash_app import quick

    server = serve(create_app(dapp))
    with httpx2.stream("GET", f"{server.url}/events?view=overview", timeout=READ) as response:
        lines = response.iter_lines()
        assert read_events(lines, lambda events: bool(events))[0][0] == "hello"
        wait_until(lambda: subscribed(conn), 10, "the hub listens")
        # An enqueue's wake-up notification alone makes the hub refresh the overview.
        quick.enqueue(n=1)
        events = read_events(lines, lambda events: any(n == "overview" for n, _ in events))
        html = next(data for name, data in events if name == "overview")
        assert 'data-queue="dash"' in html
        assert 'state=available">1<' in html
        workers.start()
        events = read_events(
            lines,
            lambda events: any(n == "overview" and 'state=succeeded">1<' in d for n, d in events),
        )
    assert events


def test_the_jobs_page_feed_carries_the_events_of_the_jobs_it_shows(
    dapp: pgjobs.App,
    conn: psycopg.Connection[Any],
    serve: Callable[[Any], LiveServer],
    workers: Workers,
) -> None:
    from dash_app import quick

    server = serve(create_app(dapp))
    shown, other = quick.enqueue(n=1), quick.enqueue(n=2)
    url = f"{server.url}/events?view=jobs&ids={shown}"
    with httpx2.stream("GET", url, timeout=READ) as response:
        lines = response.iter_lines()
        read_events(lines, lambda events: bool(events))
        wait_until(lambda: subscribed(conn), 10, "the hub listens")
        workers.start()
        events = read_events(lines, lambda events: any('"succeeded"' in d for _, d in events))
    seen = _job_events(events)
    assert {event["id"] for event in seen} == {shown} and other != shown
    assert [event["state"] for event in seen] == ["running", "succeeded"]


def test_an_application_streams_progress_to_its_own_users(
    dapp: pgjobs.App,
    conn: psycopg.Connection[Any],
    serve: Callable[[Any], LiveServer],
    workers: Workers,
) -> None:
    from dash_app import progress

    outer = Starlette(routes=[Mount("/progress", progress_app(dapp))])
    server = serve(outer)
    job_id = progress.enqueue(steps=1, pause=0.05)
    with httpx2.stream("GET", f"{server.url}/progress/{job_id}", timeout=READ) as response:
        lines = response.iter_lines()
        read_events(lines, lambda events: bool(events))
        wait_until(lambda: subscribed(conn), 10, "the hub listens")
        workers.start()
        events = read_events(lines, lambda events: False)  # ends after the final event
    assert [event["kind"] for event in _job_events(events)] == ["started", "progress", "succeeded"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _counter(samples: dict[Any, float], name: str, task: str) -> float:
    return samples.get((name, (("queue", "dash"), ("task", task))), 0.0)


def test_a_worker_serves_its_own_metrics(
    dapp: pgjobs.App, conn: psycopg.Connection[Any], workers: Workers
) -> None:
    from dash_app import flaky, quick

    port = _free_port()
    workers.start("--metrics-port", str(port))
    for n in range(3):
        quick.enqueue(n=n)
    flaky.enqueue()

    def counted() -> dict[Any, float] | None:
        samples = _scrape(port)
        done = _counter(samples, "pgjobs_jobs_succeeded_total", "d.quick") == 3
        return samples if done and _counter(samples, "pgjobs_jobs_dead_total", "d.flaky") else None

    samples = wait_until(counted, 20, "the worker counted its jobs")
    assert _counter(samples, "pgjobs_jobs_started_total", "d.quick") == 3
    assert _counter(samples, "pgjobs_jobs_failed_total", "d.flaky") == 1
    duration = ("queue", "dash"), ("task", "d.quick"), ("outcome", "succeeded")
    key = ("pgjobs_job_duration_seconds_count", tuple(sorted(duration)))
    assert samples[key] == 3


def test_supervised_workers_serve_one_sum_on_one_port(
    dapp: pgjobs.App, conn: psycopg.Connection[Any], workers: Workers
) -> None:
    from dash_app import quick

    port = _free_port()
    workers.start("--metrics-port", str(port), processes=2)
    quick.enqueue_many([{"n": n} for n in range(20)])
    wait_until(
        lambda: _counter(_scrape(port), "pgjobs_jobs_succeeded_total", "d.quick") == 20,
        30,
        "20 jobs counted across both processes",
    )

"""The dashboard over HTTP (Starlette's TestClient, a real database): every page, every
action, the guards (CSRF, read-only, auth, identifiers), mounting, and /metrics."""

from __future__ import annotations

import base64
import os
from typing import Any

import pgbouncer
import psycopg
import pytest
from dash_helpers import csrf_token
from ops_helpers import add_job
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import pgjobs
from pgjobs.admin import Admin
from pgjobs.dashboard import Auth, create_app
from pgjobs.limits import QueueLimits


def state_of(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    row = conn.execute("SELECT state::text FROM pgjobs.jobs WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else str(row[0])


def post(client: TestClient, path: str, data: dict[str, str] | None = None, page: str = "/") -> Any:
    """POST a form the way the page would: with the page's CSRF token (and cookie)."""
    token = csrf_token(client.get(page).text)
    return client.post(path, data={"csrf_token": token, **(data or {})}, follow_redirects=False)


# -- pages --------------------------------------------------------------------------------


def test_overview_shows_each_queue_with_depths_rates_chart_and_pause(
    client: TestClient, conn: psycopg.Connection[Any], dapp: pgjobs.App
) -> None:
    for _ in range(3):
        add_job(conn, queue="emails", state="available", run_at_ago=90)
    add_job(conn, queue="emails", state="succeeded", finished_ago=30)
    add_job(conn, queue="emails", state="dead", errors_ago=[20])
    add_job(conn, queue="reports", state="running")
    Admin(dapp).pause_queue("reports")
    Admin(dapp).set_queue_limits("reports", QueueLimits.build(concurrency=3, rate="20/s"))

    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert 'data-queue="emails"' in html and 'data-queue="reports"' in html
    emails = html.split('data-queue="emails"')[1].split("</tr>")[0]
    assert 'data-state="available"><a href="/jobs?queue=emails&amp;state=available">3<' in emails
    assert 'data-state="dead"><a href="/jobs?queue=emails&amp;state=dead">1<' in emails
    assert "1m 3" in emails  # oldest waiting job: 90 s
    assert '<polyline class="ok"' in emails and '<polyline class="failed"' in emails
    assert "50.0%" in emails  # one success, one failed attempt in 15 minutes
    reports = html.split('data-queue="reports"')[1].split("</tr>")[0]
    assert "state-paused" in reports and "/queues/reports/resume" in reports
    assert "limit: 3 running, 20 per 1s" in reports and 'data-field="limits"' not in emails
    assert 'data-live="overview"' in html


def test_jobs_filter_by_state_queue_and_task_and_paginate(
    client: TestClient, conn: psycopg.Connection[Any]
) -> None:
    ids = [add_job(conn, queue="q1", task="t.a") for _ in range(60)]
    dead = add_job(conn, queue="q2", task="t.b", state="dead")

    first = client.get("/jobs").text
    assert first.count("data-job-id=") == 50
    assert f'data-job-id="{dead}"' in first and f'data-job-id="{ids[11]}"' in first
    assert f'data-job-id="{ids[10]}"' not in first
    assert f'href="/jobs?before={ids[11]}"' in first and "Newer" not in first

    older = client.get(f"/jobs?before={ids[11]}").text
    assert older.count("data-job-id=") == 11 and "Older" not in older
    assert f'href="/jobs?after={ids[10]}"' in older
    newer = client.get(f"/jobs?after={ids[10]}").text
    assert newer.count("data-job-id=") == 50 and f'data-job-id="{dead}"' in newer

    only_dead = client.get("/jobs?state=dead").text
    assert only_dead.count("data-job-id=") == 1 and f'data-job-id="{dead}"' in only_dead
    assert client.get("/jobs?queue=q2").text.count("data-job-id=") == 1
    assert client.get("/jobs?task=t.a&state=available").text.count("data-job-id=") == 50
    assert client.get("/jobs?task=t.none").text.count("data-job-id=") == 0


def test_search_by_id_opens_the_job(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    job_id = add_job(conn)
    found = client.get(f"/jobs?id={job_id}", follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == f"/jobs/{job_id}"
    assert client.get("/jobs?id=987654").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/jobs?state=finished",
        "/jobs?queue=no%20spaces",
        "/jobs?task=1abc",
        "/jobs?before=abc",
        "/jobs?after=-1",
        "/dead?queue=%3Cscript%3E",
        "/events?ids=1,x",
    ],
)
def test_bad_identifiers_in_the_url_are_refused(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 400
    assert "<script>" not in response.text


@pytest.mark.parametrize(
    "path", ["/jobs/0", "/jobs/99999999999999999999", "/jobs/abc", "/jobs/-3", "/jobs/12345"]
)
def test_unknown_or_malformed_job_ids_are_not_found(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_job_page_shows_args_result_progress_errors_and_worker(
    client: TestClient, conn: psycopg.Connection[Any]
) -> None:
    job_id = add_job(
        conn, state="running", args={"to": "<script>alert(1)</script>"}, errors_ago=[5]
    )
    conn.execute(
        """UPDATE pgjobs.jobs SET progress = '{"value": 0.25, "data": {"step": "copy"}}',
                  errors = jsonb_set(errors, '{0,traceback}',
                                     '"Traceback (most recent call last):\\n  boom"')
           WHERE id = %s""",
        (job_id,),
    )
    html = client.get(f"/jobs/{job_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert 'value="25.0"' in html and "&#34;step&#34;: &#34;copy&#34;" in html
    assert "Boom" in html and "failure 1" in html and "Traceback (most recent call last)" in html
    assert "w-test" in html and f'data-job-id="{job_id}"' in html
    assert "/retry" not in html  # a running job cannot be retried
    assert "/cancel" in html  # a running job can be cancelled

    done = add_job(conn, state="succeeded")
    conn.execute("UPDATE pgjobs.jobs SET result = '{\"rows\": 42}' WHERE id = %s", (done,))
    assert "&#34;rows&#34;: 42" in client.get(f"/jobs/{done}").text


def test_workers_page_lists_each_worker(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency, started_at,
                                       last_heartbeat, jobs_succeeded, jobs_failed)
           VALUES ('host-a:42:abc', 'host-a', 42, '{emails,reports}', 8,
                   now() - interval '2 hours', now() - interval '3 seconds', 17, 2)"""
    )
    running = add_job(conn, state="running", worker="host-a:42:abc")
    html = client.get("/workers").text
    row = html.split('data-worker="host-a:42:abc"')[1].split("</tr>")[0]
    for text in ("host-a", ">42<", "emails, reports", ">8<", "2h 0m", ">17<", ">2<", "3s ago"):
        assert text in row, text
    assert f'href="/jobs/{running}"' in row and "alive" in row


def test_dead_letter_page_lists_dead_jobs_and_counts_per_task(
    client: TestClient, conn: psycopg.Connection[Any]
) -> None:
    a = [add_job(conn, task="mail.send", state="dead", errors_ago=[1]) for _ in range(3)]
    b = add_job(conn, task="report.build", state="dead", errors_ago=[1])
    add_job(conn, task="mail.send", state="available")
    html = client.get("/dead").text
    assert html.count("data-job-id=") == 4
    assert all(f'data-job-id="{i}"' in html for i in [*a, b])
    per_task = html.split('data-task="mail.send"')[1].split("</tr>")[0]
    assert ">3<" in per_task and "Retry all" in per_task and "data-confirm=" in per_task
    filtered = client.get("/dead?task=report.build").text
    assert filtered.count("data-job-id=") == 1


# -- actions ------------------------------------------------------------------------------


def test_dead_job_retry_and_delete(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    retried, deleted = (add_job(conn, state="dead") for _ in range(2))
    response = post(client, f"/dead/{retried}/retry", page="/dead")
    assert response.status_code == 303
    assert response.headers["location"] == "/dead?notice=retried&n=1"
    assert state_of(conn, retried) == "available"
    assert "Retried 1 job(s)." in client.get(response.headers["location"]).text

    response = post(client, f"/dead/{deleted}/delete", page="/dead")
    assert response.status_code == 303 and state_of(conn, deleted) is None

    # Neither action applies to a job that is not dead (any more).
    assert post(client, f"/dead/{retried}/retry").status_code == 409
    assert post(client, f"/dead/{retried}/delete").status_code == 409
    assert state_of(conn, retried) == "available"


def test_retry_all_dead_jobs_of_a_task(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    mail = [add_job(conn, task="mail.send", state="dead") for _ in range(3)]
    other = add_job(conn, task="report.build", state="dead")
    response = post(client, "/dead/retry-task", {"task": "mail.send"}, page="/dead")
    assert response.status_code == 303
    assert "notice=retried&n=3" in response.headers["location"]
    assert [state_of(conn, i) for i in mail] == ["available"] * 3
    assert state_of(conn, other) == "dead"
    assert post(client, "/dead/retry-task", {"task": "not a task"}).status_code == 400


def test_job_retry_and_cancel(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    cancelled = add_job(conn, state="available")
    assert post(client, f"/jobs/{cancelled}/cancel").status_code == 303
    assert state_of(conn, cancelled) == "cancelled"
    assert post(client, f"/jobs/{cancelled}/retry").status_code == 303
    assert state_of(conn, cancelled) == "available"

    finished = add_job(conn, state="succeeded")
    refused = post(client, f"/jobs/{finished}/cancel")
    assert refused.status_code == 409 and "succeeded" in refused.text
    assert state_of(conn, finished) == "succeeded"
    assert post(client, "/jobs/424242/retry").status_code == 404


def test_queue_pause_and_resume(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    add_job(conn, queue="emails")
    assert post(client, "/queues/emails/pause").status_code == 303
    paused = conn.execute("SELECT paused FROM pgjobs.queues WHERE name = 'emails'").fetchone()
    assert paused == (True,)
    assert post(client, "/queues/emails/resume").status_code == 303
    paused = conn.execute("SELECT paused FROM pgjobs.queues WHERE name = 'emails'").fetchone()
    assert paused == (False,)
    assert post(client, "/queues/bad%20name/pause").status_code == 400


def test_actions_without_a_valid_csrf_token_are_refused(
    client: TestClient, conn: psycopg.Connection[Any]
) -> None:
    job_id = add_job(conn, state="dead")
    token = csrf_token(client.get("/dead").text)
    path = f"/dead/{job_id}/retry"
    assert client.post(path, follow_redirects=False).status_code == 403
    assert client.post(path, data={"csrf_token": "0" * 64}).status_code == 403
    # The token of another browser (another cookie) does not fit this one.
    other = TestClient(client.app)
    assert other.post(path, data={"csrf_token": token}).status_code == 403
    # A cross-site form, even one carrying a token.
    cross = client.post(path, data={"csrf_token": token}, headers={"Origin": "https://evil.test"})
    assert cross.status_code == 403
    site = client.post(path, data={"csrf_token": token}, headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    assert state_of(conn, job_id) == "dead"
    # The same request from the dashboard's own page goes through.
    same = client.post(
        path, data={"csrf_token": token}, headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )  # fmt: skip
    assert same.status_code == 303 and state_of(conn, job_id) == "available"


def test_the_csrf_cookie_is_strict_and_http_only(client: TestClient) -> None:
    cookie = TestClient(client.app).get("/").headers["set-cookie"]
    assert "pgjobs_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_read_only_hides_every_action_and_refuses_them(
    dapp: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    dead = add_job(conn, state="dead", queue="emails")
    waiting = add_job(conn, state="available", queue="emails")
    with TestClient(create_app(dapp, read_only=True)) as client:
        for page in ("/", "/jobs", f"/jobs/{dead}", f"/jobs/{waiting}", "/dead", "/workers"):
            html = client.get(page).text
            assert 'method="post"' not in html, page
            assert "read-only" in html
        token = csrf_token(client.get("/dead").text)
        for path in (
            f"/dead/{dead}/retry",
            f"/dead/{dead}/delete",
            f"/jobs/{dead}/retry",
            f"/jobs/{waiting}/cancel",
            "/queues/emails/pause",
        ):
            response = client.post(path, data={"csrf_token": token}, follow_redirects=False)
            assert response.status_code == 403, path
        response = client.post("/dead/retry-task", data={"csrf_token": token, "task": "t.task"})
        assert response.status_code == 403
    assert state_of(conn, dead) == "dead" and state_of(conn, waiting) == "available"
    assert conn.execute("SELECT count(*) FROM pgjobs.queues").fetchone() == (0,)


def _basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def test_basic_auth_and_token(dapp: pgjobs.App) -> None:
    auth = Auth(username="ops", password="s3cret", token="tok-123")
    with TestClient(create_app(dapp, auth=auth)) as client:
        refused = client.get("/")
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        assert client.get("/metrics").status_code == 401
        assert client.get("/static/dashboard.js").status_code == 401
        assert client.get("/", headers=_basic("ops", "wrong")).status_code == 401
        assert client.get("/", headers=_basic("root", "s3cret")).status_code == 401
        assert client.get("/", headers=_basic("ops", "s3cret")).status_code == 200
        assert client.get("/", headers=_basic("anyone", "tok-123")).status_code == 200
        bearer = {"Authorization": "Bearer tok-123"}
        assert client.get("/metrics", headers=bearer).status_code == 200
        assert client.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_mounted_inside_another_application(
    dapp: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    job_id = add_job(conn, state="dead")
    outer = Starlette(routes=[Mount("/ops/pgjobs", create_app(dapp))])
    with TestClient(outer) as client:
        html = client.get("/ops/pgjobs/dead").text
        assert 'href="/ops/pgjobs/jobs/' in html and "/ops/pgjobs/static/dashboard.js" in html
        assert client.get("/ops/pgjobs/static/dashboard.js").status_code == 200
        token = csrf_token(html)
        response = client.post(
            f"/ops/pgjobs/dead/{job_id}/retry", data={"csrf_token": token}, follow_redirects=False
        )
        assert response.status_code == 303
        assert response.headers["location"].startswith("/ops/pgjobs/dead?")
    assert state_of(conn, job_id) == "available"


# -- metrics ------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_scrape_cleanly(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    for _ in range(2):
        add_job(conn, queue="emails", run_at_ago=30)
    add_job(conn, queue="emails", state="dead")
    conn.execute(
        """INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency, started_at,
                                       last_heartbeat)
           VALUES ('w1', 'h', 1, '{emails}', 4, now(), now()),
                  ('w2', 'h', 2, '{emails}', 4, now(), now() - interval '1 hour')"""
    )
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = _samples(response.text)
    assert samples[("pgjobs_database_up", ())] == 1
    assert samples[("pgjobs_jobs", (("queue", "emails"), ("state", "available")))] == 2
    assert samples[("pgjobs_jobs", (("queue", "emails"), ("state", "dead")))] == 1
    assert samples[("pgjobs_jobs", (("queue", "emails"), ("state", "running")))] == 0
    oldest = samples[("pgjobs_queue_oldest_waiting_seconds", (("queue", "emails"),))]
    assert 29 < oldest < 120
    assert samples[("pgjobs_workers_alive", ())] == 1
    assert samples[("pgjobs_queue_paused", (("queue", "emails"),))] == 0
    # The event-fed families are declared even before any event arrives.
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"pgjobs_jobs_started", "pgjobs_job_duration_seconds"} <= names


def test_metrics_report_a_database_that_is_down(offline_app: pgjobs.App) -> None:
    with TestClient(create_app(offline_app)) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert _samples(response.text)[("pgjobs_database_up", ())] == 0
        page = client.get("/")
        assert page.status_code == 503 and "cannot connect" in page.text


def test_a_role_granted_only_the_views_sees_the_overview_workers_and_metrics(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    role = f"pgjobs_viewer_{os.getpid()}"
    add_job(conn, queue="emails", state="dead")
    conn.execute(f"DROP ROLE IF EXISTS {role}")
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn.execute(f"GRANT USAGE ON SCHEMA pgjobs TO {role}")
        conn.execute(
            "GRANT SELECT ON pgjobs.queue_stats, pgjobs.worker_stats, "
            "pgjobs.throughput_per_minute, pgjobs.queue_depths, pgjobs.dead_jobs, "
            f"pgjobs.queue_limits TO {role}"
        )
        # Direct: the suite's PgBouncer knows only the suite's own user.
        direct = pgbouncer.direct(db_url)
        url = make_conninfo(**{**conninfo_to_dict(direct), "user": role, "password": None})
        viewer = pgjobs.App(url)
        try:
            with TestClient(create_app(viewer, read_only=True)) as client:
                assert 'data-queue="emails"' in client.get("/").text
                assert client.get("/workers").status_code == 200
                assert client.get("/dead").status_code == 200
                metrics = _samples(client.get("/metrics").text)
                assert metrics[("pgjobs_jobs", (("queue", "emails"), ("state", "dead")))] == 1
                # The jobs table itself (arguments and all) stays out of reach.
                assert client.get("/jobs").status_code == 503
        finally:
            viewer.close()
    finally:
        conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_pgjobs_dashboard_serves_on_a_local_port(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    import socket
    import subprocess
    import sys
    import time

    import httpx2

    add_job(conn, queue="cli")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "pgjobs", "--database-url", db_url, "dashboard",
            "--port", str(port), "--read-only"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx2.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx2.TransportError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.1)
        assert page.status_code == 200 and 'data-queue="cli"' in page.text
        assert "read-only" in page.text and 'method="post"' not in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=15)

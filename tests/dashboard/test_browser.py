"""End to end in headless Chromium: the dashboard shows a job go from available to
succeeded live, a job's progress bar moves, and a dead job is retried with a click."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from dash_helpers import LiveServer, subscribed, wait_until
from worker_processes import Workers

import pgjobs
from pgjobs.dashboard import create_app

# Every wait is bounded: Playwright's expectations and wait_until both time out.
TIMEOUT_MS = 20_000


def state_of(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    row = conn.execute("SELECT state::text FROM pgjobs.jobs WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else str(row[0])


# Room for installing Chromium on a machine that lacks it (the browser fixture does).
@pytest.mark.timeout(1800)
def test_live_updates_and_retrying_a_dead_job_in_a_browser(
    dapp: pgjobs.App,
    conn: psycopg.Connection[Any],
    serve: Callable[[Any], LiveServer],
    workers: Workers,
    browser: Any,
) -> None:
    from dash_app import flaky, progress, quick
    from playwright.sync_api import expect

    server = serve(create_app(dapp))
    job_id = quick.enqueue(n=1)
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    # The jobs page shows the job waiting, then (no reload) running and succeeded.
    page.goto(f"{server.url}/jobs")
    state = page.locator(f'tr[data-job-id="{job_id}"] [data-field="state"]')
    expect(state).to_have_text("available")
    expect(page.locator("#live-status")).to_have_attribute("data-live-state", "on")
    wait_until(lambda: subscribed(conn), 10, "the dashboard listens for events")
    page.evaluate("window.stillTheSamePage = true")
    workers.start()
    expect(state).to_have_text("succeeded", timeout=TIMEOUT_MS)
    expect(state).to_have_class("state state-succeeded")
    assert page.evaluate("window.stillTheSamePage === true"), "the page was reloaded"

    # A job's page follows its progress, then shows its result.
    slow = progress.enqueue(steps=2, pause=1.5)
    page.goto(f"{server.url}/jobs/{slow}")
    bar = page.locator('progress[data-field="progress"]')
    expect(bar).to_have_attribute("value", "50", timeout=TIMEOUT_MS)
    expect(page.locator('h1 [data-field="state"]')).to_have_text("succeeded", timeout=TIMEOUT_MS)
    expect(page.locator("pre.json").last).to_contain_text('"done"')

    # A dead job: dismissing the confirmation does nothing, accepting it retries the job.
    dead = flaky.enqueue()
    wait_until(lambda: state_of(conn, dead) == "dead", 20, "the flaky job is dead")
    page.goto(f"{server.url}/dead")
    row = page.locator(f'tr[data-job-id="{dead}"]')
    expect(row).to_contain_text("first attempts always fail")
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_role("button", name="Retry").click()
    expect(page.locator("[role=status]")).to_have_count(0)
    assert state_of(conn, dead) == "dead"

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Retry").click()
    expect(page.locator("[role=status]")).to_have_text("Retried 1 job(s).")
    wait_until(lambda: state_of(conn, dead) == "succeeded", 20, "the retried job succeeds")
    page.goto(f"{server.url}/jobs/{dead}")
    expect(page.locator('h1 [data-field="state"]')).to_have_text("succeeded")
    expect(page.locator("ol.errors")).to_contain_text("ValueError")
    page.close()

"""The dashboard's ASGI application: pages, actions, live feeds and /metrics.

Pages are rendered on the server (Jinja2); a small script subscribes to the live feed and
patches the page. Reads and actions go through :class:`pgjobs.admin.Admin` on the App's
pool, on Starlette's thread pool (the pool is synchronous).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from pgjobs.admin import CANCELLABLE_STATES, RETRYABLE_STATES, Admin, JobStateError
from pgjobs.app import App
from pgjobs.dashboard import reads, security, streams
from pgjobs.dashboard.hub import Hub
from pgjobs.dashboard.security import CSRF_COOKIE, Auth, AuthMiddleware, Csrf
from pgjobs.errors import DatabaseError, JobNotFoundError, PgJobsError, SchemaNotReadyError
from pgjobs.job import Job
from pgjobs.metrics import DatabaseCollector, EventMetrics

HERE = Path(__file__).parent
# At most this many job ids per live subscription (a page of jobs).
MAX_WATCHED = 200
NOTICES = {
    "retried": "Retried {n} job(s).",
    "deleted": "Deleted {n} job(s).",
    "cancelled": "Cancelled the job.",
    "paused": "Paused the queue.",
    "resumed": "Resumed the queue.",
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        age=reads.age,
        timestamp=reads.timestamp,
        rate=reads.rate,
        percent=reads.percent,
        progress_percent=reads.progress_percent,
        pretty=reads.pretty,
    )
    return env


class Dashboard:
    """The state behind one dashboard: the App, its Admin, the hub, CSRF and metrics."""

    def __init__(
        self, app: App, *, read_only: bool, csrf_secret: bytes | None, refresh_every: float
    ) -> None:
        self.app = app
        self.read_only = read_only
        self.admin = Admin(app, operator=f"dashboard@{socket.gethostname()}")
        self.csrf = Csrf(csrf_secret)
        self.env = _environment()
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(self.admin))
        self.hub = Hub(
            app,
            metrics=EventMetrics(self.registry),
            snapshot=self.snapshot,
            refresh_every=refresh_every,
        )
        # The mount point, learnt from requests: links in snapshots sent to every browser.
        self.base = ""

    # -- rendering -----------------------------------------------------------------------

    def render(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        """A full page, with this browser's CSRF token (and cookie, when new)."""
        nonce, new = self.csrf.nonce(request)
        page = self.env.get_template(template).render(
            {
                **self._common(),
                "csrf_token": self.csrf.token_for(nonce),
                "notice": _notice(request),
                "nav": template.removesuffix(".html"),
                **context,
            }
        )
        response = HTMLResponse(page, status_code=status)
        if new:
            response.set_cookie(
                CSRF_COOKIE,
                nonce,
                path=self.base or "/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def _common(self) -> dict[str, Any]:
        return {"base": self.base, "read_only": self.read_only, "csrf_token": ""}

    def fragment(self, template: str, context: dict[str, Any]) -> str:
        """A part of a page sent to every browser (no CSRF token: the page's script adds
        its own to a form when it is submitted)."""
        return self.env.get_template(template).render({**self._common(), **context})

    async def snapshot(self) -> dict[str, str]:
        """The live parts of the overview and workers pages, read once for all browsers."""
        overview = await run_in_threadpool(self.overview_data)
        workers = await run_in_threadpool(self.admin.workers)
        return {
            "overview": self.fragment("_queues.html", overview),
            "workers": self.fragment("_workers.html", {"workers": workers}),
        }

    def overview_data(self) -> dict[str, Any]:
        """The overview, with the dead-letter alerts that fired."""
        data = reads.overview(self.admin)
        data["alerts"] = self._alerts(data["queues"])
        return data

    def _alerts(self, queues: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Thresholds live in the queues table, which a role granted only the views cannot
        # read: then the overview goes without alerts.
        try:
            settings = {q["name"]: q for q in self.admin.queues()}
        except DatabaseError:
            return []
        alerts = []
        for row in queues:
            threshold = (settings.get(row["queue"]) or {}).get("dead_alert_threshold")
            if threshold is not None and row["dead"] >= threshold:
                alerts.append({"queue": row["queue"], "dead": row["dead"], "threshold": threshold})
        return alerts

    async def read_job(self, job_id: int) -> Job | None:
        """One job, or None if it does not exist (for the per-job feed)."""
        try:
            return await run_in_threadpool(self.admin.get_job, job_id)
        except JobNotFoundError:
            return None


def _notice(request: Request) -> str | None:
    template = NOTICES.get(request.query_params.get("notice", ""))
    if template is None:
        return None
    n = request.query_params.get("n", "1")
    text = template.format(n=n if n.isdigit() else "?")
    skipped = request.query_params.get("skipped", "0")
    if skipped.isdigit() and int(skipped):
        text += f" {skipped} could not be retried (already live, or not in that state)."
    return text


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


def _redirect(request: Request, path: str, **query: Any) -> RedirectResponse:
    dashboard = _dashboard(request)
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return RedirectResponse(f"{dashboard.base}{path}?{params}", status_code=303)


# -- pages --------------------------------------------------------------------------------


async def overview_page(request: Request) -> Response:
    """Per queue: depth by state, rates, a chart of the last hour, paused queues."""
    dashboard = _dashboard(request)
    data = await run_in_threadpool(dashboard.overview_data)
    return dashboard.render(request, "overview.html", {"title": "Overview", **data})


async def jobs_page(request: Request) -> Response:
    """Jobs filtered by state, queue and task, newest first; ``?id=N`` opens job N."""
    dashboard = _dashboard(request)
    query = request.query_params
    if query.get("id"):
        return RedirectResponse(f"{dashboard.base}/jobs/{security.job_id(query['id'])}", 303)
    filters = {
        "state": security.state_filter(query.get("state")),
        "queue": security.queue_name(query.get("queue")),
        "task": security.task_name(query.get("task")),
    }
    before = security.optional_id(query.get("before"), "before")
    after = security.optional_id(query.get("after"), "after")
    page = await run_in_threadpool(
        lambda: reads.jobs_page(
            dashboard.admin,
            state=filters["state"],
            queue=filters["queue"],
            task=filters["task"],
            before=before,
            after=after,
        )
    )
    context = {"title": "Jobs", "page": page, "filters": filters, "states": _states()}
    return dashboard.render(request, "jobs.html", context)


def _states() -> list[str]:
    from pgjobs.job import JobState

    return [state.value for state in JobState]


async def job_page(request: Request) -> Response:
    """One job: arguments, result, progress, error history, timestamps, actions."""
    dashboard = _dashboard(request)
    job_id = security.job_id(request.path_params["job_id"])
    job = await run_in_threadpool(dashboard.admin.get_job, job_id)
    context = {
        "title": f"Job {job.id}",
        "job": job,
        "can_retry": job.state.value in RETRYABLE_STATES,
        "can_cancel": job.state.value in CANCELLABLE_STATES,
        "can_delete": job.state.value == "dead",
    }
    return dashboard.render(request, "job.html", context)


async def dead_page(request: Request) -> Response:
    """The dead-letter queue: per task, and page by page."""
    dashboard = _dashboard(request)
    query = request.query_params
    queue = security.queue_name(query.get("queue"))
    task = security.task_name(query.get("task"))
    before = security.optional_id(query.get("before"), "before")
    page, per_task = await run_in_threadpool(
        lambda: reads.dead_page(dashboard.admin, queue=queue, task=task, before=before)
    )
    context = {
        "title": "Dead letters",
        "page": page,
        "per_task": per_task,
        "filters": {"queue": queue, "task": task},
    }
    return dashboard.render(request, "dead.html", context)


async def workers_page(request: Request) -> Response:
    """Every registered worker: host, pid, queues, uptime, counters, current jobs."""
    dashboard = _dashboard(request)
    workers = await run_in_threadpool(dashboard.admin.workers)
    return dashboard.render(request, "workers.html", {"title": "Workers", "workers": workers})


# -- actions ------------------------------------------------------------------------------


async def _action_form(request: Request) -> dict[str, Any]:
    """The form of a POST, after the read-only and CSRF checks."""
    dashboard = _dashboard(request)
    if dashboard.read_only:
        raise HTTPException(403, "this dashboard is read-only")
    form = await request.form()
    dashboard.csrf.check(request, form.get(security.CSRF_FIELD))
    return dict(form)


async def job_retry(request: Request) -> Response:
    """Make a dead, cancelled, retryable or scheduled job runnable now."""
    await _action_form(request)
    job_id = security.job_id(request.path_params["job_id"])
    await run_in_threadpool(_dashboard(request).admin.retry_job, job_id)
    return _redirect(request, f"/jobs/{job_id}", notice="retried", n=1)


async def job_cancel(request: Request) -> Response:
    """Cancel a job that has not finished (a running one is stopped by its worker)."""
    await _action_form(request)
    job_id = security.job_id(request.path_params["job_id"])
    await run_in_threadpool(_dashboard(request).admin.cancel_job, job_id)
    return _redirect(request, f"/jobs/{job_id}", notice="cancelled")


async def dead_retry(request: Request) -> Response:
    """Retry one dead job."""
    await _action_form(request)
    job_id = security.job_id(request.path_params["job_id"])
    result = await run_in_threadpool(_dashboard(request).admin.retry_dead, [job_id])
    if job_id in result.skipped:
        raise JobStateError(f"job {job_id}: {result.skipped[job_id]}")
    return _redirect(request, "/dead", notice="retried", n=len(result.done))


async def dead_delete(request: Request) -> Response:
    """Delete one dead job."""
    await _action_form(request)
    job_id = security.job_id(request.path_params["job_id"])
    result = await run_in_threadpool(_dashboard(request).admin.delete_dead, [job_id])
    if job_id in result.skipped:
        raise JobStateError(f"job {job_id}: {result.skipped[job_id]}")
    return _redirect(request, "/dead", notice="deleted", n=len(result.done))


async def dead_retry_task(request: Request) -> Response:
    """Retry every dead job of one task."""
    form = await _action_form(request)
    task = security.task_name(form.get("task"))
    if task is None:
        raise HTTPException(400, "name the task whose dead jobs to retry")
    admin = _dashboard(request).admin
    result = await run_in_threadpool(lambda: admin.retry_dead(task=task))
    skipped = len(result.skipped)
    return _redirect(request, "/dead", notice="retried", n=len(result.done), skipped=skipped)


def _queue_action(paused: bool) -> Callable[[Request], Any]:
    async def action(request: Request) -> Response:
        await _action_form(request)
        queue = security.queue_name(request.path_params["queue"])
        assert queue is not None  # the route matched a non-empty segment
        admin = _dashboard(request).admin
        await run_in_threadpool(admin.pause_queue if paused else admin.resume_queue, queue)
        return _redirect(request, "/", notice="paused" if paused else "resumed")

    action.__doc__ = "Pause the queue." if paused else "Resume the queue."
    return action


# -- live feeds and metrics ---------------------------------------------------------------


async def events(request: Request) -> Response:
    """The pages' live feed: ``?view=overview|workers`` for snapshots, ``?ids=1,2`` for
    the events of the jobs a page shows."""
    hub = _dashboard(request).hub
    view = request.query_params.get("view", "")
    ids = _watched_ids(request.query_params.get("ids", ""))
    sub = hub.subscribe(ids, snapshots=view in ("overview", "workers"))
    return streams.response(streams.feed(hub, sub))


def _watched_ids(text: str) -> frozenset[int]:
    parts = [part for part in text.split(",") if part]
    if len(parts) > MAX_WATCHED:
        raise HTTPException(400, f"watch at most {MAX_WATCHED} jobs")
    ids = [security.optional_id(part, "ids") for part in parts]
    return frozenset(i for i in ids if i is not None)


async def job_events(request: Request) -> Response:
    """One job's feed (EventSource): a snapshot, then its events until it is final."""
    dashboard = _dashboard(request)
    job_id = security.job_id(request.path_params["job_id"])
    return streams.response(streams.job_feed(dashboard.hub, job_id, dashboard.read_job))


async def metrics(request: Request) -> Response:
    """Prometheus exposition: database gauges read now, event counters since start."""
    registry = _dashboard(request).registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# -- errors -------------------------------------------------------------------------------


async def http_error(request: Request, exc: Exception) -> Response:
    """An error page for a refused or malformed request."""
    assert isinstance(exc, HTTPException)
    return _error_page(request, exc.status_code, str(exc.detail))


async def pgjobs_error(request: Request, exc: Exception) -> Response:
    """An error page for what pgjobs refused (unknown job, wrong state, database down)."""
    status = 409
    if isinstance(exc, JobNotFoundError):
        status = 404
    elif isinstance(exc, DatabaseError | SchemaNotReadyError):
        status = 503
    return _error_page(request, status, str(exc))


def _error_page(request: Request, status: int, message: str) -> Response:
    dashboard = _dashboard(request)
    context = {"title": "Error", "status": status, "message": message}
    return dashboard.render(request, "error.html", context, status=status)


# -- assembly -----------------------------------------------------------------------------


class _Prepare:
    """Per request: learn the mount point and make sure the hub listens."""

    def __init__(self, app: ASGIApp, dashboard: Dashboard) -> None:
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.dashboard.base = scope.get("root_path", "").rstrip("/")
            self.dashboard.hub.ensure_started()
        await self.app(scope, receive, send)


def routes() -> list[Route | Mount]:
    """Every route of the dashboard."""
    post = ["POST"]
    return [
        Route("/", overview_page, name="overview"),
        Route("/jobs", jobs_page, name="jobs"),
        Route("/jobs/{job_id:int}", job_page, name="job"),
        Route("/jobs/{job_id:int}/retry", job_retry, methods=post, name="job_retry"),
        Route("/jobs/{job_id:int}/cancel", job_cancel, methods=post, name="job_cancel"),
        Route("/dead", dead_page, name="dead"),
        Route("/dead/retry-task", dead_retry_task, methods=post, name="dead_retry_task"),
        Route("/dead/{job_id:int}/retry", dead_retry, methods=post, name="dead_retry"),
        Route("/dead/{job_id:int}/delete", dead_delete, methods=post, name="dead_delete"),
        Route("/workers", workers_page, name="workers"),
        Route("/queues/{queue}/pause", _queue_action(True), methods=post, name="queue_pause"),
        Route("/queues/{queue}/resume", _queue_action(False), methods=post, name="queue_resume"),
        Route("/events", events, name="events"),
        Route("/api/jobs/{job_id:int}/events", job_events, name="job_events"),
        Route("/metrics", metrics, name="metrics"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def create_app(
    app: App,
    *,
    read_only: bool = False,
    auth: Auth | None = None,
    csrf_secret: bytes | None = None,
    refresh_every: float = 10.0,
) -> Starlette:
    """The dashboard of ``app`` as an ASGI application, to serve (``pgjobs dashboard``) or
    to mount in an application's own (``Mount("/pgjobs", create_app(app))``).

    ``read_only`` hides and refuses every action; ``auth`` asks for credentials on every
    request; ``csrf_secret`` signs the forms' tokens (random per process by default: set
    it when several processes serve one dashboard). ``refresh_every`` bounds how stale
    the live pages get without events (heartbeat ages, jobs becoming due).
    """
    dashboard = Dashboard(
        app, read_only=read_only, csrf_secret=csrf_secret, refresh_every=refresh_every
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        dashboard.hub.ensure_started()
        yield
        await dashboard.hub.aclose()

    middleware = [Middleware(_Prepare, dashboard=dashboard)]
    if auth is not None:
        middleware.insert(0, Middleware(AuthMiddleware, auth=auth))
    web = Starlette(
        routes=routes(),
        middleware=middleware,
        exception_handlers={HTTPException: http_error, PgJobsError: pgjobs_error},
        lifespan=lifespan,
    )
    web.state.dashboard = dashboard
    return web


def progress_app(app: App, *, auth: Auth | None = None) -> Starlette:
    """Only the per-job feed, for an application to stream a job's progress to its own
    users: ``Mount("/progress", progress_app(app))`` serves ``GET /progress/{job_id}``
    (``text/event-stream``: a ``snapshot`` event, then ``job`` events until the final
    one). Put it behind the application's own access checks."""
    hub = Hub(app)
    admin = Admin(app)

    async def read_job(job_id: int) -> Job | None:
        try:
            return await run_in_threadpool(admin.get_job, job_id)
        except JobNotFoundError:
            return None

    async def feed(request: Request) -> Response:
        job_id = security.job_id(request.path_params["job_id"])
        return streams.response(streams.job_feed(hub, job_id, read_job))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await hub.aclose()

    middleware = [Middleware(AuthMiddleware, auth=auth)] if auth is not None else []
    return Starlette(
        routes=[Route("/{job_id:int}", feed, name="job_progress")],
        middleware=middleware,
        lifespan=lifespan,
    )

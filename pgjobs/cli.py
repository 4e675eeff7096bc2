"""The ``pgjobs`` command line.

Exit codes: 0 success, 1 a pgjobs error (printed as one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from pgjobs.errors import ConfigurationError, PgJobsError
from pgjobs.limits import QueueLimits
from pgjobs.settings import APP_ENV, DATABASE_URL_ENV, LISTEN_URL_ENV, SCHEMA_ENV

F = TypeVar("F", bound=Callable[..., Any])

cli = typer.Typer(
    name="pgjobs",
    help="pgjobs: a PostgreSQL-backed job queue for Python.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
migrate_cli = typer.Typer(
    help="Install or upgrade pgjobs' schema (Alembic migrations).", no_args_is_help=True
)
cli.add_typer(migrate_cli, name="migrate")


@dataclass
class Globals:
    """Options given before the command."""

    database_url: str | None = None
    app: str | None = None
    schema: str | None = None
    listen_url: str | None = None

    def url(self) -> str:
        """The database URL, starting the embedded server when none is configured."""
        from pgjobs.database import resolve_database_url

        return resolve_database_url(self.database_url)

    def schema_name(self) -> str:
        """The validated schema name."""
        from pgjobs.settings import schema_from_env, validate_schema

        return validate_schema(self.schema) if self.schema else schema_from_env()

    def load_app(self, default: str | None = None) -> Any:
        """The App named by --app / PGJOBS_APP ("module:attribute"), or ``default``."""
        from pgjobs.app import App

        target = self.app or default
        if not target:
            raise ConfigurationError(
                f"name the application with --app module:attribute or {APP_ENV}"
            )
        module_name, _, attribute = target.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc}") from exc
        app = getattr(module, attribute or "app", None)
        if not isinstance(app, App):
            raise ConfigurationError(f"{target!r} is not a pgjobs.App")
        if self.database_url and app._database_url is None:
            app._database_url = self.database_url
        if self.listen_url and app._listen_url is None:
            app._listen_url = self.listen_url
        return app


state = Globals()


@cli.callback()
def main_options(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar=DATABASE_URL_ENV,
            help="PostgreSQL URL; the embedded server when unset.",
        ),
    ] = None,
    app: Annotated[
        str | None,
        typer.Option("--app", envvar=APP_ENV, help="The application, as module:attribute."),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option("--schema", envvar=SCHEMA_ENV, help="pgjobs' schema (default: pgjobs)."),
    ] = None,
    listen_url: Annotated[
        str | None,
        typer.Option(
            "--listen-url",
            envvar=LISTEN_URL_ENV,
            help="Direct PostgreSQL URL for LISTEN when --database-url goes through "
            "PgBouncer in transaction mode (without one, workers poll).",
        ),
    ] = None,
) -> None:
    """Options shared by every command."""
    state.database_url, state.app, state.schema = database_url, app, schema
    state.listen_url = listen_url


def reports_errors(fn: F) -> F:
    """Print a pgjobs error as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PgJobsError as exc:
            typer.echo(f"pgjobs: error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@migrate_cli.command("upgrade")
@reports_errors
def migrate_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up (to the newest revision by default). Safe to repeat."""
    from pgjobs import migrate

    url, schema = state.url(), state.schema_name()
    migrate.upgrade(url, schema, revision)
    typer.echo(f"pgjobs schema {schema!r} is at {migrate.current(url, schema)}")


@migrate_cli.command("downgrade")
@reports_errors
def migrate_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' removes pgjobs.")],
) -> None:
    """Migrate the database down to REVISION."""
    from pgjobs import migrate

    url, schema = state.url(), state.schema_name()
    migrate.downgrade(url, schema, revision)
    typer.echo(f"pgjobs schema {schema!r} is at {migrate.current(url, schema) or 'base (removed)'}")


@migrate_cli.command("partition")
@reports_errors
def migrate_partition(
    undo: Annotated[
        bool, typer.Option("--undo", help="Back to a plain table, archived jobs included.")
    ] = False,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0.001, help="Seconds to wait for a table in use."),
    ] = 60.0,
) -> None:
    """Partition the jobs table: finished jobs go into day partitions that retention
    drops whole. The table is locked for a moment only (catalog changes, no rewrite)."""
    from pgjobs import partitioning

    url, schema = state.url(), state.schema_name()
    if undo:
        moved = partitioning.unpartition(url, schema, wait)
        typer.echo(f"the jobs table of schema {schema!r} is a plain table ({moved} archived "
                   "job(s) brought back)")  # fmt: skip
    else:
        partitioning.partition(url, schema, wait)
        typer.echo(f"the jobs table of schema {schema!r} is partitioned: finished jobs go "
                   "into day partitions as retention archives them")  # fmt: skip


@migrate_cli.command("current")
@reports_errors
def migrate_current() -> None:
    """Print the revision the database is at and whether it is the newest."""
    from pgjobs import migrate

    revision = migrate.current(state.url(), state.schema_name())
    head = migrate.head()
    if revision is None:
        typer.echo(f"not installed (newest: {head})")
    else:
        typer.echo(f"{revision}{' (head)' if revision == head else f' (newest: {head})'}")


@migrate_cli.command("sql")
@reports_errors
def migrate_sql(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    down: Annotated[
        bool, typer.Option("--down", help="Print the downgrade from head to REVISION.")
    ] = False,
) -> None:
    """Print the migration DDL without touching a database."""
    from pgjobs import migrate

    typer.echo(migrate.sql_script(state.schema_name(), revision, down=down), nl=False)


# -- work ---------------------------------------------------------------------------------

DEMO_APP = "pgjobs.demo:app"


def _queue_names(value: str | None) -> tuple[list[str] | None, dict[str, int]]:
    """``a,b,c=5`` as (queues sharing --concurrency, {queue: its own slots})."""
    if not value:
        return None, {}
    shared: list[str] = []
    own: dict[str, int] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, _, slots = item.partition("=")
        if not _:
            shared.append(name.strip())
        elif slots.strip().isdigit() and int(slots) >= 1:
            own[name.strip()] = int(slots)
        else:
            raise typer.BadParameter(
                f"{item!r}: give a queue's concurrency as NAME=N with N a positive integer",
                param_hint="--queues",
            )
    return shared or None, own


def _configure_logging(level: str) -> None:
    import logging

    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s pgjobs[%(process)d] %(name)s: %(message)s",
    )
    # Migrating the embedded database on start is routine, not news.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))


def _load_work_app() -> tuple[Any, bool]:
    """The application to work, and whether it is the demo (no --app, no PGJOBS_APP)."""
    if state.app:
        return state.load_app(), False
    typer.echo(
        f"pgjobs: no --app or {APP_ENV} given: running the demo application ({DEMO_APP}); "
        "seeding a few demo jobs into its 'demo' queue",
        err=True,
    )
    return state.load_app(DEMO_APP), True


@cli.command("work")
@reports_errors
def work(
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            "-q",
            help="Queues to work, comma-separated (default: the queues of the app's tasks); "
            "NAME=N gives a queue N slots of its own: emails=10,reports=2.",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Jobs run at once per process.")
    ] = 10,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            "-p",
            min=1,
            help="Worker processes (supervised, restarted when they die).",
        ),
    ] = 1,
    prefetch: Annotated[
        int,
        typer.Option("--prefetch", min=0, help="Jobs claimed ahead of free slots, per process."),
    ] = 0,
    burst: Annotated[
        bool,
        typer.Option(
            "--burst", help="Exit once the queues have nothing runnable and nothing running."
        ),
    ] = False,
    grace: Annotated[
        float,
        typer.Option(
            "--grace", min=0, help="Seconds running jobs get to finish after SIGTERM/SIGINT."
        ),
    ] = 30.0,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", min=0.01, help="Fallback poll, seconds (jittered).")
    ] = 1.0,
    heartbeat_interval: Annotated[
        float, typer.Option("--heartbeat-interval", min=0.05, help="Seconds between heartbeats.")
    ] = 5.0,
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            "--heartbeat-timeout",
            min=0.2,
            help="Seconds without heartbeat after which a worker is dead and its jobs are rescued.",
        ),
    ] = 30.0,
    retain_succeeded: Annotated[
        str, typer.Option("--retain-succeeded", help="Keep succeeded jobs this long.")
    ] = "1d",
    retain_cancelled: Annotated[
        str, typer.Option("--retain-cancelled", help="Keep cancelled jobs this long.")
    ] = "7d",
    retain_dead: Annotated[
        str, typer.Option("--retain-dead", help="Keep dead jobs this long ('never': keep).")
    ] = "never",
    no_prune: Annotated[
        bool, typer.Option("--no-prune", help="Never delete finished jobs from this worker.")
    ] = False,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve Prometheus metrics on this port (with --processes: summed, one port).",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address the metrics port binds to.")
    ] = "127.0.0.1",
) -> None:
    """Run jobs: claim them from the queues, run them, record their outcomes.

    Retention: every minute one worker of the schema deletes a bounded batch of finished
    jobs older than --retain-succeeded / --retain-cancelled / --retain-dead.

    SIGTERM/SIGINT: stop claiming, hand back the jobs not started yet, give
    running jobs --grace seconds, then hand them back too. A second signal
    exits at once; other workers rescue its jobs when its heartbeat expires.

    Exit status:
      0    clean stop (a signal, or --burst with no work left)
      1    pgjobs error (app not found, database unreachable, no schema)
      2    bad usage
      128+N  forced by a second signal N (130 SIGINT, 143 SIGTERM)
    """
    _configure_logging(log_level)
    from pgjobs.admin import Retention

    retention = None
    if not no_prune:
        retention = Retention(
            succeeded=_retention(retain_succeeded, "--retain-succeeded"),
            cancelled=_retention(retain_cancelled, "--retain-cancelled"),
            dead=_retention(retain_dead, "--retain-dead"),
        )
    queue_names, queue_concurrency = _queue_names(queues)
    app, demo = _load_work_app()
    if demo:
        from pgjobs import demo as demo_module

        demo_module.seed()
    if processes > 1:
        from pgjobs.supervisor import Supervisor, child_argv, child_env

        env = child_env(app.database_url, DEMO_APP if demo else None, app.listen_url)
        supervisor = Supervisor(child_argv(sys.argv[1:]), processes, env, burst=burst)
        if metrics_port is None:
            raise typer.Exit(supervisor.run())
        from pgjobs.metrics import supervisor_metrics

        with supervisor_metrics(metrics_port, metrics_host, env):
            status = supervisor.run()
        raise typer.Exit(status)

    from pgjobs.supervisor import watch_supervisor
    from pgjobs.worker import Worker

    worker = Worker(
        app,
        queue_names,
        concurrency,
        queue_concurrency=queue_concurrency,
        prefetch=prefetch,
        poll_interval=poll_interval,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        grace=grace,
        burst=burst,
        retention=retention,
    )
    if metrics_port is not None:
        from pgjobs.metrics import worker_metrics

        worker.observer = worker_metrics(metrics_port, metrics_host)
    watch_supervisor(worker.stop)
    worker.run()


@cli.command("bench")
@reports_errors
def bench(
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Jobs to drain.")] = 20_000,
    single: Annotated[
        int, typer.Option("--single", min=1, help="Jobs enqueued one per transaction.")
    ] = 2_000,
    bulk: Annotated[int, typer.Option("--bulk", min=1, help="Jobs enqueued in bulk.")] = 50_000,
    latency_jobs: Annotated[
        int, typer.Option("--latency-jobs", min=1, help="Jobs timed from commit to start.")
    ] = 500,
    rate: Annotated[
        float, typer.Option("--rate", min=1, help="Latency jobs enqueued per second.")
    ] = 50.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes.")] = 2,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Slots per worker process.")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Measure enqueue (one per transaction, bulk), drain throughput and enqueue-to-start
    latency with idle workers, on the configured database (in a schema of its own,
    pgjobs_bench, removed afterwards)."""
    import json

    from pgjobs import bench as bench_module

    layout = bench_module.Layout(
        single=single,
        bulk=bulk,
        drain=jobs,
        latency=latency_jobs,
        rate=rate,
        workers=workers,
        concurrency=concurrency,
    )
    results = bench_module.run(state.url(), layout)
    typer.echo(json.dumps(results, indent=2) if as_json else bench_module.report(results))


# -- operations ---------------------------------------------------------------------------
# The operator's commands: thin wrappers over pgjobs.admin and pgjobs.doctor. Tables for
# people, --json for scripts; mistakes (unknown id, bad JSON, bad duration, bad state)
# end with one line on stderr and exit 1.

jobs_cli = typer.Typer(help="Inspect and act on jobs.", no_args_is_help=True)
dead_cli = typer.Typer(help="The dead-letter queue: jobs out of attempts.", no_args_is_help=True)
queues_cli = typer.Typer(help="Pause, resume and limit queues.", no_args_is_help=True)
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(dead_cli, name="dead")
cli.add_typer(queues_cli, name="queues")
cron_cli = typer.Typer(help="Periodic (cron) jobs.", no_args_is_help=True)
cli.add_typer(cron_cli, name="cron")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class UsageError(PgJobsError):
    """A command-line value pgjobs cannot use (reported as one line, exit 1)."""


def _plain_app() -> Any:
    """The --app's App, or one on the configured database that enqueues any task by name."""
    from pgjobs.app import App

    if state.app:
        return state.load_app()
    return App(
        state.database_url,
        schema=state.schema_name(),
        strict_tasks=False,
        listen_url=state.listen_url,
    )


@contextmanager
def _admin(batch_size: int | None = None) -> Iterator[Any]:
    """An Admin on the configured database (the --app's, when one is given)."""
    from pgjobs.admin import DEFAULT_BATCH_SIZE, Admin

    app = _plain_app()
    try:
        yield Admin(app, batch_size=batch_size or DEFAULT_BATCH_SIZE)
    finally:
        app.close()


def _jsonable(value: Any) -> Any:
    import dataclasses
    import datetime as dt
    import decimal
    import enum
    import uuid

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _print_json(value: Any) -> None:
    import json

    typer.echo(json.dumps(_jsonable(value), indent=2))


def _console() -> Any:
    from rich.console import Console

    # Piped output keeps whole lines rather than wrapping at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _cell(value: Any) -> str:
    import datetime as dt

    from pgjobs.durations import format_duration

    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.timedelta):
        return format_duration(value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(key)) for key, _ in columns])
    return table


def _show(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    console = _console()
    if not rows:
        console.print(f"{title}: none")
        return
    console.print(_table(title, rows, columns))


def _parse_args_json(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--args must be a JSON object, not {type(value).__name__}")
    return value


def _duration(text: str, option: str) -> Any:
    from pgjobs.durations import DurationError, parse_duration

    try:
        return parse_duration(text)
    except DurationError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _retention(text: str, option: str) -> Any:
    from pgjobs.durations import DurationError, parse_retention

    try:
        return parse_retention(text)
    except DurationError as exc:
        raise UsageError(f"{option}: {exc} (or 'never')") from None


def _report_batch(action: str, result: Any, as_json: bool) -> None:
    """Print what a multi-job action did; one error line and exit 1 if any was skipped."""
    if as_json:
        _print_json({"done": result.done, "skipped": result.skipped})
    else:
        typer.echo(
            f"{action} {len(result.done)} job(s)"
            + (
                f": {', '.join(map(str, result.done[:20]))}"
                + (" …" if len(result.done) > 20 else "")
                if result.done
                else ""
            )
        )
    if result.skipped:
        reasons = "; ".join(f"{job_id}: {why}" for job_id, why in sorted(result.skipped.items()))
        raise UsageError(f"{len(result.skipped)} job(s) not {action.lower()}: {reasons}")


@cli.command("enqueue")
@reports_errors
def enqueue(
    task: Annotated[str, typer.Argument(help="Task name, e.g. myapp.tasks.send_email.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
    queue: Annotated[str | None, typer.Option("--queue", help="Queue (default: task's).")] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", help="-100..100, lower runs first.")
    ] = None,
    delay: Annotated[
        str | None, typer.Option("--delay", help="Run after this long, e.g. 30s, 5m, 1h.")
    ] = None,
    unique_key: Annotated[
        str | None, typer.Option("--unique-key", help="At most one live job with this key.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", help="Attempts before the job is dead.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Enqueue one job by task name (tasks need not be importable here unless --app is
    given). Prints the job id (an existing live job's id for a duplicate unique key)."""
    payload = _parse_args_json(args)
    wait = _duration(delay, "--delay") if delay is not None else None
    app = _plain_app()
    try:
        job_id = app.enqueue(
            task,
            payload,
            queue=queue,
            priority=priority,
            delay=wait,
            unique_key=unique_key,
            max_attempts=max_attempts,
        )
    finally:
        app.close()
    if as_json:
        _print_json({"id": job_id})
    else:
        typer.echo(str(job_id))


STATE_HELP = "scheduled, available, running, retryable, succeeded, dead, cancelled, pending"
JOB_COLUMNS = [
    ("id", "id"),
    ("queue", "queue"),
    ("task", "task"),
    ("state", "state"),
    ("attempts", "attempts"),
    ("max_attempts", "max"),
    ("run_at", "run at"),
    ("finished_at", "finished"),
    ("worker", "worker"),
    ("last_error", "last error"),
]


@jobs_cli.command("list")
@reports_errors
def jobs_list(
    job_state: Annotated[str | None, typer.Option("--state", help=STATE_HELP)] = None,
    queue: Annotated[str | None, typer.Option("--queue")] = None,
    task: Annotated[str | None, typer.Option("--task")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    from pgjobs.admin import parse_state

    if job_state is not None:
        parse_state(job_state)  # fail before connecting
    with _admin() as admin:
        rows = admin.list_jobs(state=job_state, queue=queue, task=task, limit=limit)
    if as_json:
        _print_json(rows)
    else:
        _show("jobs", rows, JOB_COLUMNS)


def _emit_job(job: Any, as_json: bool) -> None:
    """One job, as JSON for scripts or as a readable page for people."""
    if as_json:
        _print_json(job)
    else:
        _print_job(job)


_WIDTH = len("on_parent_failure")  # the longest field name of `jobs show`
# Fields of `jobs show` left out while unset (most jobs have no limits or dependencies).
_SHOWN_WHEN_SET = frozenset(
    {"unique_until", "limit_key", "on_parent_failure", "depends_on", "waiting_for", "dependents"}
)


def _print_job(job: Any) -> None:
    import json

    console = _console()
    fields = [
        "id",
        "queue",
        "task",
        "state",
        "priority",
        "attempts",
        "max_attempts",
        "run_at",
        "created_at",
        "started_at",
        "finished_at",
        "worker",
        "unique_key",
        "unique_until",
        "limit_key",
        "on_parent_failure",
        "depends_on",
        "waiting_for",
        "dependents",
    ]
    for name in fields:
        value = getattr(job, name)
        if value is None and name in _SHOWN_WHEN_SET:
            continue
        console.print(f"[bold]{name:>{_WIDTH}}[/bold]  {_cell(value)}", markup=True)
    for name in ("args", "progress", "result", "meta"):
        value = getattr(job, name)
        console.print(f"[bold]{name:>{_WIDTH}}[/bold]  ", end="", markup=True)
        console.print(json.dumps(value, sort_keys=True), markup=False)
    if not job.errors:
        console.print(f"[bold]{'errors':>{_WIDTH}}[/bold]  none", markup=True)
        return
    console.print(f"[bold]{'errors':>{_WIDTH}}[/bold]  {len(job.errors)}", markup=True)
    for error in job.errors:
        console.print(
            f"  attempt {error.get('attempt')} at {error.get('at')} on "
            f"{error.get('worker') or error.get('operator') or '-'}: "
            f"{error.get('type')}: {error.get('message')}",
            markup=False,
        )
        if error.get("traceback"):
            for line in str(error["traceback"]).rstrip().splitlines():
                console.print("    " + line, markup=False)


@jobs_cli.command("show")
@reports_errors
def jobs_show(job_id: Annotated[int, typer.Argument()], as_json: JsonOption = False) -> None:
    """Show one job: args, errors with tracebacks, progress, result, timestamps, worker."""
    with _admin() as admin:
        job = admin.get_job(job_id)
    _emit_job(job, as_json)


@jobs_cli.command("cancel")
@reports_errors
def jobs_cancel(job_id: Annotated[int, typer.Argument()], as_json: JsonOption = False) -> None:
    """Cancel a job that has not finished; a running one is stopped by its worker."""
    with _admin() as admin:
        job = admin.cancel_job(job_id)
    if as_json:
        _print_json(job)
    else:
        typer.echo(f"job {job.id} cancelled")


@jobs_cli.command("retry")
@reports_errors
def jobs_retry(job_id: Annotated[int, typer.Argument()], as_json: JsonOption = False) -> None:
    """Run a dead, cancelled, retryable or scheduled job again now. A job out of attempts
    gets one more (max_attempts becomes attempts + 1)."""
    with _admin() as admin:
        job = admin.retry_job(job_id)
    if as_json:
        _print_json(job)
    else:
        typer.echo(
            f"job {job.id} is available again (attempt {job.attempts + 1} of {job.max_attempts})"
        )


DEAD_COLUMNS = [
    ("id", "id"),
    ("queue", "queue"),
    ("task", "task"),
    ("attempts", "attempts"),
    ("finished_at", "died"),
    ("last_error_type", "error"),
    ("last_error", "message"),
]


@dead_cli.command("list")
@reports_errors
def dead_list(
    queue: Annotated[str | None, typer.Option("--queue")] = None,
    task: Annotated[str | None, typer.Option("--task")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    as_json: JsonOption = False,
) -> None:
    """List dead jobs, newest death first."""
    with _admin() as admin:
        rows = admin.dead_jobs(queue=queue, task=task, limit=limit)
    if as_json:
        _print_json(rows)
    else:
        _show("dead jobs", rows, DEAD_COLUMNS)


@dead_cli.command("show")
@reports_errors
def dead_show(job_id: Annotated[int, typer.Argument()], as_json: JsonOption = False) -> None:
    """Show one dead job with its errors and tracebacks."""
    with _admin() as admin:
        job = admin.get_dead_job(job_id)
    _emit_job(job, as_json)


@dead_cli.command("retry")
@reports_errors
def dead_retry(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Dead job ids.")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
    task: Annotated[str | None, typer.Option("--task", help="Every dead job of a task.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Retry dead jobs (ids, --all, or --task T): they run again now, one more attempt
    each if they used all of theirs."""
    with _admin() as admin:
        result = admin.retry_dead(job_ids or (), all_jobs=all_jobs, task=task)
    _report_batch("Retried", result, as_json)


@dead_cli.command("delete")
@reports_errors
def dead_delete(
    job_ids: Annotated[list[int], typer.Argument(help="Dead job ids.")],
    as_json: JsonOption = False,
) -> None:
    """Delete dead jobs by id."""
    with _admin() as admin:
        result = admin.delete_dead(job_ids)
    _report_batch("Deleted", result, as_json)


@dead_cli.command("purge")
@reports_errors
def dead_purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Dead for longer than this, e.g. 7d, 12h.")
    ],
    as_json: JsonOption = False,
) -> None:
    """Delete dead jobs that died longer ago than --older-than (in bounded batches)."""
    period = _duration(older_than, "--older-than")
    with _admin() as admin:
        deleted = admin.purge_dead(period)
    if as_json:
        _print_json({"deleted": deleted})
    else:
        typer.echo(f"purged {deleted} dead job(s)")


STATS_COLUMNS = [
    ("queue", "queue"),
    ("paused", "paused"),
    ("scheduled", "sched"),
    ("available", "avail"),
    ("running", "running"),
    ("retryable", "retry"),
    ("dead", "dead"),
    ("succeeded", "done"),
    ("oldest_waiting_age", "oldest wait"),
    ("rate_done", "done/min 1·5·15m"),
    ("rate_failed", "failed/min 1·5·15m"),
    ("failure_rate_15m", "fail% 15m"),
]


def _stats_table(rows: list[dict[str, Any]]) -> Any:
    for row in rows:
        row["rate_done"] = "{} · {} · {}".format(
            row["succeeded_per_min_1m"], row["succeeded_per_min_5m"], row["succeeded_per_min_15m"]
        )
        row["rate_failed"] = "{} · {} · {}".format(
            row["failed_per_min_1m"], row["failed_per_min_5m"], row["failed_per_min_15m"]
        )
        rate = row["failure_rate_15m"]
        row["failure_rate_15m"] = f"{float(rate):.1%}" if rate is not None else "-"
    return _table("queues", rows, STATS_COLUMNS)


@cli.command("stats")
@reports_errors
def stats(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", "-n", min=0.1, help="Seconds between refreshes.")
    ] = 2.0,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="With --watch: stop after N.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Per queue: jobs by state, oldest waiting job, done and failed per minute over the
    last 1/5/15 minutes, failure rate. --watch refreshes every --interval seconds."""
    import time

    with _admin() as admin:
        if as_json:
            _print_json(admin.stats())
            return
        if not watch:
            _console().print(_stats_table(admin.stats()))
            return
        from rich.live import Live

        with Live(_stats_table(admin.stats()), console=_console(), auto_refresh=False) as live:
            shown = 1
            while count is None or shown < count:
                time.sleep(interval)
                live.update(_stats_table(admin.stats()), refresh=True)
                shown += 1


WORKER_COLUMNS = [
    ("worker", "worker"),
    ("host", "host"),
    ("pid", "pid"),
    ("queues", "queues"),
    ("concurrency", "slots"),
    ("uptime", "uptime"),
    ("jobs_succeeded", "done"),
    ("jobs_failed", "failed"),
    ("current_jobs", "current jobs"),
    ("heartbeat_age", "heartbeat"),
    ("alive", "alive"),
]


@cli.command("workers")
@reports_errors
def workers(
    heartbeat_timeout: Annotated[
        float,
        typer.Option("--heartbeat-timeout", min=0.1, help="Seconds of silence = not alive."),
    ] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Per worker: host, pid, queues, uptime, jobs done/failed, current jobs, heartbeat."""
    with _admin() as admin:
        rows = admin.workers(heartbeat_timeout=heartbeat_timeout)
    if as_json:
        _print_json(rows)
    else:
        _show("workers", rows, WORKER_COLUMNS)


@queues_cli.command("list")
@reports_errors
def queues_list(as_json: JsonOption = False) -> None:
    """Queues with jobs or settings: paused, waiting, running, dead."""
    with _admin() as admin:
        rows = admin.queues()
    if as_json:
        _print_json(rows)
    else:
        columns = [
            ("name", "queue"),
            ("paused", "paused"),
            ("paused_at", "since"),
            ("limits", "limits"),
            ("waiting", "waiting"),
            ("running", "running"),
            ("dead", "dead"),
        ]
        for row in rows:
            row["limits"] = _limits_text(row)
        _show("queues", rows, columns)


def _limits_text(row: dict[str, Any]) -> str:
    limits = QueueLimits.from_row(row)
    return limits.describe() if limits.limited else ""


@queues_cli.command("pause")
@reports_errors
def queues_pause(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Pause a queue (the state lives in the database, for every worker)."""
    with _admin() as admin:
        row = admin.pause_queue(name)
    _print_json(row) if as_json else typer.echo(f"queue {name} paused")


@queues_cli.command("resume")
@reports_errors
def queues_resume(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Resume a paused queue."""
    with _admin() as admin:
        row = admin.resume_queue(name)
    _print_json(row) if as_json else typer.echo(f"queue {name} resumed")


@queues_cli.command("limit")
@reports_errors
def queues_limit(
    name: Annotated[str, typer.Argument()],
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, help="At most N jobs running, over all workers."),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option("--rate", help="At most COUNT starts per PERIOD: 20/s, 100/m, 5/30s."),
    ] = None,
    per_key: Annotated[
        bool,
        typer.Option("--per-key", help="Apply the limits to each limit_key separately."),
    ] = False,
    off: Annotated[bool, typer.Option("--off", help="Remove the queue's limits.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Set a queue's global limits, enforced by every worker at claim time. The options
    given replace all the queue's limits (--off removes them)."""
    if off == (concurrency is not None or rate is not None):
        raise typer.BadParameter("give --concurrency and/or --rate, or --off")
    limits = (
        QueueLimits()
        if off
        else QueueLimits.build(concurrency=concurrency, rate=rate, per_key=per_key)
    )
    with _admin() as admin:
        row = admin.set_queue_limits(name, limits)
    if as_json:
        _print_json(row)
    else:
        typer.echo(f"queue {name}: limits {limits.describe()}")


@queues_cli.command("alert")
@reports_errors
def queues_alert(
    name: Annotated[str, typer.Argument()],
    threshold: Annotated[
        int | None,
        typer.Option("--threshold", min=1, help="Alert when this many jobs are dead."),
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Remove the queue's alert.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Set the dead-letter alert of a queue: workers log a warning, send a dead_alert
    event and call the app's @app.on_dead_alert hooks once each time the queue's dead count
    reaches the threshold."""
    if (threshold is None) == (not off):
        raise typer.BadParameter("give either --threshold N or --off")
    with _admin() as admin:
        row = admin.set_dead_alert(name, None if off else threshold)
    if as_json:
        _print_json(row)
    elif off:
        typer.echo(f"queue {name}: dead-letter alert off")
    else:
        typer.echo(f"queue {name}: dead-letter alert at {threshold} dead job(s)")


@cron_cli.command("list")
@reports_errors
def cron_list(as_json: JsonOption = False) -> None:
    """Periodic tasks: name, task, schedule, time zone, last and next slot. With --app,
    the app's declarations are listed too (even before a worker has seen them)."""
    from pgjobs.cron import list_periodic
    from pgjobs.enqueue import schema_errors

    with _admin() as admin:
        app = admin.app
        with app.pool.connection() as conn, schema_errors(app.schema):
            rows = list_periodic(conn, app.queries, app.periodics)
    if as_json:
        _print_json(rows)
    else:
        columns = [
            ("name", "name"),
            ("task", "task"),
            ("schedule", "schedule"),
            ("timezone", "time zone"),
            ("last_slot", "last slot"),
            ("next_slot", "next slot"),
            ("declared", "declared"),
        ]
        _show("periodic tasks", rows, columns)


@cli.command("prune")
@reports_errors
def prune(
    succeeded: Annotated[str, typer.Option("--succeeded", help="Keep succeeded jobs.")] = "1d",
    cancelled: Annotated[str, typer.Option("--cancelled", help="Keep cancelled jobs.")] = "7d",
    dead: Annotated[
        str, typer.Option("--dead", help="Keep dead jobs ('never' prunes none).")
    ] = "never",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Rows deleted per statement.")
    ] = 10_000,
    as_json: JsonOption = False,
) -> None:
    """Delete finished jobs older than their state's retention, in bounded batches.
    Durations like 12h, 7d, 1d12h; 'never' keeps that state forever."""
    from pgjobs.admin import Retention

    retention = Retention(
        succeeded=_retention(succeeded, "--succeeded"),
        cancelled=_retention(cancelled, "--cancelled"),
        dead=_retention(dead, "--dead"),
    )
    with _admin(batch_size) as admin:
        deleted = admin.prune(retention)
    if as_json:
        _print_json(deleted)
    else:
        states = {s: n for s, n in deleted.items() if s in ("succeeded", "cancelled", "dead")}
        line = ", ".join(f"{n} {s}" for s, n in states.items()) + " job(s) pruned"
        if "archived" in deleted:
            line += (f"; {deleted['archived']} archived, {deleted['dropped_partitions']} "
                     "day partition(s) dropped")  # fmt: skip
        typer.echo(line)


@cli.command("doctor")
@reports_errors
def doctor(
    heartbeat_timeout: Annotated[
        float, typer.Option("--heartbeat-timeout", min=0.1, help="Seconds; as `pgjobs work`.")
    ] = 30.0,
    transaction_warn: Annotated[
        str, typer.Option("--long-transaction", help="Open longer than this warns.")
    ] = "5m",
    as_json: JsonOption = False,
) -> None:
    """Check the installation; each check has a verdict (ok, warn, fail) and a fix.
    Exit status 1 when a check fails, 0 otherwise (warnings included)."""
    from pgjobs.doctor import Doctor, Thresholds, Verdict, worst

    warn_after = _duration(transaction_warn, "--long-transaction").total_seconds()
    thresholds = Thresholds(
        heartbeat_timeout=heartbeat_timeout,
        transaction_warn=warn_after,
        transaction_fail=max(warn_after * 12, Thresholds().transaction_fail),
    )
    checks = Doctor(state.url(), state.schema_name(), thresholds).run()
    if as_json:
        _print_json(checks)
    else:
        console = _console()
        style = {Verdict.OK: "green", Verdict.WARN: "yellow", Verdict.FAIL: "red"}
        for check in checks:
            console.print(
                f"[{style[check.verdict]}]{check.verdict.value.upper():>4}[/] "
                f"[bold]{check.name}[/bold]: ",
                end="",
            )
            console.print(check.summary, markup=False)
            if check.fix:
                console.print("      fix: " + check.fix, markup=False)
    if worst(checks) is Verdict.FAIL:
        raise typer.Exit(1)


@cli.command("dashboard")
@reports_errors
def dashboard(
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: local only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, offer no action.")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Serve the web dashboard: queues, jobs, dead-letter queue, workers, live updates and
    Prometheus /metrics. PGJOBS_DASHBOARD_TOKEN or PGJOBS_DASHBOARD_PASSWORD (with
    PGJOBS_DASHBOARD_USER, default 'pgjobs') in the environment require a login."""
    _configure_logging(log_level)
    from pgjobs.dashboard.server import auth_from_env, serve

    app = _plain_app()
    serve(app, host=host, port=port, read_only=read_only, auth=auth_from_env())


def main() -> None:
    """Entry point of the ``pgjobs`` console script."""
    cli()


if __name__ == "__main__":
    main()

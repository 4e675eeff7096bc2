"""The ``pgjobs`` command line.

Exit codes: 0 success, 1 a pgjobs error (printed as one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from pgjobs.errors import ConfigurationError, PgJobsError
from pgjobs.settings import APP_ENV, DATABASE_URL_ENV, SCHEMA_ENV

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
) -> None:
    """Options shared by every command."""
    state.database_url, state.app, state.schema = database_url, app, schema


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


def _queue_names(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if any("=" in name for name in names):
        raise typer.BadParameter(
            "per-queue concurrency (queue=N) is not supported yet; list queue names and set "
            "--concurrency",
            param_hint="--queues",
        )
    return names


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
            help="Queues to work, comma-separated (default: the queues of the app's tasks).",
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
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
) -> None:
    """Run jobs: claim them from the queues, run them, record their outcomes.

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
    queue_names = _queue_names(queues)
    app, demo = _load_work_app()
    if demo:
        from pgjobs import demo as demo_module

        demo_module.seed()
    if processes > 1:
        from pgjobs.supervisor import Supervisor, child_argv, child_env

        env = child_env(app.database_url, DEMO_APP if demo else None)
        supervisor = Supervisor(child_argv(sys.argv[1:]), processes, env, burst=burst)
        raise typer.Exit(supervisor.run())

    from pgjobs.supervisor import watch_supervisor
    from pgjobs.worker import Worker

    worker = Worker(
        app,
        queue_names,
        concurrency,
        prefetch=prefetch,
        poll_interval=poll_interval,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        grace=grace,
        burst=burst,
    )
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


def main() -> None:
    """Entry point of the ``pgjobs`` console script."""
    cli()


if __name__ == "__main__":
    main()

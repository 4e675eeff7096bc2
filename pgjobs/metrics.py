"""Prometheus metrics: job counters and durations, and gauges read from the database.

Two places serve them:

* ``pgjobs work --metrics-port N``: each worker counts what it runs (:class:`WorkerMetrics`,
  hooked into :class:`pgjobs.Worker`): exact counts and durations, measured in the process
  that ran the job. With ``--processes P`` the supervisor serves the port and its children
  write their samples to files in a private directory (prometheus_client's multiprocess
  mode), so one scrape returns the sum over all children, restarts included.
* the dashboard's ``/metrics``: gauges read at scrape time from the SQL views
  (:class:`DatabaseCollector`: jobs by queue and state, oldest waiting age, paused queues,
  workers alive), and counters of the job events the dashboard receives
  (:class:`EventMetrics`). Scrape one or the other for job totals, not both: they count
  the same jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgjobs.errors import ConfigurationError, PgJobsError

if TYPE_CHECKING:
    from pgjobs.admin import Admin
    from pgjobs.events import JobEvent
    from pgjobs.execution import ClaimedJob, Finish

log = logging.getLogger("pgjobs.metrics")

# Seconds; from quick jobs (a few ms) to long reports (10 min).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
JOB_STATES = (
    "scheduled",
    "available",
    "running",
    "retryable",
    "pending",
    "succeeded",
    "dead",
    "cancelled",
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by the supervisor in its children's environment: the port is served by the supervisor.
CHILD_ENV = "PGJOBS_METRICS_CHILD"
# Started jobs the dashboard remembers to time their end (oldest forgotten first).
_MAX_TIMED = 100_000


class JobMetrics:
    """The job counters and the duration histogram, in one registry.

    Counters (labels ``queue``, ``task``): ``pgjobs_jobs_enqueued_total``,
    ``pgjobs_jobs_started_total``, ``pgjobs_jobs_succeeded_total``,
    ``pgjobs_jobs_failed_total`` (failed attempts), ``pgjobs_jobs_retried_total``,
    ``pgjobs_jobs_dead_total``, ``pgjobs_jobs_cancelled_total``,
    ``pgjobs_jobs_snoozed_total``; histogram ``pgjobs_job_duration_seconds`` (labels
    ``queue``, ``task``, ``outcome``: succeeded or failed).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("queue", "task")
        self.counters = {
            kind: Counter(f"pgjobs_jobs_{kind}", help_text, labels, registry=registry)
            for kind, help_text in (
                ("enqueued", "Jobs enqueued (seen as enqueued events)."),
                ("started", "Job attempts started."),
                ("succeeded", "Jobs that succeeded."),
                ("failed", "Job attempts that failed (an error or a timeout)."),
                ("retried", "Failed attempts that will be retried."),
                ("dead", "Jobs that went to the dead-letter queue."),
                ("cancelled", "Jobs cancelled by themselves."),
                ("snoozed", "Jobs that snoozed (put back without using an attempt)."),
            )
        }
        self.duration = Histogram(
            "pgjobs_job_duration_seconds",
            "How long job attempts ran, by outcome (succeeded or failed).",
            (*labels, "outcome"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    def count(self, kind: str, queue: str, task: str) -> None:
        """Add one to the counter of ``kind`` (kinds without a counter are ignored)."""
        counter = self.counters.get(kind)
        if counter is not None:
            counter.labels(queue, task).inc()

    def observe(self, queue: str, task: str, outcome: str, seconds: float) -> None:
        """Record one attempt's duration."""
        self.duration.labels(queue, task, outcome).observe(max(seconds, 0.0))


class WorkerMetrics(JobMetrics):
    """What one worker process ran: set as ``worker.observer`` (see ``pgjobs work
    --metrics-port``). Called on the worker's event loop; prometheus_client is thread-safe."""

    def started(self, job: ClaimedJob) -> None:
        """A job attempt is about to run."""
        self.count("started", job.queue, job.task)

    def finished(self, job: ClaimedJob, finish: Finish, seconds: float) -> None:
        """A job attempt ended with ``finish`` after ``seconds``."""
        if finish.note == "snoozed":
            self.count("snoozed", job.queue, job.task)
            return
        if finish.state == "succeeded":
            self.count("succeeded", job.queue, job.task)
            self.observe(job.queue, job.task, "succeeded", seconds)
            return
        if finish.state == "cancelled":
            self.count("cancelled", job.queue, job.task)
            return
        self.count("failed", job.queue, job.task)
        self.observe(job.queue, job.task, "failed", seconds)
        self.count("retried" if finish.state == "retryable" else "dead", job.queue, job.task)


class EventMetrics(JobMetrics):
    """Job counters fed by the event stream a dashboard receives; durations are timed from
    a job's ``started`` event to its ``succeeded`` or ``failed`` event."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self._started: OrderedDict[int, float] = OrderedDict()

    def event(self, event: JobEvent) -> None:
        """Count one event."""
        if event.job_id is None or event.queue is None or event.task is None:
            return
        self.count(event.kind, event.queue, event.task)
        at = event.at.timestamp()
        if event.kind == "started":
            self._started[event.job_id] = at
            if len(self._started) > _MAX_TIMED:
                self._started.popitem(last=False)
        elif event.kind in ("succeeded", "failed"):
            began = self._started.pop(event.job_id, None)
            if began is not None:
                self.observe(event.queue, event.task, event.kind, at - began)


class DatabaseCollector(Collector):
    """Gauges read from the views at each scrape: ``pgjobs_jobs{queue,state}``,
    ``pgjobs_queue_oldest_waiting_seconds{queue}``, ``pgjobs_queue_paused{queue}``,
    ``pgjobs_workers_alive``, ``pgjobs_worker_running_jobs{worker}`` and
    ``pgjobs_database_up`` (0 when the database could not be read: the other gauges are
    left out rather than reported wrong)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def collect(self) -> Iterator[Metric]:
        """One scrape: two statements (queue_stats, worker_stats)."""
        up = GaugeMetricFamily("pgjobs_database_up", "Whether the database could be read.")
        try:
            queues = self.admin.stats()
            workers = self.admin.workers()
        except PgJobsError as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _queue_gauges(queues)
        yield from _worker_gauges(workers)


def _queue_gauges(queues: list[dict[str, Any]]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("pgjobs_jobs", "Jobs by queue and state.", labels=["queue", "state"])
    oldest = GaugeMetricFamily(
        "pgjobs_queue_oldest_waiting_seconds",
        "Age of the oldest job that is due and waiting to run (0: none).",
        labels=["queue"],
    )
    paused = GaugeMetricFamily("pgjobs_queue_paused", "1 if the queue is paused.", labels=["queue"])
    for row in queues:
        for state in JOB_STATES:
            jobs.add_metric([row["queue"], state], float(row.get(state) or 0))
        age = row.get("oldest_waiting_age")
        oldest.add_metric([row["queue"]], age.total_seconds() if age is not None else 0.0)
        paused.add_metric([row["queue"]], 1.0 if row.get("paused") else 0.0)
    yield from (jobs, oldest, paused)


def _worker_gauges(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    alive = GaugeMetricFamily("pgjobs_workers_alive", "Workers heard from recently.")
    alive.add_metric([], float(sum(1 for w in workers if w["alive"])))
    running = GaugeMetricFamily(
        "pgjobs_worker_running_jobs", "Jobs each live worker is running.", labels=["worker"]
    )
    for worker in workers:
        if worker["alive"]:
            running.add_metric([worker["worker"]], float(len(worker["current_jobs"] or [])))
    yield from (alive, running)


# -- pgjobs work --metrics-port -------------------------------------------------------------


def worker_metrics(port: int, host: str) -> WorkerMetrics:
    """The metrics of this worker process, served on ``host:port`` unless a supervisor
    serves them (then they go to its multiprocess directory)."""
    if os.environ.get(CHILD_ENV) and os.environ.get(MULTIPROC_ENV):
        return WorkerMetrics(CollectorRegistry())
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    _serve(registry, port, host)
    return metrics


@contextlib.contextmanager
def supervisor_metrics(port: int, host: str, child_env: dict[str, str]) -> Iterator[None]:
    """For ``pgjobs work --processes P --metrics-port N``: serve the sum of the children's
    metrics on ``host:port`` from the supervisor; the children write theirs to a private
    directory (named in ``child_env``), removed when the supervisor is done."""
    from prometheus_client import multiprocess

    directory = tempfile.mkdtemp(prefix="pgjobs-metrics-")
    child_env[MULTIPROC_ENV] = directory
    child_env[CHILD_ENV] = "1"
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    try:
        _serve(registry, port, host)
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _serve(registry: CollectorRegistry, port: int, host: str) -> None:
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info("metrics on http://%s:%d/metrics", host, port)

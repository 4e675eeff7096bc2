"""Operations: queue settings (pause/resume) and views for stats, workers and throughput.

Revision ID: pgjobs_0002
Revises: pgjobs_0001
Create Date: 2026-11-23

No index is added: finished jobs by time are served by ``jobs_finished_idx``
(state, finished_at) from 0001, a worker's running jobs by ``jobs_running_idx``, and the
workers table is small. Another index on ``jobs`` would cost every enqueue, claim and
completion a write for the benefit of an operator's occasional query.

The views are plain (not security_invoker) views: a read-only role needs only
``USAGE`` on the schema and ``SELECT`` on the views, not on the tables.
"""

from __future__ import annotations

from alembic import op

from pgjobs.migrations import ddl

revision = "pgjobs_0002"
down_revision = "pgjobs_0001"
branch_labels = None
depends_on = None

# States whose jobs wait to run; "due" ones (run_at <= now()) are what a worker would claim.
_WAITING = "('available', 'scheduled', 'retryable')"

UPGRADE = [
    # One row per queue an operator has configured; a queue without a row is not paused.
    # Kept in the database so that every worker, wherever it runs, obeys the same state.
    """
    CREATE TABLE {schema}.queues (
        name                  text        PRIMARY KEY,
        paused                boolean     NOT NULL DEFAULT false,
        paused_at             timestamptz,
        dead_alert_threshold  integer,
        dead_alerted_at       timestamptz,
        meta                  jsonb       NOT NULL DEFAULT '{}',
        CONSTRAINT queues_name CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$'),
        CONSTRAINT queues_paused_at_iff_paused CHECK (paused = (paused_at IS NOT NULL)),
        CONSTRAINT queues_dead_alert_threshold_positive
            CHECK (dead_alert_threshold IS NULL OR dead_alert_threshold >= 1),
        CONSTRAINT queues_meta_object CHECK (jsonb_typeof(meta) = 'object')
    )
    """,
    # Failures are the attempts that ended in an error (retryable, dead, worker died): one
    # entry each in `errors`, stamped `at`. Entries an operator added (`operator` key) are
    # not failures. A job that failed within the last 15 minutes is either still live or
    # finished after that failure, so only live jobs and jobs finished in the window have
    # their history expanded: exact, and cheap per row. The counts by state read the whole
    # table once, like count(*); retention keeps it bounded.
    f"""
    CREATE VIEW {{schema}}.queue_stats AS
    WITH per_queue AS (
        SELECT queue,
               count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
               count(*) FILTER (WHERE state = 'available') AS available,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) FILTER (WHERE state = 'retryable') AS retryable,
               count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
               min(run_at) FILTER (WHERE state IN {_WAITING} AND run_at <= now())
                   AS oldest_waiting_run_at,
               count(*) FILTER (WHERE state = 'succeeded'
                                  AND finished_at >= now() - interval '1 minute') AS s1,
               count(*) FILTER (WHERE state = 'succeeded'
                                  AND finished_at >= now() - interval '5 minutes') AS s5,
               count(*) FILTER (WHERE state = 'succeeded'
                                  AND finished_at >= now() - interval '15 minutes') AS s15
        FROM {{schema}}.jobs
        GROUP BY queue
    ),
    failures AS (
        SELECT j.queue,
               count(*) FILTER (WHERE f.at >= now() - interval '1 minute') AS f1,
               count(*) FILTER (WHERE f.at >= now() - interval '5 minutes') AS f5,
               count(*) FILTER (WHERE f.at >= now() - interval '15 minutes') AS f15
        FROM {{schema}}.jobs AS j
        CROSS JOIN LATERAL (
            SELECT (e ->> 'at')::timestamptz AS at
            FROM jsonb_array_elements(j.errors) AS e
            WHERE NOT e ? 'operator'
        ) AS f
        WHERE j.errors <> '[]'
          AND (j.finished_at IS NULL OR j.finished_at >= now() - interval '15 minutes')
        GROUP BY j.queue
    ),
    names AS (
        SELECT queue AS name FROM per_queue
        UNION
        SELECT name FROM {{schema}}.queues
    )
    SELECT n.name AS queue,
           coalesce(q.paused, false) AS paused,
           coalesce(p.scheduled, 0) AS scheduled,
           coalesce(p.available, 0) AS available,
           coalesce(p.running, 0) AS running,
           coalesce(p.retryable, 0) AS retryable,
           coalesce(p.pending, 0) AS pending,
           coalesce(p.succeeded, 0) AS succeeded,
           coalesce(p.dead, 0) AS dead,
           coalesce(p.cancelled, 0) AS cancelled,
           now() - p.oldest_waiting_run_at AS oldest_waiting_age,
           round(coalesce(p.s1, 0) / 1.0, 2) AS succeeded_per_min_1m,
           round(coalesce(p.s5, 0) / 5.0, 2) AS succeeded_per_min_5m,
           round(coalesce(p.s15, 0) / 15.0, 2) AS succeeded_per_min_15m,
           round(coalesce(f.f1, 0) / 1.0, 2) AS failed_per_min_1m,
           round(coalesce(f.f5, 0) / 5.0, 2) AS failed_per_min_5m,
           round(coalesce(f.f15, 0) / 15.0, 2) AS failed_per_min_15m,
           -- Failed attempts among all attempts that ended in the last 15 minutes.
           round(coalesce(f.f15, 0)::numeric
                 / nullif(coalesce(p.s15, 0) + coalesce(f.f15, 0), 0), 4) AS failure_rate_15m
    FROM names AS n
    LEFT JOIN per_queue AS p ON p.queue = n.name
    LEFT JOIN failures AS f ON f.queue = n.name
    LEFT JOIN {{schema}}.queues AS q ON q.name = n.name
    """,
    # `alive` compares the heartbeat with the session setting pgjobs.heartbeat_timeout
    # (seconds; `SET pgjobs.heartbeat_timeout = '60'`), 30 by default like `pgjobs work`.
    # Current jobs come from jobs_running_idx.
    """
    CREATE VIEW {schema}.worker_stats AS
    SELECT w.id AS worker, w.host, w.pid, w.queues, w.concurrency, w.started_at,
           now() - w.started_at AS uptime,
           w.jobs_succeeded, w.jobs_failed,
           array(SELECT j.id FROM {schema}.jobs AS j
                 WHERE j.worker = w.id AND j.state = 'running' ORDER BY j.id) AS current_jobs,
           w.last_heartbeat,
           now() - w.last_heartbeat AS heartbeat_age,
           w.last_heartbeat >= now() - make_interval(secs => coalesce(
               nullif(current_setting('pgjobs.heartbeat_timeout', true), '')::float8, 30))
               AS alive
    FROM {schema}.workers AS w
    """,
    # Per minute of the last hour (the current minute included) and queue: jobs that
    # succeeded (finished_at, via jobs_finished_idx) and failed attempts (the `at` of their
    # error entries, as in queue_stats). Minutes without either are left out.
    """
    CREATE VIEW {schema}.throughput_per_minute AS
    WITH bounds AS (
        SELECT date_trunc('minute', now()) - interval '59 minutes' AS since
    ),
    succeeded AS (
        SELECT date_trunc('minute', j.finished_at) AS minute, j.queue, count(*) AS jobs
        FROM {schema}.jobs AS j, bounds
        WHERE j.state = 'succeeded' AND j.finished_at >= bounds.since
        GROUP BY 1, 2
    ),
    failed AS (
        SELECT date_trunc('minute', f.at) AS minute, j.queue, count(*) AS jobs
        FROM {schema}.jobs AS j
        CROSS JOIN bounds
        CROSS JOIN LATERAL (
            SELECT (e ->> 'at')::timestamptz AS at
            FROM jsonb_array_elements(j.errors) AS e
            WHERE NOT e ? 'operator'
        ) AS f
        WHERE j.errors <> '[]'
          AND (j.finished_at IS NULL OR j.finished_at >= bounds.since)
          AND f.at >= bounds.since
        GROUP BY 1, 2
    )
    SELECT coalesce(s.minute, f.minute) AS minute,
           coalesce(s.queue, f.queue) AS queue,
           coalesce(s.jobs, 0) AS succeeded,
           coalesce(f.jobs, 0) AS failed
    FROM succeeded AS s
    FULL JOIN failed AS f ON f.minute = s.minute AND f.queue = s.queue
    """,
    # Every event notification goes through here: one place stamps it and keeps it under
    # NOTIFY's 8000-byte payload limit (too many events at once become a resync hint, and
    # subscribers re-read the rows). Pinned search_path: callable from any session safely.
    """
    CREATE FUNCTION {schema}.publish_events(channel text, events json) RETURNS void
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT pg_catalog.pg_notify(channel,
                   CASE WHEN pg_catalog.octet_length(p.payload) < 7900 THEN p.payload
                        ELSE '{"kind": "resync"}' END)
        FROM (SELECT pg_catalog.json_build_object(
                         'at', extract(epoch FROM pg_catalog.now()), 'events', events)::text
                     AS payload) AS p
    $$
    """,
]

DOWNGRADE = [
    "DROP FUNCTION IF EXISTS {schema}.publish_events(text, json)",
    "DROP VIEW IF EXISTS {schema}.throughput_per_minute",
    "DROP VIEW IF EXISTS {schema}.worker_stats",
    "DROP VIEW IF EXISTS {schema}.queue_stats",
    "DROP TABLE IF EXISTS {schema}.queues",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(ddl(statement))


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(ddl(statement))

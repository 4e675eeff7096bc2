"""Flow control: unique periods, queue limits, dependencies, periodic (cron) jobs.

Revision ID: pgjobs_0003
Revises: pgjobs_0002
Create Date: 2026-11-23

Every new jobs column is nullable without a default, so adding them rewrites nothing and
costs rows that do not use them nothing (a NULL is a bit in the row header).
"""

from __future__ import annotations

from alembic import op

from pgjobs.migrations import ddl

revision = "pgjobs_0003"
down_revision = "pgjobs_0002"
branch_labels = None
depends_on = None

_LIVE = "('scheduled', 'available', 'running', 'retryable', 'pending')"

UPGRADE = [
    """
    ALTER TABLE {schema}.jobs
        -- A unique key held for a period (unique_for=...) rather than while the job is
        -- live: the key then names its period, and the row keeps it whatever its state
        -- until this time has passed and retention removes the row.
        ADD COLUMN unique_until timestamptz,
        -- The partition of the queue's concurrency and rate limits this job counts against
        -- when the queue limits per key (e.g. one customer).
        ADD COLUMN limit_key text,
        -- Dependencies: the jobs this one waits for (as enqueued), those it still waits
        -- for (pending while not empty), and, on a parent, the jobs waiting for it.
        ADD COLUMN depends_on bigint[],
        ADD COLUMN waiting_for bigint[],
        ADD COLUMN dependents bigint[],
        -- What a failed or cancelled parent does to this job: 'dead' (default), 'cancel'
        -- or 'run' (run once every parent has finished, whatever became of it).
        ADD COLUMN on_parent_failure text,
        ADD CONSTRAINT jobs_on_parent_failure
            CHECK (on_parent_failure IN ('dead', 'cancel', 'run')),
        ADD CONSTRAINT jobs_pending_waits
            CHECK (state <> 'pending' OR cardinality(waiting_for) > 0),
        ADD CONSTRAINT jobs_limit_key_length CHECK (octet_length(limit_key) <= 1024)
    """,
    # A key held for a period stays held after the job finishes (see unique_until).
    "DROP INDEX {schema}.jobs_unique_key_idx",
    f"""
    CREATE UNIQUE INDEX jobs_unique_key_idx ON {{schema}}.jobs (unique_key)
        WHERE unique_key IS NOT NULL
          AND (state IN {_LIVE} OR unique_until IS NOT NULL)
    """,
    # Running jobs by queue and limit key: what a limited queue's claim counts. Rescue and
    # a worker's current jobs still read only running rows through it.
    "DROP INDEX {schema}.jobs_running_idx",
    """
    CREATE INDEX jobs_running_idx ON {schema}.jobs (queue, limit_key) WHERE state = 'running'
    """,
    """
    ALTER TABLE {schema}.queues
        -- At most this many jobs of the queue running at once, over every worker.
        ADD COLUMN concurrency_limit integer,
        -- At most rate_limit job starts per rate_period, over every worker.
        ADD COLUMN rate_limit integer,
        ADD COLUMN rate_period interval,
        -- Limits apply to each limit_key of the queue separately instead of the whole queue.
        ADD COLUMN limit_per_key boolean NOT NULL DEFAULT false,
        ADD CONSTRAINT queues_concurrency_limit_positive
            CHECK (concurrency_limit IS NULL OR concurrency_limit >= 1),
        ADD CONSTRAINT queues_rate_limit_complete
            CHECK ((rate_limit IS NULL) = (rate_period IS NULL)),
        ADD CONSTRAINT queues_rate_limit_positive
            CHECK (rate_limit IS NULL OR (rate_limit >= 1 AND rate_period > interval '0'))
    """,
    # Starts of jobs in rate-limited queues: the sliding window a rate limit counts. Only
    # limited queues write here; rows older than the queue's period are deleted by the
    # claim that finds them.
    """
    CREATE TABLE {schema}.queue_starts (
        queue       text        NOT NULL,
        limit_key   text,
        started_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX queue_starts_window_idx ON {schema}.queue_starts (queue, started_at)",
    # Periodic (cron) tasks: the last slot enqueued per schedule. The row is what makes a
    # slot enqueued once however many workers run: a worker locks it, enqueues the slots
    # after last_slot, advances it, and commits.
    """
    CREATE TABLE {schema}.periodic (
        name         text        PRIMARY KEY,
        task         text        NOT NULL,
        schedule     text        NOT NULL,
        timezone     text        NOT NULL,
        last_slot    timestamptz,
        last_job_id  bigint,
        updated_at   timestamptz NOT NULL DEFAULT now()
    )
    """,
]

DOWNGRADE = [
    "DROP TABLE IF EXISTS {schema}.periodic",
    "DROP TABLE IF EXISTS {schema}.queue_starts",
    """
    ALTER TABLE {schema}.queues
        DROP COLUMN IF EXISTS limit_per_key,
        DROP COLUMN IF EXISTS rate_period,
        DROP COLUMN IF EXISTS rate_limit,
        DROP COLUMN IF EXISTS concurrency_limit
    """,
    "DROP INDEX IF EXISTS {schema}.jobs_running_idx",
    "CREATE INDEX jobs_running_idx ON {schema}.jobs (worker) WHERE state = 'running'",
    "DROP INDEX IF EXISTS {schema}.jobs_unique_key_idx",
    f"""
    CREATE UNIQUE INDEX jobs_unique_key_idx ON {{schema}}.jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN {_LIVE}
    """,
    """
    ALTER TABLE {schema}.jobs
        DROP COLUMN IF EXISTS on_parent_failure,
        DROP COLUMN IF EXISTS dependents,
        DROP COLUMN IF EXISTS waiting_for,
        DROP COLUMN IF EXISTS depends_on,
        DROP COLUMN IF EXISTS limit_key,
        DROP COLUMN IF EXISTS unique_until
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(ddl(statement))


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(ddl(statement))

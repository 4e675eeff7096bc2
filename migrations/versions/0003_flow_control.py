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
    # The queues with global limits, for read-only roles (which get the views, not the
    # tables) and for people.
    """
    CREATE VIEW {schema}.queue_limits AS
    SELECT name AS queue, concurrency_limit, rate_limit, rate_period, limit_per_key
    FROM {schema}.queues
    WHERE concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL
    """,
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
    # Dependencies: settle the children of parents that reached a final state. One edge per
    # (parent, its final state, child) in three parallel arrays, so that a worker settles
    # every child of a whole completion batch at once, locking them in id order (two
    # batches over overlapping fan-ins cannot deadlock). Returns how many children became
    # runnable now (the worker claims again at once: workers never NOTIFY).
    #
    # Why this is race-free under READ COMMITTED: an enqueue of a child locks its parents
    # and appends the child's id to their `dependents` in its own statement; a worker
    # finishing a parent reads `dependents` from its UPDATE ... RETURNING, which re-reads the
    # newest row version once that enqueue commits (or the enqueue, waiting on the parent's
    # lock, then reads the parent's final state and does not wait for it). Here each level
    # first locks its children (statement 1), then updates them (statement 2): a VOLATILE
    # function takes a fresh snapshot per statement, so statement 2 reads the newest version
    # of every child, including what a concurrent settle of another parent committed while
    # this one waited for the lock. A child made dead or cancelled (per its
    # on_parent_failure) records which parent ended how, and its own dependents settle in
    # the next level (cascade). Children no longer pending, or no longer waiting for that
    # parent (a parent finishing a second time after an operator's retry), are left alone.
    # The job graph is acyclic by construction (a parent exists before its children), so
    # the loop ends.
    """
    CREATE FUNCTION {schema}.settle_dependents(
        parent_ids bigint[], parent_states text[], child_ids bigint[]
    ) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        released integer := 0;
        level_released integer;
    BEGIN
        WHILE coalesce(cardinality(child_ids), 0) > 0 LOOP
            PERFORM 1
            FROM {schema}.jobs AS j
            WHERE j.id = ANY (child_ids) AND j.state = 'pending'
            ORDER BY j.id
            FOR NO KEY UPDATE OF j;

            WITH edges AS (
                SELECT e.parent, e.state, c.id AS child, c.waiting_for,
                       coalesce(c.on_parent_failure, 'dead') AS policy
                FROM unnest(parent_ids, parent_states, child_ids) AS e(parent, state, child)
                JOIN {schema}.jobs AS c ON c.id = e.child
                WHERE c.state = 'pending'
                  AND e.parent = ANY (c.waiting_for)
                  AND e.state IN ('succeeded', 'dead', 'cancelled')
            ),
            per_child AS (
                -- done: parents that hold the child back no longer; failed: the first
                -- parent whose failure ends the child (policies 'dead' and 'cancel').
                SELECT e.child, e.waiting_for, e.policy,
                       coalesce(array_agg(e.parent)
                                    FILTER (WHERE e.state = 'succeeded' OR e.policy = 'run'),
                                '{}') AS done,
                       (array_agg(e.parent ORDER BY e.parent)
                            FILTER (WHERE e.state <> 'succeeded' AND e.policy <> 'run'))[1]
                           AS failed_parent,
                       (array_agg(e.state ORDER BY e.parent)
                            FILTER (WHERE e.state <> 'succeeded' AND e.policy <> 'run'))[1]
                           AS failed_state
                FROM edges AS e
                GROUP BY e.child, e.waiting_for, e.policy
            ),
            planned AS (
                SELECT p.*,
                       ARRAY(SELECT w FROM unnest(p.waiting_for) AS w
                             WHERE w <> ALL (p.done) ORDER BY w) AS still
                FROM per_child AS p
            ),
            updated AS (
                UPDATE {schema}.jobs AS c
                SET state = CASE
                        WHEN p.failed_parent IS NOT NULL
                            THEN CASE WHEN p.policy = 'cancel' THEN 'cancelled' ELSE 'dead' END
                        WHEN cardinality(p.still) > 0 THEN 'pending'
                        WHEN c.run_at > now() THEN 'scheduled'
                        ELSE 'available'
                    END::{schema}.job_state,
                    waiting_for = CASE WHEN p.failed_parent IS NULL THEN p.still
                                       ELSE c.waiting_for END,
                    -- A released child queues from now (its own delay still counts).
                    run_at = CASE WHEN p.failed_parent IS NULL AND cardinality(p.still) = 0
                                  THEN greatest(c.run_at, now()) ELSE c.run_at END,
                    finished_at = CASE WHEN p.failed_parent IS NOT NULL THEN now() END,
                    errors = CASE WHEN p.failed_parent IS NULL THEN c.errors
                                  ELSE c.errors || jsonb_build_array(jsonb_build_object(
                                      'attempt', c.attempts,
                                      'at', now(),
                                      'type', 'ParentFailed',
                                      'message', 'parent job ' || p.failed_parent || ' ended '
                                                 || p.failed_state,
                                      'parent', p.failed_parent,
                                      'parent_state', p.failed_state,
                                      'traceback', NULL,
                                      'worker', NULL)) END
                FROM planned AS p
                WHERE c.id = p.child AND c.state = 'pending'
                RETURNING c.id, c.state, c.dependents
            ),
            next_level AS (
                SELECT u.id, u.state::text AS state, d.child
                FROM updated AS u
                CROSS JOIN LATERAL unnest(u.dependents) AS d(child)
                WHERE u.state IN ('dead', 'cancelled')
            )
            SELECT (SELECT count(*) FROM updated WHERE state = 'available'),
                   (SELECT coalesce(array_agg(id ORDER BY child), '{}') FROM next_level),
                   (SELECT coalesce(array_agg(state ORDER BY child), '{}') FROM next_level),
                   (SELECT coalesce(array_agg(child ORDER BY child), '{}') FROM next_level)
            INTO level_released, parent_ids, parent_states, child_ids;
            released := released + level_released;
        END LOOP;
        RETURN released;
    END
    $$
    """,
    # The same for one parent (an operator cancelling a job).
    """
    CREATE FUNCTION {schema}.settle_dependents(
        parent_id bigint, parent_state text, children bigint[]
    ) RETURNS integer
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT {schema}.settle_dependents(
                   ARRAY(SELECT parent_id FROM unnest(children)),
                   ARRAY(SELECT parent_state FROM unnest(children)),
                   coalesce(children, '{}'))
    $$
    """,
]

DOWNGRADE = [
    "DROP FUNCTION IF EXISTS {schema}.settle_dependents(bigint, text, bigint[])",
    "DROP FUNCTION IF EXISTS {schema}.settle_dependents(bigint[], text[], bigint[])",
    "DROP TABLE IF EXISTS {schema}.periodic",
    "DROP TABLE IF EXISTS {schema}.queue_starts",
    "DROP VIEW IF EXISTS {schema}.queue_limits",
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

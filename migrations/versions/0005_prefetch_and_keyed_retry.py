"""Prefetched jobs that spend no attempt; retries that never collide with a unique key.

Revision ID: pgjobs_0005
Revises: pgjobs_0004
Create Date: 2026-12-04

A job a worker claimed ahead of its free slots (``--prefetch``) is ``running`` with
``started_at`` NULL until the worker starts it: only then is its attempt spent, so a
worker that dies with a full buffer costs those jobs nothing. The running-job check no
longer asks for ``started_at``; it is validated without blocking writes (NOT VALID, then
VALIDATE), and every row that passed the old check passes the new one.

``retry_jobs`` makes jobs runnable again. A job whose unique key is held only while it is
live enters the unique index when it is retried, and a producer may be inserting the same
key at that moment (committed or not yet): each such job is retried in its own
subtransaction, in key order (the order every enqueue takes keys in), and a collision
leaves it as it is instead of failing the batch. The caller retries at most a few dozen
keyed jobs per call, so a transaction never holds more subtransactions than PostgreSQL
caches per backend.
"""

from __future__ import annotations

from alembic import op

from pgjobs.migrations import ddl

revision = "pgjobs_0005"
down_revision = "pgjobs_0004"
branch_labels = None
depends_on = None

_LIVE = "('scheduled', 'available', 'running', 'retryable', 'pending')"

_RETRY_SET = """
        SET state = 'available',
            run_at = pg_catalog.now(),
            finished_at = NULL,
            max_attempts = greatest(j.max_attempts, j.attempts + 1),
            errors = j.errors || pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                'attempt', j.attempts,
                'at', pg_catalog.now(),
                'type', 'Retried',
                'message', 'retried by an operator from state ' || j.state::text,
                'traceback', NULL,
                'worker', NULL,
                'operator', operator))
"""

UPGRADE = [
    "ALTER TABLE {schema}.jobs DROP CONSTRAINT jobs_running_has_worker",
    """
    ALTER TABLE {schema}.jobs ADD CONSTRAINT jobs_running_has_worker
        CHECK (state <> 'running' OR worker IS NOT NULL) NOT VALID
    """,
    "ALTER TABLE {schema}.jobs VALIDATE CONSTRAINT jobs_running_has_worker",
    # Retry jobs in one of `states`: runnable now, attempts and errors kept, one more
    # attempt if they used all of theirs. Returns the jobs retried. Rows are locked in id
    # order first (as every batch over jobs does); then the jobs whose key cannot collide
    # (none, or a period key, which the index holds in every state) are retried at once,
    # and the live-scope keyed ones one by one in key order.
    """
    CREATE FUNCTION {schema}.retry_jobs(ids bigint[], states text[], operator text)
    RETURNS TABLE (id bigint, queue text)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        keyed record;
    BEGIN
        PERFORM 1
        FROM {schema}.jobs AS j
        WHERE j.id = ANY (ids) AND j.state::text = ANY (states)
        ORDER BY j.id
        FOR NO KEY UPDATE;

        RETURN QUERY
        UPDATE {schema}.jobs AS j
        """
    + _RETRY_SET
    + """
        WHERE j.id = ANY (ids) AND j.state::text = ANY (states)
          AND (j.unique_key IS NULL OR j.unique_until IS NOT NULL)
        RETURNING j.id, j.queue;

        FOR keyed IN
            SELECT j.id
            FROM {schema}.jobs AS j
            WHERE j.id = ANY (ids) AND j.state::text = ANY (states)
              AND j.unique_key IS NOT NULL AND j.unique_until IS NULL
            ORDER BY j.unique_key, j.id
        LOOP
            BEGIN
                -- A committed live job with the key: left alone. One being inserted
                -- right now: the unique index waits for it, then raises if it committed.
                RETURN QUERY
                UPDATE {schema}.jobs AS j
                """
    + _RETRY_SET
    + f"""
                WHERE j.id = keyed.id
                  AND NOT EXISTS (
                      SELECT 1 FROM {{schema}}.jobs AS live
                      WHERE live.unique_key = j.unique_key AND live.id <> j.id
                        AND live.state IN {_LIVE})
                RETURNING j.id, j.queue;
            EXCEPTION WHEN unique_violation THEN
                NULL;
            END;
        END LOOP;
    END
    $$
    """,
]

DOWNGRADE = [
    "DROP FUNCTION IF EXISTS {schema}.retry_jobs(bigint[], text[], text)",
    "UPDATE {schema}.jobs SET started_at = now() WHERE state = 'running' AND started_at IS NULL",
    "ALTER TABLE {schema}.jobs DROP CONSTRAINT jobs_running_has_worker",
    """
    ALTER TABLE {schema}.jobs ADD CONSTRAINT jobs_running_has_worker
        CHECK (state <> 'running' OR (worker IS NOT NULL AND started_at IS NOT NULL))
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(ddl(statement))


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(ddl(statement))

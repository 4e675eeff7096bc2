"""A column that lets the jobs table be partitioned by when its finished jobs may go.

Revision ID: pgjobs_0006
Revises: pgjobs_0005
Create Date: 2026-12-08

``kept_until`` is 9999-12-31 00:00 UTC for every job of a plain jobs table (a time every
client can read in every time zone, which ``'infinity'`` is not). ``pgjobs migrate
partition`` turns the table into one partitioned by this column (see
``pgjobs/partitioning.py``): today's table becomes the partition ``jobs_current`` (every
job whose ``kept_until`` is 9999-12-31), and the retention pass moves finished jobs into
the partition of the day their retention ends, which it drops once that day is over.

A unique index on a partitioned table must hold the partition key, so the unique-key
index becomes ``(unique_key, kept_until)`` for the jobs not archived only: the same rows
and the same rule as before on a plain table. ``retry_jobs`` brings a job back into
the current partition. The new CHECK is validated without blocking writes.
"""

from __future__ import annotations

import importlib

from pgjobs.migrations import execute

revision = "pgjobs_0006"
down_revision = "pgjobs_0005"
branch_labels = None
depends_on = None

_0005 = importlib.import_module("pgjobs.migrations.versions.0005_prefetch_and_keyed_retry")
_LIVE = _0005._LIVE
_RETRY_FUNCTION = _0005.UPGRADE[-1].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
_HOLDER = "WHERE live.unique_key = j.unique_key AND live.id <> j.id"
assert _0005._RETRY_SET in _RETRY_FUNCTION and _HOLDER in _RETRY_FUNCTION


def _unique_index(columns: str, current_only: str) -> str:
    return f"""
    CREATE UNIQUE INDEX jobs_unique_key_idx ON {{schema}}.jobs ({columns})
        WHERE unique_key IS NOT NULL{current_only}
          AND (state IN {_LIVE} OR unique_until IS NOT NULL)
    """


UPGRADE = [
    """
    ALTER TABLE {schema}.jobs
        ADD COLUMN kept_until timestamptz NOT NULL DEFAULT '9999-12-31 00:00+00',
        ADD CONSTRAINT jobs_kept_until_finished
            CHECK (kept_until = '9999-12-31 00:00+00' OR finished_at IS NOT NULL) NOT VALID
    """,
    "ALTER TABLE {schema}.jobs VALIDATE CONSTRAINT jobs_kept_until_finished",
    """
    COMMENT ON COLUMN {schema}.jobs.kept_until IS
        '9999-12-31 unless a partitioned jobs table archived this finished job: then the day '
        'partition holding it is dropped once kept_until has passed'
    """,
    "DROP INDEX {schema}.jobs_unique_key_idx",
    _unique_index("unique_key, kept_until", "\n          AND kept_until = '9999-12-31 00:00+00'"),
    # Live jobs are never archived: the look-up of a live holder of the key stays in the
    # current partition (and its unique index).
    _RETRY_FUNCTION.replace(
        _0005._RETRY_SET,
        _0005._RETRY_SET.rstrip() + ",\n            kept_until = '9999-12-31 00:00+00'\n",
    ).replace(_HOLDER, _HOLDER + " AND live.kept_until = '9999-12-31 00:00+00'"),
]

DOWNGRADE = [
    # An archived job cannot come back into a plain table's unique index as it was: undo
    # the partitioning first (pgjobs migrate partition --undo).
    """
    DO $$
    BEGIN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_partitioned_table
                   WHERE partrelid = '{schema}.jobs'::regclass) THEN
            RAISE EXCEPTION 'the jobs table is partitioned: run pgjobs migrate partition --undo '
                            'before downgrading below pgjobs_0006';
        END IF;
    END
    $$
    """,
    _RETRY_FUNCTION,
    "DROP INDEX {schema}.jobs_unique_key_idx",
    _unique_index("unique_key", ""),
    "ALTER TABLE {schema}.jobs DROP COLUMN kept_until",
]


def upgrade() -> None:
    execute(UPGRADE)


def downgrade() -> None:
    execute(DOWNGRADE)

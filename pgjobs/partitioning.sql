-- The statements of a partitioned jobs table's retention pass (see partitioning.py); its
-- DDL, which names partitions, is composed there.


-- name: archive_batch
-- Move at most `limit` jobs that finished in state `state` out of jobs_current into the
-- day partition where their retention of `keep` seconds ends (the partitions exist:
-- the caller creates them first). Only jobs still within their retention: the expired
-- ones are deleted by prune_batch as in a plain table. A job holding its unique key for
-- a period stays until the period ends, since the unique index covers jobs_current
-- only. SKIP LOCKED: a job an operator is retrying right now is left for next time.
WITH moving AS MATERIALIZED (
    SELECT id
    FROM {schema}.jobs
    WHERE state = %(state)s::text::{schema}.job_state
      AND state IN ('succeeded', 'dead', 'cancelled')
      AND kept_until = '9999-12-31 00:00+00'
      AND finished_at >= now() - make_interval(secs => %(keep)s::float8)
      AND (unique_until IS NULL OR unique_until <= now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET kept_until = j.finished_at + make_interval(secs => %(keep)s::float8)
FROM moving
WHERE j.id = moving.id AND j.kept_until = '9999-12-31 00:00+00'
RETURNING j.id;

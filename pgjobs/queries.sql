-- Every statement pgjobs runs against its tables, in one place.
--
-- Each block starts with `-- name: <query>`. `{schema}` is replaced by the quoted schema
-- identifier (psycopg.sql.Identifier); values are always bound parameters (%(name)s).
-- Literal braces are doubled ({{}}) and literal percent signs too (%%).
--
-- States: scheduled (run_at in the future), available, running, retryable (waiting out a
-- backoff), pending (waiting for other jobs); final: succeeded, dead, cancelled.


-- name: insert_jobs
-- One statement for one job or fifty thousand: rows arrive as parallel arrays, are inserted
-- in input order (so ids ascend with the input), duplicates of a live unique_key are skipped
-- without an error, and one NOTIFY per queue is queued for delivery at the caller's commit.
-- The notification is skipped when the server's notification queue is filling up, so an
-- application's commit can never fail because of it; workers then find the job by polling.
WITH input AS (
    SELECT r.ord, r.queue, r.task, r.args::jsonb AS args, r.priority, r.max_attempts,
           coalesce(r.run_at, now() + make_interval(secs => r.delay)) AS run_at,
           r.unique_key, r.meta::jsonb AS meta
    FROM unnest(%(queue)s::text[], %(task)s::text[], %(args)s::text[], %(priority)s::int2[],
                %(max_attempts)s::int4[], %(run_at)s::timestamptz[], %(delay)s::float8[],
                %(unique_key)s::text[], %(meta)s::text[])
         WITH ORDINALITY AS r(queue, task, args, priority, max_attempts, run_at, delay,
                              unique_key, meta, ord)
),
inserted AS (
    INSERT INTO {schema}.jobs (queue, task, args, state, priority, max_attempts, run_at,
                               unique_key, meta)
    SELECT queue, task, args,
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END::{schema}.job_state,
           priority, max_attempts, run_at, unique_key, meta
    FROM input
    ORDER BY ord
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL
          AND state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
        DO NOTHING
    RETURNING id, queue, state, unique_key
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue, 'jobs', jobs)::text))
    FROM (SELECT queue, count(*) AS jobs FROM inserted
          WHERE state = 'available' GROUP BY queue) AS per_queue
    WHERE %(notify)s AND pg_notification_queue_usage() < %(notify_queue_limit)s
)
SELECT inserted.id, inserted.unique_key
FROM inserted CROSS JOIN notified
ORDER BY inserted.id;


-- name: find_live_unique
-- The live job holding each unique key (the one a duplicate enqueue resolves to).
SELECT unique_key, id
FROM {schema}.jobs
WHERE unique_key = ANY(%(keys)s::text[])
  AND state IN ('scheduled', 'available', 'running', 'retryable', 'pending');


-- name: get_job
SELECT id, queue, task, args, state, priority, attempts, max_attempts, run_at, created_at,
       started_at, finished_at, worker, lease_token, errors, result, progress, unique_key, meta
FROM {schema}.jobs
WHERE id = %(id)s;

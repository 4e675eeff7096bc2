-- Every statement pgjobs' operator tools run (pgjobs.admin, pgjobs.doctor, the CLI).
--
-- Same format as queries.sql: each block starts with `-- name: <query>`, `{schema}` is the
-- quoted schema identifier, values are bound (%(name)s, %(name)b for binary arrays),
-- literal percent signs are doubled (%%). Names are unique across both files.
--
-- Rules: writes to several rows lock them in id order first (two operators, or an operator
-- and a worker's batch, cannot deadlock); deletes go in bounded batches (the caller loops);
-- a running job is never touched here: its worker holds the lease.


-- ===== jobs =====


-- name: list_jobs
-- Newest first. A NULL filter matches everything; the primary key walked backwards stops
-- after `limit` matches.
SELECT id, queue, task, state, priority, attempts, max_attempts, run_at, created_at,
       started_at, finished_at, worker, unique_key,
       errors -> -1 ->> 'type' AS last_error_type,
       errors -> -1 ->> 'message' AS last_error
FROM {schema}.jobs
WHERE (%(state)s::text IS NULL OR state = %(state)s::text::{schema}.job_state)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY id DESC
LIMIT %(limit)s;


-- name: cancel_job
-- Cancel one job that has not finished: it becomes `cancelled` with an error entry naming
-- the operator action. A running job's lease is revoked in the same update, so whatever
-- its worker writes afterwards changes nothing (fencing), and that worker is told on the
-- control channel to stop the job (it also finds out by itself within a poll interval:
-- it checks its leases). The row is locked first, so a worker claiming or finishing it
-- at the same moment either goes first (and this sees its result) or waits and then
-- finds the job cancelled. Returns the state the job was in, and whether it was
-- cancelled; no row: no such job.
WITH target AS MATERIALIZED (
    SELECT id, state, worker
    FROM {schema}.jobs
    WHERE id = %(id)s
    FOR NO KEY UPDATE
),
cancelled AS (
    UPDATE {schema}.jobs AS j
    SET state = 'cancelled',
        finished_at = now(),
        lease_token = NULL,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts,
            'at', now(),
            'type', 'Cancelled',
            'message', %(message)s::text,
            'traceback', NULL,
            'worker', CASE WHEN target.state = 'running' THEN j.worker END,
            'operator', %(operator)s::text))
    FROM target
    WHERE j.id = target.id
      AND j.state IN ('scheduled', 'available', 'retryable', 'pending', 'running')
    RETURNING j.id, j.queue, j.task, j.attempts, j.worker, target.state AS previous,
              j.dependents
),
-- The jobs waiting for this one: dead, cancelled or released, per their on_parent_failure.
settled AS (
    SELECT coalesce(sum({schema}.settle_dependents(c.id, 'cancelled', c.dependents)), 0)
               AS released
    FROM cancelled AS c
    WHERE c.dependents IS NOT NULL
),
told AS (
    SELECT count(pg_notify(%(control_channel)s,
                           json_build_object('cancel', json_build_array(c.id),
                                             'worker', c.worker)::text)) AS n
    FROM cancelled AS c
    WHERE c.previous = 'running'
),
published AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events)) AS n
    FROM (SELECT json_agg(json_build_array(c.id, c.queue, c.task, 'cancelled', c.attempts))
                 AS events
          FROM cancelled AS c
          HAVING count(*) > 0) AS e
)
SELECT target.state::text AS previous_state,
       EXISTS (SELECT 1 FROM cancelled) AS cancelled
FROM target CROSS JOIN told CROSS JOIN published CROSS JOIN settled;


-- name: job_states
-- The current state of each of these jobs (to explain why some were not changed).
SELECT id, state::text AS state, unique_key
FROM {schema}.jobs
WHERE id = ANY(%(ids)b::bigint[])
ORDER BY id;


-- name: retry_jobs
-- Make these jobs runnable now (the function retry_jobs, migration 0005): those in one
-- of `states` become `available`, keep their attempts and error history, and get one more
-- attempt if they used all of theirs (max_attempts raised to attempts + 1), so a retry
-- always runs the job once more. A job whose unique_key is held by another live job, or
-- by one a producer is inserting at this moment, is left as it is (a retry must not make
-- a duplicate), and of several retried jobs sharing a key only the oldest is retried.
-- One NOTIFY per queue wakes the workers, as enqueue does, unless the server's
-- notification queue is filling up (the fallback poll finds them then).
WITH retried AS (
    SELECT r.id, r.queue
    FROM {schema}.retry_jobs(%(ids)b::bigint[], %(states)b::text[], %(operator)s::text) AS r
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue)::text))
    FROM (SELECT DISTINCT queue FROM retried) AS per_queue
    WHERE pg_notification_queue_usage() < %(notify_queue_limit)s
)
SELECT retried.id
FROM retried CROSS JOIN notified
ORDER BY retried.id;


-- name: keyed_jobs
-- Which of these jobs hold a unique key only while live (retry_jobs takes those one by
-- one, each in a subtransaction, so the caller sends them a few dozen at a time).
SELECT id FROM {schema}.jobs
WHERE id = ANY(%(ids)b::bigint[]) AND unique_key IS NOT NULL AND unique_until IS NULL;


-- ===== dead-letter queue =====


-- name: list_dead
-- The dead-letter queue, newest death first (jobs_finished_idx).
SELECT id, queue, task, args, attempts, max_attempts, last_error_type, last_error,
       created_at, finished_at, worker, unique_key
FROM {schema}.dead_jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY finished_at DESC, id DESC
LIMIT %(limit)s;


-- name: dead_ids_batch
-- The next batch of dead job ids after `after`, in id order (retry --all / --task walks
-- the dead-letter queue with this, one bounded batch per statement).
SELECT id
FROM {schema}.jobs
WHERE state = 'dead'
  AND id > %(after)s
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY id
LIMIT %(limit)s;


-- name: delete_dead
-- Delete these jobs if they are dead (rows locked in id order first). Returns the ids
-- deleted.
WITH doomed AS MATERIALIZED (
    SELECT id
    FROM {schema}.jobs
    WHERE id = ANY(%(ids)b::bigint[]) AND state = 'dead'
    ORDER BY id
    FOR UPDATE
)
DELETE FROM {schema}.jobs AS j
USING doomed
WHERE j.id = doomed.id AND j.state = 'dead'
RETURNING j.id;


-- name: try_prune_lock
-- Taken by a worker's retention pass for the length of its transaction: one worker at a
-- time prunes a schema, and a worker that dies lets go of it with its transaction.
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s));


-- name: prune_batch
-- Delete at most `limit` jobs in final state `state` that finished more than
-- `older_than` seconds ago; the caller repeats until fewer come back. finished_at is
-- set exactly for final states (CHECK jobs_finished_iff_final), so this can never reach a
-- live job. SKIP LOCKED: a row an operator is retrying right now is left for next time.
-- A job whose unique key is held for a period (unique_until) is kept until the period
-- ends: deleting it would free the key early and let a duplicate in. Jobs a partitioned
-- table archived (kept_until set) go with their partition instead (partitioning.sql).
WITH doomed AS MATERIALIZED (
    SELECT id
    FROM {schema}.jobs
    WHERE state = %(state)s::text::{schema}.job_state
      AND state IN ('succeeded', 'dead', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(older_than)s::float8)
      AND (unique_until IS NULL OR unique_until <= now())
      AND kept_until = '9999-12-31 00:00+00'
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.jobs AS j
USING doomed
WHERE j.id = doomed.id
RETURNING j.id;


-- ===== queues, stats, workers =====


-- name: queue_stats
SELECT *
FROM {schema}.queue_stats
ORDER BY queue;


-- name: worker_stats
-- `timeout` seconds of silence make a worker not alive (the view reads the setting).
SELECT worker, host, pid, queues, concurrency, started_at, uptime, jobs_succeeded,
       jobs_failed, current_jobs, last_heartbeat, heartbeat_age,
       last_heartbeat >= now() - make_interval(secs => %(timeout)s::float8) AS alive
FROM {schema}.worker_stats
ORDER BY host, pid, worker;


-- name: throughput
SELECT minute, queue, succeeded, failed
FROM {schema}.throughput_per_minute
ORDER BY minute, queue;


-- name: set_paused
-- Pause or resume a queue (creating its row on first use). paused_at keeps the moment of
-- the first pause while the queue stays paused.
INSERT INTO {schema}.queues AS q (name, paused, paused_at)
VALUES (%(name)s, %(paused)s, CASE WHEN %(paused)s THEN now() END)
ON CONFLICT (name) DO UPDATE
SET paused = excluded.paused,
    paused_at = CASE WHEN excluded.paused THEN coalesce(q.paused_at, now()) END
RETURNING name, paused, paused_at, dead_alert_threshold;


-- name: set_queue_limits
-- Set a queue's global limits (NULL: no such limit), creating its row on first use.
-- Workers read them at every limited claim (see claim_limited in queries.sql).
INSERT INTO {schema}.queues AS q (name, concurrency_limit, rate_limit, rate_period,
                                  limit_per_key)
VALUES (%(name)s, %(concurrency_limit)s, %(rate_limit)s, %(rate_period)s, %(limit_per_key)s)
ON CONFLICT (name) DO UPDATE
SET concurrency_limit = excluded.concurrency_limit,
    rate_limit = excluded.rate_limit,
    rate_period = excluded.rate_period,
    limit_per_key = excluded.limit_per_key
RETURNING name, paused, concurrency_limit, rate_limit, rate_period, limit_per_key;


-- name: wake_queue
-- After a resume: tell idle workers the queue has work (they would otherwise find it at
-- their next fallback poll). The same payload and notification-queue guard as enqueue.
SELECT pg_notify(%(channel)s, json_build_object('queue', %(name)s::text)::text)
FROM (SELECT count(*) AS n FROM {schema}.jobs
      WHERE queue = %(name)s AND state IN ('available', 'scheduled', 'retryable')
        AND run_at <= now()) AS runnable
WHERE n > 0 AND pg_notification_queue_usage() < %(notify_queue_limit)s;


-- name: list_queues
-- Every queue that has jobs or settings, with its settings and depth.
SELECT s.queue AS name, s.paused, q.paused_at, q.dead_alert_threshold,
       q.concurrency_limit, q.rate_limit, q.rate_period, coalesce(q.limit_per_key, false)
           AS limit_per_key,
       s.scheduled + s.available + s.retryable + s.pending AS waiting,
       s.running, s.dead
FROM {schema}.queue_stats AS s
LEFT JOIN {schema}.queues AS q ON q.name = s.queue
ORDER BY s.queue;


-- ===== doctor =====


-- name: doctor_transactions
-- Sessions of this database holding a transaction open (they hold back vacuum: dead rows
-- of the jobs table cannot be removed while an older snapshot might still see them).
SELECT pid, usename::text AS usename, application_name, state,
       extract(epoch FROM now() - xact_start)::float8 AS xact_seconds,
       age(backend_xmin) AS xmin_age,
       left(regexp_replace(query, '\s+', ' ', 'g'), 120) AS query
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND xact_start IS NOT NULL
  AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
ORDER BY xact_start
LIMIT 5;


-- name: doctor_table_stats
SELECT n_live_tup, n_dead_tup, last_vacuum, last_autovacuum, last_analyze, last_autoanalyze,
       vacuum_count, autovacuum_count
FROM pg_stat_user_tables
WHERE relid = %(table)s::regclass;


-- name: doctor_notification_queue
SELECT pg_notification_queue_usage()::float8 AS usage;


-- name: doctor_orphaned_jobs
-- Running jobs whose worker has been silent longer than `timeout` seconds, or whose
-- worker row is gone (jobs_running_idx).
SELECT j.id, j.queue, j.task, j.worker,
       extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age,
       w.id IS NULL AS worker_missing
FROM {schema}.jobs AS j
LEFT JOIN {schema}.workers AS w ON w.id = j.worker
WHERE j.state = 'running'
  AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %(timeout)s::float8))
ORDER BY j.id
LIMIT 100;


-- name: doctor_live_workers
SELECT count(*) AS workers
FROM {schema}.workers
WHERE last_heartbeat >= now() - make_interval(secs => %(timeout)s::float8);


-- name: doctor_unserved_queues
-- Queues with a job runnable now, not paused, that no live worker serves. Per queue the
-- runnable job count comes from jobs_runnable_idx.
SELECT r.queue, count(*) AS runnable
FROM {schema}.jobs AS r
WHERE r.state IN ('available', 'scheduled', 'retryable')
  AND r.run_at <= now()
  AND r.attempts < r.max_attempts
  AND NOT EXISTS (SELECT 1 FROM {schema}.queues AS q WHERE q.name = r.queue AND q.paused)
  AND NOT EXISTS (
      SELECT 1 FROM {schema}.workers AS w
      WHERE r.queue = ANY(w.queues)
        AND w.last_heartbeat >= now() - make_interval(secs => %(timeout)s::float8))
GROUP BY r.queue
ORDER BY r.queue;


-- ===== dead-letter alert =====


-- name: set_dead_alert
-- Set (or, with NULL, remove) a queue's dead-letter alert threshold; a new threshold
-- re-arms the alert (it fires again if the count is at or above it).
INSERT INTO {schema}.queues AS q (name, dead_alert_threshold)
VALUES (%(name)s, %(threshold)s)
ON CONFLICT (name) DO UPDATE
SET dead_alert_threshold = excluded.dead_alert_threshold,
    dead_alerted_at = NULL
RETURNING name, paused, paused_at, dead_alert_threshold, dead_alerted_at;


-- name: try_dead_alert_lock
-- One worker at a time checks the dead-letter thresholds of a schema (transaction lock).
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s));


-- name: dead_alerts
-- Queues whose dead count reached their threshold and were not alerted yet: mark them
-- alerted and return them (the caller logs, sends the event and calls the hooks).
-- Queues alerted before whose count fell below the threshold (or lost it) are re-armed,
-- so an alert fires once per crossing. Only queues with a threshold or an alert are read;
-- their dead jobs are counted through jobs_finished_idx (state, finished_at).
WITH watched AS MATERIALIZED (
    SELECT q.name, q.dead_alert_threshold AS threshold, q.dead_alerted_at AS alerted_at
    FROM {schema}.queues AS q
    WHERE q.dead_alert_threshold IS NOT NULL OR q.dead_alerted_at IS NOT NULL
    FOR NO KEY UPDATE OF q
),
counts AS MATERIALIZED (
    SELECT w.name, w.threshold, w.alerted_at,
           (SELECT count(*) FROM {schema}.jobs AS j
            WHERE j.state = 'dead' AND j.queue = w.name) AS dead
    FROM watched AS w
),
fired AS (
    UPDATE {schema}.queues AS q
    SET dead_alerted_at = now()
    FROM counts AS c
    WHERE q.name = c.name AND c.threshold IS NOT NULL AND c.dead >= c.threshold
      AND c.alerted_at IS NULL
    RETURNING q.name, c.dead, c.threshold
),
rearmed AS (
    UPDATE {schema}.queues AS q
    SET dead_alerted_at = NULL
    FROM counts AS c
    WHERE q.name = c.name AND c.alerted_at IS NOT NULL
      AND (c.threshold IS NULL OR c.dead < c.threshold)
    RETURNING q.name
),
notified AS (
    SELECT count(pg_notify(%(events_channel)s, json_build_object(
               'kind', 'dead_alert', 'at', extract(epoch FROM now()), 'queue', f.name,
               'dead', f.dead, 'threshold', f.threshold)::text)) AS n
    FROM fired AS f
)
SELECT f.name, f.dead, f.threshold
FROM fired AS f CROSS JOIN notified CROSS JOIN (SELECT count(*) FROM rearmed) AS r
ORDER BY f.name;

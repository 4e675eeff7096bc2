-- Every statement pgjobs runs against its tables, in one place.
--
-- Each block starts with `-- name: <query>`. `{schema}` is replaced by the quoted schema
-- identifier (psycopg.sql.Identifier); values are always bound parameters (%(name)s).
-- Literal braces are doubled ({{}}) and literal percent signs too (%%).
--
-- States: scheduled (run_at in the future), available, running, retryable (waiting out a
-- backoff), pending (waiting for other jobs); final: succeeded, dead, cancelled.


-- name: insert_jobs
-- One statement for one job or fifty thousand: rows arrive as parallel arrays (sent in
-- binary, so no per-element escaping), are inserted in input order (so ids ascend with the
-- input), duplicates of a live unique_key are skipped without an error, and one NOTIFY per
-- queue is queued for delivery at the caller's commit.
-- The notification is skipped when the server's notification queue is filling up, so an
-- application's commit can never fail because of it; workers then find the job by polling.
WITH input AS (
    SELECT r.ord, r.queue, r.task, r.args::jsonb AS args, r.priority, r.max_attempts,
           coalesce(r.run_at, now() + make_interval(secs => r.delay)) AS run_at,
           r.unique_key, r.meta::jsonb AS meta
    FROM unnest(%(queue)b::text[], %(task)b::text[], %(args)b::text[], %(priority)b::int2[],
                %(max_attempts)b::int4[], %(run_at)b::timestamptz[], %(delay)b::float8[],
                %(unique_key)b::text[], %(meta)b::text[])
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
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, queue, task, state, unique_key
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue, 'jobs', jobs)::text))
    FROM (SELECT queue, count(*) AS jobs FROM inserted
          WHERE state = 'available' GROUP BY queue) AS per_queue
    WHERE %(notify)s AND pg_notification_queue_usage() < %(notify_queue_limit)s
),
published AS (
    -- Opt-in enqueued events (App(enqueue_events=True)): one notification listing the new
    -- jobs (never their args); a resync hint when the list is too long for one.
    SELECT count({schema}.publish_events(%(events_channel)s, e.events))
    FROM (SELECT json_agg(json_build_array(i.id, i.queue, i.task, 'enqueued', 0)
                          ORDER BY i.id) AS events
          FROM inserted AS i
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT inserted.id, inserted.unique_key
FROM inserted CROSS JOIN notified CROSS JOIN published
ORDER BY inserted.id;


-- name: insert_job
-- insert_jobs for exactly one job (the common single enqueue): scalar parameters instead
-- of arrays, no unnest and no grouping, otherwise the same: a duplicate of a live
-- unique_key is skipped (no row back), and one NOTIFY is queued for a job that is
-- runnable now, unless the notification queue is filling up.
WITH inserted AS (
    INSERT INTO {schema}.jobs (queue, task, args, state, priority, max_attempts, run_at,
                               unique_key, meta)
    SELECT %(queue)s::text, %(task)s::text, %(args)s::jsonb,
           CASE WHEN r.run_at > now() THEN 'scheduled' ELSE 'available' END::{schema}.job_state,
           %(priority)s::int2, %(max_attempts)s::int4, r.run_at, %(unique_key)s::text,
           %(meta)s::jsonb
    FROM (SELECT coalesce(%(run_at)s::timestamptz,
                          now() + make_interval(secs => %(delay)s::float8)) AS run_at) AS r
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, queue, task, state
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue, 'jobs', 1)::text))
    FROM inserted
    WHERE state = 'available' AND %(notify)s
      AND pg_notification_queue_usage() < %(notify_queue_limit)s
),
published AS (
    -- Opt-in enqueued events (App(enqueue_events=True)): one notification listing the new
    -- jobs (never their args); a resync hint when the list is too long for one.
    SELECT count({schema}.publish_events(%(events_channel)s, e.events))
    FROM (SELECT json_agg(json_build_array(i.id, i.queue, i.task, 'enqueued', 0)
                          ORDER BY i.id) AS events
          FROM inserted AS i
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT inserted.id
FROM inserted CROSS JOIN notified CROSS JOIN published;


-- name: find_live_unique
-- The live job holding each unique key (the one a duplicate enqueue resolves to).
SELECT unique_key, id
FROM {schema}.jobs
WHERE unique_key = ANY(%(keys)b::text[])
  AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
       OR unique_until IS NOT NULL);


-- name: get_job
SELECT id, queue, task, args, state, priority, attempts, max_attempts, run_at, created_at,
       started_at, finished_at, worker, lease_token, errors, result, progress, unique_key, meta
FROM {schema}.jobs
WHERE id = %(id)s;


-- ===== worker =====
-- Statements of `pgjobs work`. Every write to a job a worker holds is conditioned on the
-- job's lease_token (fencing): a worker that lost its lease (paused past its heartbeat
-- timeout, rescued, handed back) changes nothing. Workers never send wake-ups; they publish
-- events only while an events subscriber is connected (see events_subscribed).


-- name: claim_jobs
-- Claim up to %(limit)s runnable jobs of the given queues in one statement. Each queue is
-- read through its own LATERAL scan of jobs_runnable_idx (queue, priority, run_at, id), so
-- no backlog is ever sorted. The locking SELECT sits in a MATERIALIZED CTE: the planner
-- cannot re-run the LIMITed, SKIP LOCKED subquery and claim more rows than asked (a rescan
-- would skip the rows it just locked and return others). FOR NO KEY UPDATE does not
-- conflict with the FOR KEY SHARE locks of foreign keys pointing at a job. Rows a LATERAL
-- scan locked beyond the outer LIMIT are released when the statement ends.
-- The worker runs this as a generic prepared plan (no planning per claim, see worker_db),
-- so the plan must be right whatever the parameters: the UPDATE reaches the claimed rows
-- through `id = ANY (ARRAY(...))`, an index lookup on the primary key per id, never a join
-- the planner might size from a guessed row count.
-- Paused queues are not claimed from, nor waited for. A claim that comes back short also
-- says when the next waiting job of these queues comes due, so an idle worker needs no second statement for it: one extra row with a NULL id
-- and, in next_due, the seconds (by the database clock) until the earliest scheduled or
-- retryable job is runnable (zero or less: due already; NULL: none waits). One index probe
-- per queue (jobs_waiting_idx); the jobs this statement claims are left out (its snapshot
-- still shows them waiting).
WITH served AS MATERIALIZED (
    -- The requested queues less the paused ones (pgjobs queues pause NAME).
    SELECT q.name
    FROM unnest(%(queues)b::text[]) AS q(name)
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.queues AS p WHERE p.name = q.name AND p.paused)
),
candidates AS MATERIALIZED (
    SELECT c.id
    FROM served AS q
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs AS j
        WHERE j.queue = q.name
          AND j.state IN ('available', 'scheduled', 'retryable')
          AND j.run_at <= now()
          AND j.attempts < j.max_attempts
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
),
claimed AS (
    UPDATE {schema}.jobs AS j
    SET state = 'running',
        attempts = j.attempts + 1,
        worker = %(worker)s,
        lease_token = gen_random_uuid(),
        started_at = now()
    WHERE j.id = ANY (ARRAY(SELECT id FROM candidates))
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.run_at, j.attempts,
              j.max_attempts, j.lease_token
),
-- Events (opt-in, see events.py): only while a subscriber is connected does the worker
-- pass events = true; then ONE notification lists the started jobs (never their args).
notified AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events)) AS n
    FROM (SELECT json_agg(json_build_array(c.id, c.queue, c.task, 'started', c.attempts))
                 AS events
          FROM claimed AS c
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT id, queue, task, args, priority, run_at, attempts, max_attempts, lease_token,
       NULL::float8 AS next_due
FROM claimed CROSS JOIN notified
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT extract(epoch FROM min(w.run_at) - now())::float8
        FROM served AS q
        CROSS JOIN LATERAL (
            SELECT j.run_at
            FROM {schema}.jobs AS j
            WHERE j.queue = q.name AND j.state IN ('scheduled', 'retryable')
              AND j.attempts < j.max_attempts
              AND j.id NOT IN (SELECT id FROM candidates)
            ORDER BY j.run_at
            LIMIT 1
        ) AS w)
WHERE (SELECT count(*) FROM claimed) < %(limit)s;


-- name: finish_jobs
-- Write the outcomes of a batch of attempts in one statement: succeeded (with result),
-- retryable/scheduled/available (with a delay), dead, cancelled. `refund` gives an attempt
-- back (snooze, hand-back on shutdown). Rows are locked in id order first, so two batches
-- over overlapping jobs (a zombie and the job's new holder) cannot deadlock. The worker's
-- counters are bumped in the same statement.
WITH outcome AS (
    SELECT *
    FROM unnest(%(id)b::bigint[], %(lease_token)b::uuid[], %(state)b::text[],
                %(result)b::text[], %(delay)b::float8[], %(error)b::text[], %(refund)b::int4[])
         AS o(id, lease_token, state, result, delay, error, refund)
),
locked AS MATERIALIZED (
    SELECT j.id
    FROM {schema}.jobs AS j
    JOIN outcome AS o ON o.id = j.id AND o.lease_token = j.lease_token
    WHERE j.state = 'running'
    ORDER BY j.id
    FOR NO KEY UPDATE OF j
),
finished AS (
    UPDATE {schema}.jobs AS j
    SET state = o.state::{schema}.job_state,
        result = CASE WHEN o.state = 'succeeded' THEN o.result::jsonb ELSE j.result END,
        run_at = CASE WHEN o.delay IS NULL THEN j.run_at
                      ELSE now() + make_interval(secs => o.delay) END,
        errors = CASE WHEN o.error IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(
                               o.error::jsonb || jsonb_build_object('at', now())) END,
        attempts = j.attempts - o.refund,
        finished_at = CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled') THEN now() END,
        lease_token = NULL
    FROM outcome AS o
    JOIN locked ON locked.id = o.id
    WHERE j.id = o.id AND j.lease_token = o.lease_token AND j.state = 'running'
    RETURNING j.id, o.state, j.queue, j.task, j.attempts + o.refund AS attempt,
              CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled') THEN o.state
                   WHEN o.error IS NULL AND o.refund > 0 THEN 'snoozed'
                   ELSE 'retried' END AS kind,
              -- An attempt that failed (error recorded, job retried or dead); a job
              -- handed back on shutdown or cancelled did not fail.
              (o.error IS NOT NULL AND o.state IN ('retryable', 'dead')) AS failed
),
counted AS (
    UPDATE {schema}.workers
    SET jobs_succeeded = jobs_succeeded
                         + (SELECT count(*) FROM finished WHERE state = 'succeeded'),
        jobs_failed = jobs_failed
                      + (SELECT count(*) FROM finished WHERE state IN ('retryable', 'dead'))
    WHERE id = %(worker)s AND EXISTS (SELECT 1 FROM finished)
),
-- Events (opt-in, as in claim_jobs): one notification per batch listing ids and kinds; a
-- failed attempt is a `failed` event followed by its `retried` or `dead`.
notified AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events)) AS n
    FROM (SELECT json_agg(ev.item ORDER BY ev.id, ev.seq) AS events
          FROM (SELECT f.id, 0 AS seq,
                       json_build_array(f.id, f.queue, f.task, 'failed', f.attempt) AS item
                FROM finished AS f WHERE f.failed
                UNION ALL
                SELECT f.id, 1, json_build_array(f.id, f.queue, f.task, f.kind, f.attempt)
                FROM finished AS f) AS ev
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT id FROM finished CROSS JOIN notified;


-- name: set_progress
-- A running job reports progress; fenced like every other write. While an events
-- subscriber is connected (events = true) one progress event is published with it.
WITH updated AS (
    UPDATE {schema}.jobs
    SET progress = %(progress)s::jsonb
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'running'
    RETURNING id, queue, task, attempts, progress
),
notified AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events)) AS n
    FROM (SELECT json_agg(json_build_array(u.id, u.queue, u.task, 'progress', u.attempts,
                                           u.progress)) AS events
          FROM updated AS u
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT id FROM updated CROSS JOIN notified;


-- name: held_leases
-- Which of these (job, lease) pairs this worker still holds.
SELECT j.id
FROM {schema}.jobs AS j
JOIN unnest(%(id)b::bigint[], %(lease_token)b::uuid[]) AS h(id, lease_token)
  ON h.id = j.id AND h.lease_token = j.lease_token
WHERE j.id = ANY (%(id)b::bigint[]) AND j.state = 'running';


-- name: queues_busy
-- True while these queues have a job that is runnable now (in a queue that is not paused)
-- or running (--burst exits when false).
SELECT EXISTS (
           SELECT 1
           FROM unnest(%(queues)b::text[]) AS q(name)
           CROSS JOIN LATERAL (
               SELECT 1 FROM {schema}.jobs AS j
               WHERE j.queue = q.name
                 AND j.state IN ('available', 'scheduled', 'retryable')
                 AND j.run_at <= now()
                 AND j.attempts < j.max_attempts
               LIMIT 1
           ) AS r
           WHERE NOT EXISTS (SELECT 1 FROM {schema}.queues AS p
                             WHERE p.name = q.name AND p.paused)
       )
       OR EXISTS (
           SELECT 1 FROM {schema}.jobs
           WHERE state = 'running' AND queue = ANY(%(queues)b::text[])
       );


-- name: register_worker
INSERT INTO {schema}.workers (id, host, pid, queues, concurrency, meta)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, %(meta)s::jsonb)
ON CONFLICT (id) DO UPDATE SET last_heartbeat = now();


-- name: heartbeat
-- No row back means this worker was declared dead (its jobs were rescued): it registers
-- again and checks which leases it still holds.
UPDATE {schema}.workers
SET last_heartbeat = now()
WHERE id = %(id)s
RETURNING id;


-- name: deregister_worker
DELETE FROM {schema}.workers WHERE id = %(id)s;


-- name: rescue_jobs
-- Return the running jobs of workers whose heartbeat expired (or whose row is gone) to
-- `available`, counting the lost attempt; a job out of attempts goes `dead` with a
-- "worker died" error, so a job that kills its worker every time ends in the dead-letter
-- queue. Expired worker rows are deleted in the same statement. SKIP LOCKED throughout:
-- live workers running this at the same time split the work instead of waiting on each
-- other, and a worker heartbeating right now (row locked) is never declared dead.
WITH expired AS MATERIALIZED (
    SELECT w.id
    FROM {schema}.workers AS w
    WHERE w.last_heartbeat < now() - make_interval(secs => %(timeout)s)
    ORDER BY w.id
    FOR UPDATE SKIP LOCKED
),
orphans AS MATERIALIZED (
    SELECT j.id
    FROM {schema}.jobs AS j
    WHERE j.state = 'running'
      AND (j.worker IN (SELECT id FROM expired)
           OR NOT EXISTS (SELECT 1 FROM {schema}.workers AS w WHERE w.id = j.worker))
    ORDER BY j.id
    FOR NO KEY UPDATE OF j SKIP LOCKED
),
rescued AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead'
                     ELSE 'available' END::{schema}.job_state,
        run_at = now(),
        lease_token = NULL,
        finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts,
            'at', now(),
            'type', 'WorkerDied',
            'message', format('worker %%s died (no heartbeat for %%s s) while running the job',
                              j.worker, %(timeout)s),
            'traceback', NULL,
            'worker', j.worker))
    FROM orphans
    WHERE j.id = orphans.id AND j.state = 'running'
    RETURNING j.id, j.state
),
deleted AS (
    DELETE FROM {schema}.workers AS w
    USING expired
    WHERE w.id = expired.id
    RETURNING w.id
)
SELECT (SELECT count(*) FROM rescued WHERE state = 'available') AS available,
       (SELECT count(*) FROM rescued WHERE state = 'dead') AS dead,
       (SELECT count(*) FROM deleted) AS workers;


-- name: events_subscribed
-- Whether an events subscriber (pgjobs.events) of this schema is connected: the worker
-- publishes events only while one is (checked every heartbeat).
SELECT EXISTS (SELECT 1 FROM pg_stat_activity
              WHERE application_name = %(application_name)s
                AND datname = current_database());

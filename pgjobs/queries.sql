-- Every statement pgjobs runs against its tables, in one place.
--
-- Each block starts with `-- name: <query>`. `{schema}` is replaced by the quoted schema
-- identifier (psycopg.sql.Identifier); values are always bound parameters (%(name)s).
-- Literal braces are doubled ({{}}) and literal percent signs too (%%).
-- `{and_current_j}` / `{and_current}` are empty, or, for the workers of a partitioned jobs
-- table, ` AND j.kept_until = '9999-12-31 00:00+00'` (without `j.`): the statement then
-- reads the partition jobs_current alone (partitioning.py). On a plain table the
-- condition is true of every row, but the planner, before the table's first ANALYZE,
-- guesses it keeps one row in 200 and trades the primary-key probes of finish_jobs for a
-- scan of every running row; so a plain table's statements do without it.
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
-- unique_until (a key held for a period, in every state) and limit_key are NULL unless
-- asked for. Jobs with dependencies go through insert_dependent_jobs instead.
-- Ids are drawn in input order (the CTE is materialized so that its nextval runs in scan
-- order), but rows are inserted in unique_key order: two batches whose keys overlap then
-- wait for each other's keys in one global order, and cannot deadlock.
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('{schema}.jobs', 'id'))::regclass) AS id,
           r.ord, r.queue, r.task, r.args::jsonb AS args, r.priority, r.max_attempts,
           coalesce(r.run_at, now() + make_interval(secs => r.delay)) AS run_at,
           r.unique_key, r.unique_until, r.limit_key, r.meta::jsonb AS meta
    FROM unnest(%(queue)b::text[], %(task)b::text[], %(args)b::text[], %(priority)b::int2[],
                %(max_attempts)b::int4[], %(run_at)b::timestamptz[], %(delay)b::float8[],
                %(unique_key)b::text[], %(unique_until)b::timestamptz[],
                %(limit_key)b::text[], %(meta)b::text[])
         WITH ORDINALITY AS r(queue, task, args, priority, max_attempts, run_at, delay,
                              unique_key, unique_until, limit_key, meta, ord)
),
inserted AS (
    INSERT INTO {schema}.jobs (id, queue, task, args, state, priority, max_attempts, run_at,
                               unique_key, unique_until, limit_key, meta)
    SELECT id, queue, task, args,
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END::{schema}.job_state,
           priority, max_attempts, run_at, unique_key, unique_until, limit_key, meta
    FROM input
    ORDER BY unique_key, ord
    ON CONFLICT (unique_key, kept_until)
        WHERE unique_key IS NOT NULL AND kept_until = '9999-12-31 00:00+00'
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, queue, task, state, unique_key
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue)::text))
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS per_queue
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
                               unique_key, unique_until, limit_key, meta)
    SELECT %(queue)s::text, %(task)s::text, %(args)s::jsonb,
           CASE WHEN r.run_at > now() THEN 'scheduled' ELSE 'available' END::{schema}.job_state,
           %(priority)s::int2, %(max_attempts)s::int4, r.run_at, %(unique_key)s::text,
           %(unique_until)s::timestamptz, %(limit_key)s::text, %(meta)s::jsonb
    FROM (SELECT coalesce(%(run_at)s::timestamptz,
                          now() + make_interval(secs => %(delay)s::float8)) AS run_at) AS r
    ON CONFLICT (unique_key, kept_until)
        WHERE unique_key IS NOT NULL AND kept_until = '9999-12-31 00:00+00'
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, queue, task, state
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue)::text))
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


-- name: insert_dependent_jobs
-- insert_jobs for jobs that depend on others (depends_on: a bigint[] literal per job, NULL
-- for a job without parents). Race-free under READ COMMITTED:
-- * The parents are locked first, in id order (two enqueues sharing parents cannot
--   deadlock), and FOR NO KEY UPDATE returns each parent's newest version: a parent that a
--   worker finished while this waited for its lock is seen finished.
-- * A child waits (`pending`, waiting_for) for the parents not finished yet; it is runnable
--   at once when all of them succeeded, and dead or cancelled at once (per its
--   on_parent_failure, with an error entry naming the parent) when one already failed;
--   with 'run' it waits only for the parents not final.
-- * Each parent a new child waits for gets the child's id appended to its `dependents` in
--   this statement, while its lock is held. A worker finishing that parent reads
--   `dependents` from its own UPDATE ... RETURNING, which re-reads the newest version once
--   this transaction commits: the child is settled whichever commits first.
-- A parent id that does not exist (or is not visible yet: its enqueue has not committed)
-- writes nothing at all and comes back in `missing` (one extra row with a NULL id), so
-- the caller gets an error and its transaction stays usable.
-- Ids and the insert order are those of insert_jobs: ids in input order, rows in
-- unique_key order (after the parents' locks, taken in id order).
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('{schema}.jobs', 'id'))::regclass) AS id,
           r.ord, r.queue, r.task, r.args::jsonb AS args, r.priority, r.max_attempts,
           coalesce(r.run_at, now() + make_interval(secs => r.delay)) AS run_at,
           r.unique_key, r.unique_until, r.limit_key, r.meta::jsonb AS meta,
           r.depends_on::bigint[] AS depends_on, r.on_parent_failure
    FROM unnest(%(queue)b::text[], %(task)b::text[], %(args)b::text[], %(priority)b::int2[],
                %(max_attempts)b::int4[], %(run_at)b::timestamptz[], %(delay)b::float8[],
                %(unique_key)b::text[], %(unique_until)b::timestamptz[],
                %(limit_key)b::text[], %(meta)b::text[], %(depends_on)b::text[],
                %(on_parent_failure)b::text[])
         WITH ORDINALITY AS r(queue, task, args, priority, max_attempts, run_at, delay,
                              unique_key, unique_until, limit_key, meta, depends_on,
                              on_parent_failure, ord)
),
parents AS MATERIALIZED (
    SELECT j.id, j.state::text AS state
    FROM {schema}.jobs AS j
    WHERE j.id IN (SELECT unnest(i.depends_on) FROM input AS i)
    ORDER BY j.id
    FOR NO KEY UPDATE OF j
),
missing AS MATERIALIZED (
    SELECT ARRAY(SELECT DISTINCT p.id
                 FROM input AS i CROSS JOIN LATERAL unnest(i.depends_on) AS p(id)
                 WHERE p.id NOT IN (SELECT id FROM parents)
                 ORDER BY p.id) AS ids
),
planned AS (
    SELECT i.*,
           ARRAY(SELECT p.id FROM parents AS p
                 WHERE p.id = ANY (i.depends_on)
                   AND p.state NOT IN ('succeeded', 'dead', 'cancelled')
                 ORDER BY p.id) AS waiting_for,
           f.id AS failed_parent, f.state AS failed_state
    FROM input AS i
    LEFT JOIN LATERAL (
        SELECT p.id, p.state
        FROM parents AS p
        WHERE p.id = ANY (i.depends_on) AND p.state IN ('dead', 'cancelled')
          AND i.on_parent_failure <> 'run'
        ORDER BY p.id
        LIMIT 1
    ) AS f ON true
),
inserted AS (
    INSERT INTO {schema}.jobs (id, queue, task, args, state, priority, max_attempts, run_at,
                               unique_key, unique_until, limit_key, meta, depends_on,
                               waiting_for, on_parent_failure, finished_at, errors)
    SELECT id, queue, task, args,
           CASE WHEN failed_parent IS NOT NULL
                    THEN CASE WHEN on_parent_failure = 'cancel' THEN 'cancelled' ELSE 'dead' END
                WHEN cardinality(waiting_for) > 0 THEN 'pending'
                WHEN run_at > now() THEN 'scheduled'
                ELSE 'available' END::{schema}.job_state,
           priority, max_attempts, run_at, unique_key, unique_until, limit_key, meta,
           depends_on,
           CASE WHEN depends_on IS NOT NULL THEN waiting_for END,
           CASE WHEN depends_on IS NOT NULL THEN on_parent_failure END,
           CASE WHEN failed_parent IS NOT NULL THEN now() END,
           CASE WHEN failed_parent IS NULL THEN '[]'::jsonb
                ELSE jsonb_build_array(jsonb_build_object(
                    'attempt', 0,
                    'at', now(),
                    'type', 'ParentFailed',
                    'message', 'parent job ' || failed_parent || ' ended ' || failed_state,
                    'parent', failed_parent,
                    'parent_state', failed_state,
                    'traceback', NULL,
                    'worker', NULL)) END
    FROM planned
    WHERE (SELECT cardinality(ids) FROM missing) = 0
    ORDER BY unique_key, ord
    ON CONFLICT (unique_key, kept_until)
        WHERE unique_key IS NOT NULL AND kept_until = '9999-12-31 00:00+00'
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, queue, task, state, unique_key, waiting_for
),
linked AS (
    -- Only the parents a child waits for need to know it: the others have finished.
    UPDATE {schema}.jobs AS j
    SET dependents = coalesce(j.dependents, '{{}}') || l.children
    FROM (SELECT w.parent, array_agg(i.id ORDER BY i.id) AS children
          FROM inserted AS i
          CROSS JOIN LATERAL unnest(i.waiting_for) AS w(parent)
          GROUP BY w.parent) AS l
    WHERE j.id = l.parent
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue)::text))
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS per_queue
    WHERE %(notify)s AND pg_notification_queue_usage() < %(notify_queue_limit)s
),
published AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events))
    FROM (SELECT json_agg(json_build_array(i.id, i.queue, i.task, 'enqueued', 0)
                          ORDER BY i.id) AS events
          FROM inserted AS i
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT inserted.id, inserted.unique_key, NULL::bigint[] AS missing
FROM inserted CROSS JOIN notified CROSS JOIN published
UNION ALL
SELECT NULL, NULL, m.ids FROM missing AS m WHERE cardinality(m.ids) > 0
ORDER BY 1;


-- name: find_live_unique
-- The live job holding each unique key (the one a duplicate enqueue resolves to).
SELECT unique_key, id
FROM {schema}.jobs
WHERE unique_key = ANY(%(keys)b::text[]) AND kept_until = '9999-12-31 00:00+00'
  AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
       OR unique_until IS NOT NULL);


-- name: get_job
SELECT id, queue, task, args, state, priority, attempts, max_attempts, run_at, created_at,
       started_at, finished_at, worker, lease_token, errors, result, progress, unique_key, meta,
       unique_until, limit_key, depends_on, waiting_for, dependents, on_parent_failure
FROM {schema}.jobs
WHERE id = %(id)s;


-- name: parent_results
-- The parents of a job with their states and results (JobContext.parent_results).
SELECT p.id, p.state::text AS state, p.result
FROM {schema}.jobs AS c
JOIN {schema}.jobs AS p ON p.id = ANY (c.depends_on)
WHERE c.id = %(id)s
ORDER BY p.id;


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
-- Paused queues are not claimed from, nor waited for; nor are queues with a concurrency or
-- rate limit, which only claim_limited claims from. A claim that comes back short also
-- says when the next waiting job of these queues comes due, so an idle worker needs no second statement for it: one extra row with a NULL id
-- and, in next_due, the seconds (by the database clock) until the earliest scheduled or
-- retryable job is runnable (zero or less: due already; NULL: none waits). One index probe
-- per queue (jobs_waiting_idx); the jobs this statement claims are left out (its snapshot
-- still shows them waiting).
WITH served AS MATERIALIZED (
    -- The requested queues less the paused (pgjobs queues pause NAME) and limited ones.
    SELECT q.name
    FROM unnest(%(queues)b::text[]) AS q(name)
    WHERE NOT EXISTS (
        SELECT 1 FROM {schema}.queues AS p
        WHERE p.name = q.name
          AND (p.paused OR p.concurrency_limit IS NOT NULL OR p.rate_limit IS NOT NULL))
),
candidates AS MATERIALIZED (
    SELECT c.id, c.priority, c.run_at
    FROM served AS q
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs AS j
        WHERE j.queue = q.name
          AND j.state IN ('available', 'scheduled', 'retryable')
          AND j.run_at <= now()
          AND j.attempts < j.max_attempts
         {and_current_j}
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
),
starting AS MATERIALIZED (
    -- The first %(start)s claimed jobs start at once (the worker's free slots); the others
    -- wait in its prefetch buffer: running, but not started and no attempt spent. Read
    -- only when the worker prefetches (start < limit): otherwise every claimed job starts.
    SELECT id FROM candidates ORDER BY priority, run_at, id LIMIT %(start)s
),
claimed AS (
    UPDATE {schema}.jobs AS j
    SET state = 'running',
        attempts = j.attempts
                   + CASE WHEN %(start)s::int >= %(limit)s::int
                            OR j.id = ANY (ARRAY(SELECT id FROM starting)) THEN 1 ELSE 0 END,
        worker = %(worker)s,
        lease_token = gen_random_uuid(),
        started_at = CASE WHEN %(start)s::int >= %(limit)s::int
                                OR j.id = ANY (ARRAY(SELECT id FROM starting)) THEN now() END
    WHERE j.id = ANY (ARRAY(SELECT id FROM candidates)){and_current_j}
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.run_at, j.attempts,
              j.max_attempts, j.lease_token, j.started_at IS NOT NULL AS started
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
       started, NULL::float8 AS next_due
FROM claimed CROSS JOIN notified
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT extract(epoch FROM min(w.run_at) - now())::float8
        FROM served AS q
        CROSS JOIN LATERAL (
            SELECT j.run_at
            FROM {schema}.jobs AS j
            WHERE j.queue = q.name AND j.state IN ('scheduled', 'retryable')
              AND j.attempts < j.max_attempts{and_current_j}
              AND j.id NOT IN (SELECT id FROM candidates)
            ORDER BY j.run_at
            LIMIT 1
        ) AS w)
WHERE (SELECT count(*) FROM claimed) < %(limit)s;


-- name: limited_queues
-- Which of these queues have a concurrency or rate limit (the worker claims from them with
-- claim_limited; it asks again every poll interval, and claim_jobs never claims from them
-- whatever the worker believes).
SELECT name
FROM {schema}.queues
WHERE name = ANY(%(queues)b::text[])
  AND (concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL);


-- name: lock_limited_queues
-- First statement of a limited claim's transaction: lock the rows of the served queues
-- that have limits, in name order. Claimers of one limited queue take turns from here to
-- their commit, and claim_limited, the next statement, takes a new snapshot: it counts the
-- running jobs and recent starts that the previous claimer committed. (In one statement
-- the count would come from a snapshot taken before the lock was granted.)
SELECT name
FROM {schema}.queues
WHERE name = ANY(%(queues)b::text[]) AND NOT paused
  AND (concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL)
ORDER BY name
FOR NO KEY UPDATE;


-- name: claim_limited
-- claim_jobs for queues with limits, run after lock_limited_queues in one transaction.
-- A queue's limits apply to the whole queue or, with limit_per_key, to each limit_key of
-- it (a "partition"): at most concurrency_limit running jobs, at most rate_limit starts
-- within the last rate_period (a sliding window over queue_starts, which records every
-- start in a rate-limited queue). Jobs over a limit are simply not claimed: they wait.
-- Full partitions are left out of the scan, at most %(scan)s runnable jobs are read per
-- queue, each partition takes as many as it has room for, and %(limit)s are claimed in
-- priority, run_at, id order. A short claim ends with the usual next_due row: the
-- earliest of the next waiting job of these queues and the moment a full rate window
-- frees a start.
-- Times are statement_timestamp(), not now(): the transaction began before it waited for
-- the queue's lock, and a start must be recorded at the moment it happens.
WITH limits AS MATERIALIZED (
    SELECT q.name, q.concurrency_limit, q.rate_limit, q.rate_period, q.limit_per_key
    FROM {schema}.queues AS q
    WHERE q.name = ANY(%(queues)b::text[]) AND NOT q.paused
      AND (q.concurrency_limit IS NOT NULL OR q.rate_limit IS NOT NULL)
),
running AS MATERIALIZED (
    SELECT l.name AS queue, CASE WHEN l.limit_per_key THEN j.limit_key END AS part,
           count(*) AS n
    FROM limits AS l
    JOIN {schema}.jobs AS j ON j.queue = l.name AND j.state = 'running'{and_current_j}
    WHERE l.concurrency_limit IS NOT NULL
    GROUP BY 1, 2
),
started AS MATERIALIZED (
    SELECT l.name AS queue, CASE WHEN l.limit_per_key THEN s.limit_key END AS part,
           count(*) AS n, min(s.started_at) AS oldest
    FROM limits AS l
    JOIN {schema}.queue_starts AS s
      ON s.queue = l.name AND s.started_at > statement_timestamp() - l.rate_period
    WHERE l.rate_limit IS NOT NULL
    GROUP BY 1, 2
),
-- Room left in every partition that has running jobs or recent starts (others have the
-- whole limit). least() skips NULLs: a missing limit does not bound.
room AS MATERIALIZED (
    SELECT p.queue, p.part,
           least(l.concurrency_limit - coalesce(
                     (SELECT r.n FROM running AS r
                      WHERE r.queue = p.queue AND r.part IS NOT DISTINCT FROM p.part), 0),
                 l.rate_limit - coalesce(
                     (SELECT s.n FROM started AS s
                      WHERE s.queue = p.queue AND s.part IS NOT DISTINCT FROM p.part), 0))
               AS room
    FROM (SELECT queue, part FROM running UNION SELECT queue, part FROM started) AS p
    JOIN limits AS l ON l.name = p.queue
),
candidates AS MATERIALIZED (
    SELECT c.id, c.queue, c.part, c.priority, c.run_at
    FROM limits AS l
    CROSS JOIN LATERAL (
        SELECT j.id, j.queue, j.priority, j.run_at,
               CASE WHEN l.limit_per_key THEN j.limit_key END AS part
        FROM {schema}.jobs AS j
        WHERE j.queue = l.name
          AND j.state IN ('available', 'scheduled', 'retryable')
          AND j.run_at <= statement_timestamp()
          AND j.attempts < j.max_attempts{and_current_j}
          AND NOT (l.limit_per_key AND EXISTS (
              SELECT 1 FROM room AS f
              WHERE f.queue = l.name AND f.room <= 0
                AND f.part IS NOT DISTINCT FROM j.limit_key))
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(scan)s
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) AS c
    -- A queue limited as a whole and full: not scanned at all.
    WHERE l.limit_per_key
       OR NOT EXISTS (SELECT 1 FROM room AS f WHERE f.queue = l.name AND f.room <= 0)
),
chosen AS MATERIALIZED (
    SELECT ranked.id, ranked.priority, ranked.run_at
    FROM (SELECT c.*, row_number() OVER (PARTITION BY c.queue, c.part
                                         ORDER BY c.priority, c.run_at, c.id) AS rn
          FROM candidates AS c) AS ranked
    JOIN limits AS l ON l.name = ranked.queue
    WHERE ranked.rn <= coalesce(
        (SELECT f.room FROM room AS f
         WHERE f.queue = ranked.queue AND f.part IS NOT DISTINCT FROM ranked.part),
        least(l.concurrency_limit, l.rate_limit))
    ORDER BY ranked.priority, ranked.run_at, ranked.id
    LIMIT %(limit)s
),
starting AS MATERIALIZED (
    -- As in claim_jobs: jobs beyond the free slots wait in the prefetch buffer unstarted
    -- (they count as running and, in a rate-limited queue, as started).
    SELECT id FROM chosen ORDER BY priority, run_at, id LIMIT %(start)s
),
claimed AS (
    UPDATE {schema}.jobs AS j
    SET state = 'running',
        attempts = j.attempts
                   + CASE WHEN %(start)s::int >= %(limit)s::int
                            OR j.id = ANY (ARRAY(SELECT id FROM starting)) THEN 1 ELSE 0 END,
        worker = %(worker)s,
        lease_token = gen_random_uuid(),
        started_at = CASE WHEN %(start)s::int >= %(limit)s::int
                                OR j.id = ANY (ARRAY(SELECT id FROM starting))
                          THEN statement_timestamp() END
    WHERE j.id = ANY (ARRAY(SELECT id FROM chosen)){and_current_j}
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.run_at, j.attempts,
              j.max_attempts, j.lease_token, j.limit_key, j.started_at IS NOT NULL AS started
),
logged AS (
    INSERT INTO {schema}.queue_starts (queue, limit_key, started_at)
    SELECT c.queue, c.limit_key, statement_timestamp()
    FROM claimed AS c
    JOIN limits AS l ON l.name = c.queue
    WHERE l.rate_limit IS NOT NULL
),
expired AS (
    -- Starts that left every window; the claimer holds the queue's lock, so this is cheap
    -- and keeps queue_starts at about one window of rows.
    DELETE FROM {schema}.queue_starts AS s
    USING limits AS l
    WHERE s.queue = l.name
      AND (l.rate_period IS NULL OR s.started_at <= statement_timestamp() - l.rate_period)
),
notified AS (
    SELECT count({schema}.publish_events(%(events_channel)s, e.events)) AS n
    FROM (SELECT json_agg(json_build_array(c.id, c.queue, c.task, 'started', c.attempts))
                 AS events
          FROM claimed AS c
          HAVING count(*) > 0) AS e
    WHERE %(events)s
)
SELECT id, queue, task, args, priority, run_at, attempts, max_attempts, lease_token,
       started, NULL::float8 AS next_due
FROM claimed CROSS JOIN notified
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       extract(epoch FROM least(
           (SELECT min(w.run_at)
            FROM limits AS q
            CROSS JOIN LATERAL (
                SELECT j.run_at
                FROM {schema}.jobs AS j
                WHERE j.queue = q.name AND j.state IN ('scheduled', 'retryable')
                  AND j.attempts < j.max_attempts{and_current_j}
                  AND j.id NOT IN (SELECT id FROM candidates)
                ORDER BY j.run_at
                LIMIT 1
            ) AS w),
           (SELECT min(s.oldest + l.rate_period)
            FROM started AS s
            JOIN limits AS l ON l.name = s.queue
            WHERE s.n >= l.rate_limit)) - statement_timestamp())::float8
WHERE (SELECT count(*) FROM claimed) < %(limit)s;


-- name: start_jobs
-- The worker starts jobs from its prefetch buffer: each spends its attempt now, before its
-- handler runs (a job that kills its worker still reaches max_attempts and dead).
-- Idempotent, so a write whose answer was lost can be sent again; fenced by the lease (a
-- job cancelled or rescued meanwhile is not returned, and the worker drops it). Ids come
-- sorted, so rows are locked in id order, as in finish_jobs.
UPDATE {schema}.jobs AS j
SET attempts = j.attempts + CASE WHEN j.started_at IS NULL THEN 1 ELSE 0 END,
    started_at = coalesce(j.started_at, now())
FROM unnest(%(id)b::bigint[], %(lease_token)b::uuid[]) AS s(id, lease_token)
WHERE j.id = s.id AND j.lease_token = s.lease_token AND j.state = 'running'{and_current_j}
RETURNING j.id, j.attempts;


-- name: finish_jobs
-- Write the outcomes of a batch of attempts in one statement: succeeded (with result),
-- retryable/scheduled/available (with a delay), dead, cancelled. `refund` gives an attempt
-- back (snooze, hand-back on shutdown). The worker sends a batch in id order and each row
-- is reached through the primary key, so rows are locked in id order and two batches over
-- the same jobs (a zombie and the job's new holder) cannot deadlock; no scan of running
-- jobs, whose dead index entries grow with every job since the last vacuum. The worker's
-- counters are bumped in the same statement.
-- Dependencies: a job that reached a final state settles the jobs waiting for it
-- (settle_dependents, migration 0003). Its `dependents` come from the UPDATE's RETURNING:
-- the newest row version, so a child whose enqueue committed while this statement waited
-- for the row lock is included (see insert_dependent_jobs). Jobs without dependents skip
-- the function call entirely. Every row returned carries `released`: how many children
-- became runnable now (the worker then claims again at once).
WITH outcome AS (
    -- result, delay, error and refund may be shorter than id (trailing NULLs left off:
    -- a batch of plain successes sends them empty), and unnest pads them with NULLs.
    SELECT o.id, o.lease_token, o.state, o.result, o.delay, o.error,
           coalesce(o.refund, 0) AS refund
    FROM unnest(%(id)b::bigint[], %(lease_token)b::uuid[], %(state)b::text[],
                %(result)b::text[], %(delay)b::float8[], %(error)b::text[], %(refund)b::int4[])
         AS o(id, lease_token, state, result, delay, error, refund)
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
        -- A job handed back from a prefetch buffer never spent an attempt.
        attempts = j.attempts - CASE WHEN j.started_at IS NULL THEN 0 ELSE o.refund END,
        finished_at = CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled') THEN now() END,
        lease_token = NULL
    FROM outcome AS o
    WHERE j.id = o.id AND j.lease_token = o.lease_token AND j.state = 'running'
     {and_current_j}
    RETURNING j.id, o.state, j.queue, j.task, j.attempts + o.refund AS attempt,
              CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled') THEN o.state
                   WHEN o.error IS NULL AND o.refund > 0 THEN 'snoozed'
                   ELSE 'retried' END AS kind,
              -- An attempt that failed (error recorded, job retried or dead); a job
              -- handed back on shutdown or cancelled did not fail.
              (o.error IS NOT NULL AND o.state IN ('retryable', 'dead')) AS failed,
              j.dependents
),
settled AS (
    -- One call per batch: the children of the whole batch are locked in id order.
    SELECT CASE WHEN count(*) > 0
                THEN {schema}.settle_dependents(array_agg(f.id), array_agg(f.state),
                                                array_agg(d.child))
                ELSE 0 END AS released
    FROM finished AS f
    CROSS JOIN LATERAL unnest(f.dependents) AS d(child)
    WHERE f.dependents IS NOT NULL AND f.state IN ('succeeded', 'dead', 'cancelled')
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
SELECT f.id, s.released, f.queue FROM finished AS f CROSS JOIN notified CROSS JOIN settled AS s;


-- name: set_progress
-- A running job reports progress; fenced like every other write. While an events
-- subscriber is connected (events = true) one progress event is published with it.
WITH updated AS (
    UPDATE {schema}.jobs
    SET progress = %(progress)s::jsonb
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'running'
      {and_current}
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
WHERE j.id = ANY (%(id)b::bigint[]) AND j.state = 'running'{and_current_j};


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
                 AND j.attempts < j.max_attempts{and_current_j}
               LIMIT 1
           ) AS r
           WHERE NOT EXISTS (SELECT 1 FROM {schema}.queues AS p
                             WHERE p.name = q.name AND p.paused)
       )
       OR EXISTS (
           SELECT 1 FROM {schema}.jobs
           WHERE state = 'running' AND queue = ANY(%(queues)b::text[])
             {and_current}
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
-- `available`, counting the lost attempt (a job still in the worker's prefetch buffer,
-- started_at NULL, spent none); a job out of attempts goes `dead` with a
-- "worker died" error, so a job that kills its worker every time ends in the dead-letter
-- queue. Expired worker rows are deleted in the same statement. SKIP LOCKED throughout:
-- live workers running this at the same time split the work instead of waiting on each
-- other, and a worker heartbeating right now (row locked) is never declared dead.
-- A job sent to dead settles the jobs waiting for it, as in finish_jobs.
-- A worker also passes its own id and every lease it holds (%(worker)s, %(held)s; NULL
-- and none otherwise) once it reconnected after losing its connections: after a failover
-- to a standby that had its claims but not all its outcomes, jobs it finished are
-- `running` under its id again, and nobody else would ever rescue them.
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
    WHERE j.state = 'running'{and_current_j}
      AND (j.worker IN (SELECT id FROM expired)
           OR NOT EXISTS (SELECT 1 FROM {schema}.workers AS w WHERE w.id = j.worker)
           OR (j.worker = %(worker)s::text
               AND j.lease_token <> ALL (%(held)s::uuid[])))
    ORDER BY j.id
    FOR NO KEY UPDATE OF j SKIP LOCKED
),
rescued AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE WHEN j.attempts >= j.max_attempts AND j.started_at IS NOT NULL
                     THEN 'dead' ELSE 'available' END::{schema}.job_state,
        run_at = now(),
        lease_token = NULL,
        finished_at = CASE WHEN j.attempts >= j.max_attempts AND j.started_at IS NOT NULL
                           THEN now() END,
        -- A job that waited in the dead worker's prefetch buffer never ran: it goes back
        -- as it was (its claim spent no attempt), with no error.
        errors = CASE WHEN j.started_at IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(jsonb_build_object(
                          'attempt', j.attempts,
                          'at', now(),
                          'type', 'WorkerDied',
                          'message', CASE WHEN j.worker = %(worker)s::text
                              THEN format('worker %%s no longer holds the job: its outcome '
                                          'was lost (a failover?)', j.worker)
                              ELSE format('worker %%s died (no heartbeat for %%s s) '
                                          'while running the job', j.worker, %(timeout)s)
                              END,
                          'traceback', NULL,
                          'worker', j.worker)) END
    FROM orphans
    WHERE j.id = orphans.id AND j.state = 'running'{and_current_j}
    RETURNING j.id, j.state, j.dependents
),
settled AS (
    SELECT CASE WHEN count(*) > 0
                THEN {schema}.settle_dependents(array_agg(r.id), array_agg(r.state::text),
                                                array_agg(d.child))
                ELSE 0 END AS released
    FROM rescued AS r
    CROSS JOIN LATERAL unnest(r.dependents) AS d(child)
    WHERE r.dependents IS NOT NULL AND r.state = 'dead'
),
deleted AS (
    DELETE FROM {schema}.workers AS w
    USING expired
    WHERE w.id = expired.id
    RETURNING w.id
)
SELECT (SELECT count(*) FROM rescued WHERE state = 'available') AS available,
       (SELECT count(*) FROM rescued WHERE state = 'dead') AS dead,
       (SELECT count(*) FROM deleted) AS workers
FROM settled;


-- name: events_subscribed
-- Whether an events subscriber (pgjobs.events) of this schema is connected: the worker
-- publishes events only while one is (checked every heartbeat).
SELECT EXISTS (SELECT 1 FROM pg_stat_activity
              WHERE application_name = %(application_name)s
                AND datname = current_database());


-- ===== periodic =====
-- Periodic (cron) jobs, written by the scheduler thread of every worker (pgjobs.cron).
-- One transaction per schedule and slot: periodic_lock, then (when the row is missing)
-- periodic_ensure and periodic_lock again, then periodic_enqueue, then COMMIT. The row lock
-- makes the workers take turns; last_slot, advanced in the same transaction as the jobs'
-- insert, makes each slot enqueued once.


-- name: periodic_ensure
-- The schedule's row, created on first sight; last_slot NULL until a worker holding the
-- row decides where the schedule starts. Nothing is inserted when the row exists: ON
-- CONFLICT alone would wait for a peer that has updated the row and not committed yet (a
-- frozen scheduler would stall every other one). Waiting remains only for a peer creating
-- the row at the same moment, and the scheduler's lock_timeout bounds it.
INSERT INTO {schema}.periodic (name, task, schedule, timezone)
SELECT %(name)s, %(task)s, %(schedule)s, %(timezone)s
WHERE NOT EXISTS (SELECT 1 FROM {schema}.periodic WHERE name = %(name)s)
ON CONFLICT (name) DO NOTHING;


-- name: periodic_lock
-- The schedule's row, locked for this transaction; no row when a peer holds it (it is
-- enqueueing the slot right now) or when it does not exist yet. The database clock, read
-- after the lock, is the one every worker judges due slots by.
SELECT task, schedule, timezone, last_slot, clock_timestamp() AS now
FROM {schema}.periodic
WHERE name = %(name)s
FOR UPDATE SKIP LOCKED;


-- name: periodic_enqueue
-- Enqueue the jobs of some slots (possibly none) and advance the schedule's row, in one
-- statement. Each job has the slot's unique key, held in every state (unique_until), so a
-- slot that comes round again is skipped; one NOTIFY for the queue is queued unless the
-- server's notification queue is filling up (as insert_jobs).
WITH input AS (
    SELECT s.slot, s.unique_key, s.unique_until, s.meta::jsonb AS meta, s.ord
    FROM unnest(%(slot)b::timestamptz[], %(unique_key)b::text[],
                %(unique_until)b::timestamptz[], %(meta)b::text[])
         WITH ORDINALITY AS s(slot, unique_key, unique_until, meta, ord)
),
inserted AS (
    INSERT INTO {schema}.jobs (queue, task, args, state, priority, max_attempts, run_at,
                               unique_key, unique_until, meta)
    SELECT %(queue)s::text, %(task)s::text, %(args)s::jsonb,
           CASE WHEN i.slot > clock_timestamp() THEN 'scheduled'
                ELSE 'available' END::{schema}.job_state,
           %(priority)s::int2, %(max_attempts)s::int4, i.slot, i.unique_key, i.unique_until,
           i.meta
    FROM input AS i
    ORDER BY i.ord
    ON CONFLICT (unique_key, kept_until)
        WHERE unique_key IS NOT NULL AND kept_until = '9999-12-31 00:00+00'
          AND (state IN ('scheduled', 'available', 'running', 'retryable', 'pending')
               OR unique_until IS NOT NULL)
        DO NOTHING
    RETURNING id, state
),
notified AS (
    SELECT count(pg_notify(%(channel)s, json_build_object('queue', %(queue)s::text)::text))
           AS sent
    FROM (SELECT count(*) AS jobs FROM inserted WHERE state = 'available') AS n
    WHERE n.jobs > 0 AND %(notify)s
      AND pg_notification_queue_usage() < %(notify_queue_limit)s
),
advanced AS (
    UPDATE {schema}.periodic AS p
    SET task = %(task)s, schedule = %(schedule)s, timezone = %(timezone)s,
        last_slot = %(last_slot)s,
        last_job_id = coalesce((SELECT max(id) FROM inserted), p.last_job_id),
        updated_at = now()
    WHERE p.name = %(name)s
    RETURNING p.name
)
SELECT (SELECT count(*) FROM inserted) AS enqueued,
       (SELECT count(*) FROM advanced) AS advanced
FROM notified;


-- name: periodic_list
-- The schedules the database knows (pgjobs cron list).
SELECT name, task, schedule, timezone, last_slot, last_job_id, updated_at
FROM {schema}.periodic
ORDER BY name;

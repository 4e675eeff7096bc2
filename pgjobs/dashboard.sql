-- The statements of the web dashboard (pgjobs.dashboard) that the operator API does not
-- already have. Same format as queries.sql and operations.sql: `-- name: <query>` blocks,
-- `{schema}` is the quoted schema identifier, values are bound, names unique across files.
--
-- Pages walk the primary key (keyset pagination): a page costs the same on the first page
-- and the thousandth, and rows enqueued meanwhile do not shift the pages.


-- name: dashboard_jobs_older
-- A page of jobs, newest first, with ids below `before` (NULL: from the newest). A NULL
-- filter matches everything. `limit` is one more than the page size: the extra row tells
-- whether an older page exists.
SELECT id, queue, task, state::text AS state, priority, attempts, max_attempts, run_at,
       created_at, started_at, finished_at, worker, progress,
       errors -> -1 ->> 'type' AS last_error_type,
       errors -> -1 ->> 'message' AS last_error
FROM {schema}.jobs
WHERE (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
  AND (%(state)s::text IS NULL OR state = %(state)s::text::{schema}.job_state)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY id DESC
LIMIT %(limit)s;


-- name: dashboard_jobs_newer
-- The page just above `after` (walking up from it), for a "newer" link; the caller
-- reverses it to show newest first.
SELECT id, queue, task, state::text AS state, priority, attempts, max_attempts, run_at,
       created_at, started_at, finished_at, worker, progress,
       errors -> -1 ->> 'type' AS last_error_type,
       errors -> -1 ->> 'message' AS last_error
FROM {schema}.jobs
WHERE id > %(after)s::bigint
  AND (%(state)s::text IS NULL OR state = %(state)s::text::{schema}.job_state)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY id
LIMIT %(limit)s;


-- name: dashboard_dead_page
-- A page of the dead-letter queue, newest job first, ids below `before` (NULL: from the
-- newest); through the dead_jobs view, so a role granted only the views can read it.
SELECT id, queue, task, attempts, max_attempts, last_error_type, last_error, created_at,
       finished_at, worker
FROM {schema}.dead_jobs
WHERE (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
ORDER BY id DESC
LIMIT %(limit)s;


-- name: dashboard_dead_tasks
-- Dead jobs per task, for the "retry all of this task" actions.
SELECT task, count(*) AS jobs, max(finished_at) AS latest
FROM {schema}.dead_jobs
GROUP BY task
ORDER BY count(*) DESC, task
LIMIT 100;


-- name: dashboard_queue_limits
-- The queues with global limits (pgjobs queues limit), for the overview.
SELECT queue, concurrency_limit, rate_limit, rate_period, limit_per_key
FROM {schema}.queue_limits;

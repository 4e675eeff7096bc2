"""SQLAlchemy definitions of pgjobs' tables, mirroring the Alembic migrations.

Applications can query jobs with SQLAlchemy (``select(pgjobs.schema.jobs)``) and keep these
tables out of their own autogenerate runs (``include_object``). For a schema other than
``pgjobs``, use ``execution_options(schema_translate_map={"pgjobs": "myschema"})``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Enum,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, INTERVAL, JSONB, UUID

from pgjobs.job import JobState
from pgjobs.settings import DEFAULT_SCHEMA


def _queue_name_rule(column: str) -> str:
    """The queue-name CHECK (migration pgjobs_0004): no bounded repetition in the regex,
    which would cost every UPDATE of the row about 3 us."""
    return f"octet_length({column}) <= 128 AND {column} ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]*$'"


metadata = MetaData(schema=DEFAULT_SCHEMA)

job_state = Enum(
    *[state.value for state in JobState],
    name="job_state",
    schema=DEFAULT_SCHEMA,
    metadata=metadata,
)

_LIVE = "state IN ('scheduled', 'available', 'running', 'retryable', 'pending')"

jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    Column("task", Text, nullable=False),
    Column("args", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", job_state, nullable=False, server_default=text("'available'")),
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("20")),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("worker", Text),
    Column("lease_token", UUID(as_uuid=True)),
    Column("errors", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("result", JSONB),
    Column("progress", JSONB),
    Column("unique_key", Text),
    Column("meta", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("unique_until", DateTime(timezone=True)),
    Column("limit_key", Text),
    Column("depends_on", ARRAY(BigInteger)),
    Column("waiting_for", ARRAY(BigInteger)),
    Column("dependents", ARRAY(BigInteger)),
    Column("on_parent_failure", Text),
    # 9999-12-31 00:00 UTC unless a partitioned jobs table archived this finished job (migration
    # pgjobs_0006, pgjobs/partitioning.py).
    Column(
        "kept_until",
        DateTime(timezone=True),
        nullable=False,
        server_default=text("'9999-12-31 00:00+00'"),
        comment="9999-12-31 unless a partitioned jobs table archived this finished job: then the "
        "day partition holding it is dropped once kept_until has passed",
    ),
    CheckConstraint(_queue_name_rule("queue"), name="jobs_queue_name"),
    CheckConstraint("length(task) BETWEEN 1 AND 255", name="jobs_task_name"),
    CheckConstraint("priority BETWEEN -100 AND 100", name="jobs_priority_range"),
    CheckConstraint(
        "attempts >= 0 AND max_attempts >= 1 AND attempts <= max_attempts",
        name="jobs_attempts_range",
    ),
    CheckConstraint(
        "(state = 'running') = (lease_token IS NOT NULL)", name="jobs_lease_only_while_running"
    ),
    CheckConstraint(
        "state <> 'running' OR worker IS NOT NULL",
        name="jobs_running_has_worker",
    ),
    CheckConstraint(
        "(state IN ('succeeded', 'dead', 'cancelled')) = (finished_at IS NOT NULL)",
        name="jobs_finished_iff_final",
    ),
    CheckConstraint("jsonb_typeof(args) = 'object'", name="jobs_args_object"),
    CheckConstraint("jsonb_typeof(meta) = 'object'", name="jobs_meta_object"),
    CheckConstraint("jsonb_typeof(errors) = 'array'", name="jobs_errors_array"),
    CheckConstraint(
        "on_parent_failure IN ('dead', 'cancel', 'run')", name="jobs_on_parent_failure"
    ),
    CheckConstraint(
        "state <> 'pending' OR cardinality(waiting_for) > 0", name="jobs_pending_waits"
    ),
    CheckConstraint("octet_length(limit_key) <= 1024", name="jobs_limit_key_length"),
    CheckConstraint(
        "kept_until = '9999-12-31 00:00+00' OR finished_at IS NOT NULL",
        name="jobs_kept_until_finished",
    ),
)

Index(
    "jobs_runnable_idx",
    jobs.c.queue,
    jobs.c.priority,
    jobs.c.run_at,
    jobs.c.id,
    postgresql_where=text("state IN ('available', 'scheduled', 'retryable')"),
)
Index(
    "jobs_waiting_idx",
    jobs.c.queue,
    jobs.c.run_at,
    postgresql_where=text("state IN ('scheduled', 'retryable')"),
)
Index(
    "jobs_unique_key_idx",
    jobs.c.unique_key,
    jobs.c.kept_until,
    unique=True,
    postgresql_where=text(
        "unique_key IS NOT NULL AND kept_until = '9999-12-31 00:00+00'"
        f" AND ({_LIVE} OR unique_until IS NOT NULL)"
    ),
)
Index(
    "jobs_running_idx",
    jobs.c.queue,
    jobs.c.limit_key,
    postgresql_where=text("state = 'running'"),
)
Index(
    "jobs_finished_idx",
    jobs.c.state,
    jobs.c.finished_at,
    postgresql_where=text("finished_at IS NOT NULL"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", ARRAY(Text), nullable=False),
    Column("concurrency", Integer, CheckConstraint("concurrency >= 1"), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("last_heartbeat", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("jobs_succeeded", BigInteger, nullable=False, server_default=text("0")),
    Column("jobs_failed", BigInteger, nullable=False, server_default=text("0")),
    Column("meta", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
)

queues = Table(
    "queues",
    metadata,
    Column("name", Text, primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("paused_at", DateTime(timezone=True)),
    Column("dead_alert_threshold", Integer),
    Column("dead_alerted_at", DateTime(timezone=True)),
    Column("meta", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("concurrency_limit", Integer),
    Column("rate_limit", Integer),
    Column("rate_period", INTERVAL),
    Column("limit_per_key", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint(_queue_name_rule("name"), name="queues_name"),
    CheckConstraint("paused = (paused_at IS NOT NULL)", name="queues_paused_at_iff_paused"),
    CheckConstraint(
        "dead_alert_threshold IS NULL OR dead_alert_threshold >= 1",
        name="queues_dead_alert_threshold_positive",
    ),
    CheckConstraint("jsonb_typeof(meta) = 'object'", name="queues_meta_object"),
    CheckConstraint(
        "concurrency_limit IS NULL OR concurrency_limit >= 1",
        name="queues_concurrency_limit_positive",
    ),
    CheckConstraint(
        "(rate_limit IS NULL) = (rate_period IS NULL)", name="queues_rate_limit_complete"
    ),
    CheckConstraint(
        "rate_limit IS NULL OR (rate_limit >= 1 AND rate_period > interval '0')",
        name="queues_rate_limit_positive",
    ),
)

queue_starts = Table(
    "queue_starts",
    metadata,
    Column("queue", Text, nullable=False),
    Column("limit_key", Text),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)
Index("queue_starts_window_idx", queue_starts.c.queue, queue_starts.c.started_at)

periodic = Table(
    "periodic",
    metadata,
    Column("name", Text, primary_key=True),
    Column("task", Text, nullable=False),
    Column("schedule", Text, nullable=False),
    Column("timezone", Text, nullable=False),
    Column("last_slot", DateTime(timezone=True)),
    Column("last_job_id", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

"""An opt-in partitioned jobs table: finished jobs in day partitions that retention drops.

``pgjobs migrate partition`` turns ``jobs`` into a table partitioned by range of
``kept_until`` (native declarative partitioning, no extension):

- ``jobs_current`` holds every job not archived (``kept_until`` 9999-12-31): all live
  jobs, and finished ones until retention archives them. It is the plain table of before,
  attached as it is (no rewrite), so every claim, outcome and enqueue reads and writes it
  alone (the hot statements name that ``kept_until``, which prunes the other partitions
  at plan time).
- ``jobs_until_YYYYMMDD`` holds finished jobs whose retention ends that day (UTC).

The retention pass (the worker's maintenance thread, one worker at a time) then does per
final state with a retention period: archive a batch of finished jobs into the partition
of the day their retention ends (``kept_until = finished_at + retention``), creating the
partitions it needs, and drop every partition whose day is over — one ``DROP TABLE``
instead of millions of deletes. Jobs that hold a unique key for a period stay in
``jobs_current`` until the period ends (the unique index covers that partition only), and
dead jobs stay there while dead retention is None (kept until handled). A job an operator
retries comes back into ``jobs_current`` (``retry_jobs`` resets ``kept_until``).

``pgjobs migrate partition --undo`` brings every archived job back and restores the plain
table.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row

from pgjobs.database import behind_pooler, connect, libpq_url
from pgjobs.errors import ConfigurationError, DatabaseError, SchemaNotReadyError, database_errors
from pgjobs.queries import KEPT, Queries

log = logging.getLogger("pgjobs.partitioning")

CURRENT = "jobs_current"
_DAY_PREFIX = "jobs_until_"
_DAY = re.compile(rf"^{_DAY_PREFIX}(\d{{8}})$")
# Changing the layout waits this long (seconds) for a table in use, by default: building
# an index concurrently waits for the transactions open on the table.
WAIT = 60.0
# It holds the jobs table's ACCESS EXCLUSIVE lock for a few catalog updates only, and
# waits at most this long for that lock rather than queue every claim behind it.
CONVERT_LOCK_TIMEOUT = 5.0
# Dropping a partition takes the parent's ACCESS EXCLUSIVE lock too: claims wait at most
# this long once a day, and a drop that cannot get the lock is tried again next pass.
DROP_LOCK_TIMEOUT = "1s"
# The bound CHECK that lets jobs_current be attached without a scan under the lock.
_BOUND = "jobs_current_bound"


_PARTITIONED = "SELECT 1 FROM pg_catalog.pg_partitioned_table WHERE partrelid = {}"


def is_partitioned(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether ``schema.jobs`` is a partitioned table."""
    return _one(conn, _PARTITIONED, schema, "jobs") is not None


async def is_partitioned_async(conn: psycopg.AsyncConnection[Any], schema: str) -> bool:
    """The async twin of :func:`is_partitioned`."""
    query = _PARTITIONED.replace("{}", "pg_catalog.to_regclass(%s)")
    cur = await conn.cursor(row_factory=tuple_row).execute(query, (_qualified(schema, "jobs"),))
    return await cur.fetchone() is not None


def day_partitions(conn: psycopg.Connection[Any], schema: str) -> dict[date, str]:
    """The day partitions of ``schema.jobs``: the day their jobs' retention ends, by name."""
    query = (
        "SELECT c.relname FROM pg_catalog.pg_inherits AS i"
        " JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = {}"
    )
    days = {}
    for (name,) in _rows(conn, query, schema):
        match = _DAY.match(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return days


def partition(url: str, schema: str, wait: float = WAIT) -> None:
    """Turn the plain jobs table of ``schema`` into a partitioned one (see the module).

    Long work happens before the lock, without blocking writes: a CHECK proving every row
    belongs in ``jobs_current`` is validated, and the unique index ``(id, kept_until)``
    the partitioned primary key needs is built concurrently. Then one short transaction
    renames the table to ``jobs_current``, creates the partitioned ``jobs`` over it
    (indexes, defaults, grants and the id sequence carried over) and repoints the views.
    Every step waits at most ``wait`` seconds for a lock, the short one at most
    CONVERT_LOCK_TIMEOUT; a conversion that gives up leaves the table as it was.
    """
    with _connection(url, wait) as conn:
        _require_plain(conn, schema)
        if not _has_constraint(conn, schema, _BOUND):
            _ddl(conn, schema, "ALTER TABLE {s}.jobs ADD CONSTRAINT {bound} "
                 "CHECK (kept_until = {kept}) NOT VALID", bound=_BOUND, kept=_KEPT)  # fmt: skip
        _ddl(conn, schema, "ALTER TABLE {s}.jobs VALIDATE CONSTRAINT {bound}", bound=_BOUND)
        if _invalid_index(conn, schema, "jobs_current_id_idx"):
            # A build cut off earlier leaves an invalid index: build it again.
            _ddl(conn, schema, "DROP INDEX {s}.jobs_current_id_idx")
        _ddl(conn, schema, "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS jobs_current_id_idx "
             "ON {s}.jobs (id, kept_until)")  # fmt: skip
        with conn.transaction():
            _convert(conn, schema, wait)
    log.info("the jobs table of schema %s is partitioned", schema)


def unpartition(url: str, schema: str, wait: float = WAIT) -> int:
    """Turn the partitioned jobs table of ``schema`` back into a plain table: every
    archived job comes back (returns how many), the day partitions are dropped."""
    with _connection(url, wait) as conn, conn.transaction():
        if not is_partitioned(conn, schema):
            raise DatabaseError(f"the jobs table of schema {schema!r} is not partitioned")
        _lock(conn, schema, wait)
        moved = _ddl(conn, schema, "UPDATE {s}.jobs SET kept_until = {kept} "
                     "WHERE kept_until <> {kept}", kept=_KEPT)  # fmt: skip
        views = _dependent_views(conn, schema)
        next_id = _next_id(conn, schema)
        _ddl(conn, schema, "ALTER TABLE {s}.jobs DETACH PARTITION {s}.{current}", current=CURRENT)
        _ddl(conn, schema, "ALTER TABLE {s}.jobs RENAME TO jobs_partitioned")
        _ddl(conn, schema, "ALTER TABLE {s}.{current} RENAME TO jobs", current=CURRENT)
        _repoint_views(conn, views)
        _ddl(conn, schema, "ALTER TABLE {s}.jobs ALTER COLUMN id DROP DEFAULT")
        # With the parent go its indexes, the empty day partitions and the id sequence.
        _ddl(conn, schema, "DROP TABLE {s}.jobs_partitioned")
        for constraint in (_primary_key(conn, schema), _BOUND):
            _ddl(conn, schema, "ALTER TABLE {s}.jobs DROP CONSTRAINT IF EXISTS {c}", c=constraint)
        _ddl(conn, schema, "ALTER TABLE {s}.jobs ADD CONSTRAINT jobs_pkey PRIMARY KEY (id)")
        _ddl(conn, schema, "ALTER TABLE {s}.jobs ALTER COLUMN id ADD GENERATED BY DEFAULT "
             "AS IDENTITY (START WITH {next})", next=sql.Literal(next_id))  # fmt: skip
    log.info("the jobs table of schema %s is a plain table again", schema)
    return moved


@dataclass
class RetentionPass:
    """What one retention pass of a partitioned table did."""

    archived: int = 0
    dropped: int = 0
    full: bool = False


def archive_and_drop(
    conn: psycopg.Connection[Any],
    queries: Queries,
    periods: Mapping[str, timedelta | None],
    batch: int,
) -> RetentionPass:
    """Inside the retention pass's transaction: archive one batch per final state into
    day partitions (created as needed), then drop the partitions whose day is over."""
    done = RetentionPass()
    schema = queries.schema
    days = day_partitions(conn, schema)
    now = _db_now(conn)
    for state, period in periods.items():
        if period is None:
            continue
        for offset in range(((now + period).date() - now.date()).days + 1):
            day = now.date() + timedelta(days=offset)
            if day not in days:
                days[day] = _create_day(conn, schema, day)
        params = {"state": state, "keep": period.total_seconds(), "limit": batch}
        archived = len(conn.execute(queries.archive_batch, params).fetchall())
        done.archived += archived
        done.full = done.full or archived == batch
        if archived:
            log.info("retention: archived %d %s job(s) into day partitions", archived, state)
    for day, name in sorted(days.items()):
        if _midnight(day + timedelta(days=1)) <= now:
            done.dropped += _drop_day(conn, schema, name)
    return done


def _create_day(conn: psycopg.Connection[Any], schema: str, day: date) -> str:
    # Created on its own, then attached: ATTACH takes a lock on the parent that lets claims
    # and outcomes go on, where CREATE TABLE ... PARTITION OF would block them.
    name = f"{_DAY_PREFIX}{day:%Y%m%d}"
    _ddl(conn, schema, "CREATE TABLE IF NOT EXISTS {s}.{day} (LIKE {s}.jobs INCLUDING DEFAULTS "
         "INCLUDING CONSTRAINTS INCLUDING STORAGE)", day=name)  # fmt: skip
    start, end = _midnight(day), _midnight(day + timedelta(days=1))
    _ddl(conn, schema, "ALTER TABLE {s}.jobs ATTACH PARTITION {s}.{day} "
         "FOR VALUES FROM ({start}) TO ({end})",
         day=name, start=sql.Literal(start), end=sql.Literal(end))  # fmt: skip
    log.info("retention: created partition %s.%s", schema, name)
    return name


def _drop_day(conn: psycopg.Connection[Any], schema: str, name: str) -> int:
    try:
        with conn.transaction():
            conn.execute(
                "SELECT pg_catalog.set_config('lock_timeout', %s, true)", (DROP_LOCK_TIMEOUT,)
            )
            _ddl(conn, schema, "DROP TABLE {s}.{day}", day=name)
    except psycopg.errors.LockNotAvailable:
        log.info("retention: partition %s.%s is busy; dropping it next pass", schema, name)
        return 0
    log.info("retention: dropped partition %s.%s", schema, name)
    return 1


def _convert(conn: psycopg.Connection[Any], schema: str, wait: float) -> None:
    _lock(conn, schema, wait)
    _require_plain(conn, schema)
    views = _dependent_views(conn, schema)
    indexes = [
        (name, definition)
        for name, definition in _indexes(conn, schema)
        if name not in ("jobs_pkey", "jobs_current_id_idx")
    ]
    grants = _grants(conn, schema)
    next_id = _next_id(conn, schema)
    # The identity sequence belongs to the plain table; a partitioned parent cannot have an
    # identity column before PostgreSQL 17, so the ids come from a sequence it owns.
    _ddl(conn, schema, "ALTER TABLE {s}.jobs ALTER COLUMN id DROP IDENTITY")
    _ddl(conn, schema, "CREATE SEQUENCE {s}.jobs_id_seq START WITH {next}",
         next=sql.Literal(next_id))  # fmt: skip
    _ddl(conn, schema, "ALTER TABLE {s}.jobs RENAME TO {current}", current=CURRENT)
    # jobs_current keeps its index names (plans and unique violations name them as before);
    # its primary key becomes (id, kept_until), under the old name.
    _ddl(conn, schema, "ALTER TABLE {s}.{current} DROP CONSTRAINT jobs_pkey", current=CURRENT)
    _ddl(conn, schema, "ALTER TABLE {s}.{current} ADD CONSTRAINT jobs_pkey "
         "PRIMARY KEY USING INDEX jobs_current_id_idx", current=CURRENT)  # fmt: skip
    _ddl(conn, schema, "CREATE TABLE {s}.jobs (LIKE {s}.{current} INCLUDING DEFAULTS "
         "INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS) "
         "PARTITION BY RANGE (kept_until)", current=CURRENT)  # fmt: skip
    _ddl(conn, schema, "ALTER TABLE {s}.jobs DROP CONSTRAINT {bound}", bound=_BOUND)
    sequence = sql.Literal(_qualified(schema, "jobs_id_seq"))
    for table in ("jobs", CURRENT):
        _ddl(conn, schema, "ALTER TABLE {s}.{table} ALTER COLUMN id SET DEFAULT nextval({seq})",
             table=table, seq=sequence)  # fmt: skip
    _ddl(conn, schema, "ALTER SEQUENCE {s}.jobs_id_seq OWNED BY {s}.jobs.id")
    _ddl(conn, schema, "ALTER TABLE {s}.jobs ATTACH PARTITION {s}.{current} "
         "FOR VALUES FROM ({kept}) TO (MAXVALUE)", current=CURRENT, kept=_KEPT)  # fmt: skip
    # A primary key made on the parent alone, then given jobs_current's: one made on the
    # whole tree would build a second index on jobs_current, under the lock.
    _ddl(conn, schema, "ALTER TABLE ONLY {s}.jobs ADD CONSTRAINT jobs_partitioned_pkey "
         "PRIMARY KEY (id, kept_until)")  # fmt: skip
    _ddl(conn, schema, "ALTER INDEX {s}.jobs_partitioned_pkey ATTACH PARTITION {s}.jobs_pkey")
    # Each index made on the parent adopts jobs_current's equal one: nothing is built.
    for name, definition in indexes:
        conn.execute(sql.SQL(_renamed(definition, name)))
    for grantee, privilege in grants:
        _ddl(conn, schema, "GRANT {p} ON {s}.jobs TO {g}", p=sql.SQL(privilege), g=grantee)
        if privilege == "INSERT":
            _ddl(conn, schema, "GRANT USAGE ON SEQUENCE {s}.jobs_id_seq TO {g}", g=grantee)
    _repoint_views(conn, views)


_KEPT = sql.Literal(KEPT)
_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}


def _renamed(definition: str, index: str) -> LiteralString:
    """The definition of ``index`` (pg_get_indexdef) for the partitioned parent's index
    of the same columns, named ``jobs_partitioned_...``."""
    parent = f"jobs_partitioned_{index.removeprefix('jobs_')}"
    for spelled in (index, sql.Identifier(index).as_string(None)):
        if f" INDEX {spelled} ON " in definition:
            renamed = definition.replace(f" INDEX {spelled} ON ", f" INDEX {parent} ON ", 1)
            return renamed
    raise DatabaseError(f"cannot read the definition of index {index}: {definition}")


def _ddl(conn: psycopg.Connection[Any], schema: str, statement: LiteralString, **parts: Any) -> int:
    """Run ``statement`` with ``{s}`` the schema and each other ``{name}`` an identifier
    (a str) or a composed piece; returns the rows it touched."""
    composed = {k: sql.Identifier(v) if isinstance(v, str) else v for k, v in parts.items()}
    return conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema), **composed)).rowcount


@contextlib.contextmanager
def _connection(url: str, wait: float) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection whose every statement waits at most ``wait`` seconds for a
    lock; errors as one line, a table in use for longer said so."""
    if behind_pooler(url):
        raise ConfigurationError(
            "changing the jobs table's layout needs a direct URL of the server, not one "
            "through a transaction pooler (--database-url)"
        )
    params = conninfo_to_dict(libpq_url(url))
    params["options"] = f"{params.get('options') or ''} -c lock_timeout={round(wait * 1000)}"
    with connect(make_conninfo("", **params), autocommit=True) as conn:
        try:
            with database_errors():
                yield conn
        except DatabaseError as exc:
            if exc.sqlstate != "55P03":  # lock_not_available
                raise
            raise DatabaseError(
                f"the jobs table was in use for more than {wait:g} s (a long transaction?) "
                "and is as it was: try again, or wait longer (--wait)",
                exc.sqlstate,
            ) from exc


def _lock(conn: psycopg.Connection[Any], schema: str, wait: float) -> None:
    timeout = f"{round(min(wait, CONVERT_LOCK_TIMEOUT) * 1000)}ms"
    conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true)", (timeout,))
    # Fully qualified view and index definitions, whatever the caller's search_path.
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")
    _ddl(conn, schema, "LOCK TABLE {s}.jobs IN ACCESS EXCLUSIVE MODE")


def _require_plain(conn: psycopg.Connection[Any], schema: str) -> None:
    if is_partitioned(conn, schema):
        raise DatabaseError(f"the jobs table of schema {schema!r} is partitioned already")
    query = (
        "SELECT 1 FROM pg_catalog.pg_attribute"
        " WHERE attrelid = {} AND attname = 'kept_until' AND NOT attisdropped"
    )
    if _one(conn, query, schema, "jobs") is None:
        raise SchemaNotReadyError(
            f"schema {schema!r} has no pgjobs jobs table at pgjobs_0006 or later: "
            "run `pgjobs migrate upgrade` first"
        )


def _has_constraint(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    query = "SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = {} AND conname = %s"
    return _one(conn, query, schema, "jobs", name) is not None


def _primary_key(conn: psycopg.Connection[Any], schema: str) -> str:
    query = "SELECT conname FROM pg_catalog.pg_constraint WHERE conrelid = {} AND contype = 'p'"
    return str(_one(conn, query, schema, "jobs") or "jobs_pkey")


def _invalid_index(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    query = "SELECT NOT indisvalid FROM pg_catalog.pg_index WHERE indexrelid = {}"
    return bool(_one(conn, query, schema, name))


def _read(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    """A cursor of plain tuples over ``query``, whatever the connection's row factory
    (the doctor's connection makes dicts)."""
    return conn.cursor(row_factory=tuple_row).execute(query, params)


def _rows(
    conn: psycopg.Connection[Any],
    query: LiteralString,
    schema: str,
    name: str = "jobs",
    *more: Any,
) -> list[tuple[Any, ...]]:
    """The rows of ``query``, whose ``{}`` is the relation ``schema.name``."""
    statement = query.replace("{}", "pg_catalog.to_regclass(%s)")
    rows: list[tuple[Any, ...]] = _read(
        conn, statement, (_qualified(schema, name), *more)
    ).fetchall()
    return rows


def _one(
    conn: psycopg.Connection[Any], query: LiteralString, schema: str, name: str, *more: Any
) -> Any:
    """The first column of the first row of ``query`` (see :func:`_rows`); None: no row."""
    rows = _rows(conn, query, schema, name, *more)
    return rows[0][0] if rows else None


def _indexes(conn: psycopg.Connection[Any], schema: str) -> list[tuple[str, str]]:
    query = (
        "SELECT c.relname, pg_catalog.pg_get_indexdef(i.indexrelid)"
        " FROM pg_catalog.pg_index AS i JOIN pg_catalog.pg_class AS c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = {} ORDER BY c.relname"
    )
    return [(name, definition) for name, definition in _rows(conn, query, schema)]


def _dependent_views(conn: psycopg.Connection[Any], schema: str) -> list[tuple[str, str]]:
    query = (
        "SELECT DISTINCT v.oid::regclass::text, pg_catalog.pg_get_viewdef(v.oid)"
        " FROM pg_catalog.pg_depend AS d"
        " JOIN pg_catalog.pg_rewrite AS r ON r.oid = d.objid"
        " JOIN pg_catalog.pg_class AS v ON v.oid = r.ev_class"
        " WHERE d.refobjid = {} AND v.relkind = 'v'"
    )
    return [(name, definition) for name, definition in _rows(conn, query, schema)]


def _repoint_views(conn: psycopg.Connection[Any], views: list[tuple[str, str]]) -> None:
    # A view is bound to the table it was created on, and followed it through the rename:
    # defined again from its text, it reads the new `jobs`.
    for name, definition in views:
        conn.execute(
            sql.SQL("CREATE OR REPLACE VIEW {} AS {}").format(
                sql.SQL(name),
                sql.SQL(definition),
            )
        )


def _grants(conn: psycopg.Connection[Any], schema: str) -> list[tuple[sql.Composable, str]]:
    query = (
        "SELECT a.grantee = 0, pg_catalog.pg_get_userbyid(a.grantee), a.privilege_type"
        " FROM pg_catalog.pg_class AS c, pg_catalog.aclexplode(c.relacl) AS a"
        " WHERE c.oid = {} AND a.grantee <> c.relowner"
    )
    return [
        (sql.SQL("PUBLIC") if public else sql.Identifier(role), privilege)
        for public, role, privilege in _rows(conn, query, schema)
        if privilege in _PRIVILEGES
    ]


def _next_id(conn: psycopg.Connection[Any], schema: str) -> int:
    row = _read(
        conn, "SELECT pg_catalog.pg_get_serial_sequence(%s, 'id')", (_qualified(schema, "jobs"),)
    ).fetchone()
    assert row is not None and row[0] is not None
    value = _read(conn,
        sql.SQL("SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM {}")
        .format(sql.SQL(row[0]))
    ).fetchone()  # fmt: skip
    assert value is not None
    return int(value[0])


def _qualified(schema: str, name: str) -> str:
    return f"{sql.Identifier(schema).as_string(None)}.{sql.Identifier(name).as_string(None)}"


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def _db_now(conn: psycopg.Connection[Any]) -> datetime:
    row = _read(conn, "SELECT now()").fetchone()
    assert row is not None
    now: datetime = row[0]
    return now.astimezone(UTC)

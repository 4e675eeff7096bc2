"""Enqueue: validate jobs, then write them with one statement in the caller's transaction.

Everything that can be wrong with a job is checked here, before anything reaches the
database, so a bad call raises a pgjobs error and leaves the caller's transaction usable.

Unique keys derived from arguments (``unique=True``, ``unique_by=``) are the task name, a
colon, and the SHA-256 (hex) of the canonical JSON of the chosen arguments: a JSON object
of argument name to value (every argument, arguments left out counting with their
parameter's default), or the value a ``unique_by`` function returns, serialised with
sorted keys and no whitespace. The same arguments give the same key in every process and
version of Python. A key held for a period (``unique_for=``) gets ``@<period>s:<bucket>``
appended, the bucket being floor(unix time / period) on the enqueuing process's clock, so
every producer names the same period without asking anyone; the row then holds the key in
every state until ``unique_until``, the end of that bucket (and retention keeps it so long).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, TypedDict

import psycopg

from pgjobs.errors import InvalidJobError, PayloadError, SchemaNotReadyError
from pgjobs.queries import Queries
from pgjobs.settings import PRIORITY_MAX, PRIORITY_MIN, validate_queue

OnDuplicate = Literal["existing", "none"]
OnParentFailure = Literal["dead", "cancel", "run"]
ON_PARENT_FAILURE: tuple[str, ...] = ("dead", "cancel", "run")
# Where a unique or limit key comes from: argument names, or a function of the arguments.
ArgsFunction = Callable[[dict[str, Any]], Any]
KeySource = tuple[str, ...] | ArgsFunction

# A JSON text with an unescaped \u0000: PostgreSQL's jsonb cannot store NUL characters.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A duplicate whose live job finished in between our insert and our look-up is enqueued
# again; more rounds than this means something else is wrong.
_UNIQUE_ROUNDS = 5
# Bounds that keep a valid-looking job from failing in SQL (and aborting the caller's
# transaction): run_at must stay a representable timestamp, max_attempts an int4, and a
# unique key short enough for a btree index entry (whose hard limit is about 2.7 kB).
MAX_DELAY = timedelta(days=36_525)  # a century
MAX_ATTEMPTS_LIMIT = 2**31 - 1
UNIQUE_KEY_MAX_BYTES = 1024
LIMIT_KEY_MAX_BYTES = 1024  # CHECK jobs_limit_key_length
# Parent ids are bigint; more parents than this per job is a mistake, not a workflow.
MAX_PARENTS = 10_000
_BIGINT_MAX = 2**63 - 1
# No NOTIFY once the server's notification queue is this full (a commit must never fail
# because of it; workers poll).
_NOTIFY_QUEUE_LIMIT = 0.5


class JobId(int):
    """A job id as enqueue returns it: an ``int`` (use it as one) that also tells whether
    this call created the job (``created``) or found an existing job holding the same
    unique key (``duplicate``; see :meth:`existing`)."""

    # No per-instance state: a bulk enqueue makes tens of thousands of these.
    __slots__ = ()
    created: ClassVar[bool] = True

    @property
    def duplicate(self) -> bool:
        """True when the job already existed (a unique key held by it)."""
        return not self.created

    @staticmethod
    def existing(value: int) -> JobId:
        """The id of a job that existed before the enqueue (``created`` is False)."""
        return _ExistingJobId(value)


class _ExistingJobId(JobId):
    __slots__ = ()
    created: ClassVar[bool] = False


class MissingParentError(InvalidJobError, LookupError):
    """``depends_on`` named jobs that do not exist (never did, pruned, or enqueued by a
    transaction that has not committed). Nothing was written; ``missing`` lists them."""

    def __init__(self, missing: Sequence[int]) -> None:
        self.missing = list(missing)
        shown = ", ".join(map(str, self.missing[:20])) + (" …" if len(self.missing) > 20 else "")
        super().__init__(
            f"depends_on names job(s) that do not exist: {shown} (a parent must be committed, "
            "or enqueued earlier in the same transaction, and not pruned)"
        )


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One validated job, ready to insert."""

    task: str
    args: str  # JSON object text
    queue: str
    priority: int
    max_attempts: int
    run_at: datetime | None = None
    delay: float = 0.0
    unique_key: str | None = None
    meta: str = "{}"
    unique_until: datetime | None = None
    limit_key: str | None = None
    depends_on: tuple[int, ...] | None = None
    on_parent_failure: str | None = None


@dataclass(frozen=True, slots=True)
class UniqueRule:
    """A task's unique-jobs setting: the key comes from the arguments named in ``by`` (None:
    every argument) or from ``by(args)``; it is held while the job is live, or, with
    ``period`` (seconds), for the period the enqueue falls in, whatever the job's state."""

    by: KeySource | None = None
    period: float | None = None


class EnqueueOptions(TypedDict, total=False):
    """The keyword options every enqueue call takes (see :meth:`pgjobs.Task.enqueue`)."""

    queue: str | None
    priority: int | None
    run_at: datetime | None
    delay: float | timedelta | None
    max_attempts: int | None
    unique_key: str | None
    meta: dict[str, Any] | None
    on_duplicate: OnDuplicate
    unique: bool | None
    unique_by: Sequence[str] | ArgsFunction | None
    unique_for: float | timedelta | None
    limit_key: str | None
    depends_on: Sequence[int] | None
    on_parent_failure: OnParentFailure | None


OPTION_NAMES = frozenset(EnqueueOptions.__annotations__)


@dataclass(frozen=True, slots=True)
class Options:
    """Per-call enqueue options, validated. ``None`` means: the task's default."""

    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    run_at: datetime | None = None
    delay: float = 0.0
    unique_key: str | None = None
    meta: str = "{}"  # JSON text: one serialisation for a whole batch
    on_duplicate: OnDuplicate = "existing"
    unique: bool | None = None
    unique_by: KeySource | None = None
    unique_for: float | None = None
    limit_key: str | None = None
    depends_on: tuple[int, ...] | None = None
    on_parent_failure: OnParentFailure | None = None
    # No unique derivation, period or limit key asked for: the fast path of a bulk enqueue
    # (computed once by validate, not once per job).
    plain: bool = True

    def with_unique_key(self, key: object) -> Options:
        """These options with a per-job unique key (validated)."""
        return replace(self, unique_key=check_unique_key(key))

    def with_parents(self, parents: Sequence[int]) -> Options:
        """These options with ``parents`` added to ``depends_on``."""
        return replace(self, depends_on=check_parents((*(self.depends_on or ()), *parents)))

    @classmethod
    def of_call(cls, options: Mapping[str, Any]) -> Options:
        """:meth:`validate` for options passed on as ``**options``: an unknown name is an
        InvalidJobError too."""
        unknown = options.keys() - OPTION_NAMES
        if unknown:
            raise InvalidJobError(f"unknown enqueue option(s): {sorted(unknown)}")
        return cls.validate(**options)

    @classmethod
    def validate(
        cls,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        unique_key: str | None = None,
        meta: dict[str, Any] | None = None,
        on_duplicate: OnDuplicate = "existing",
        unique: bool | None = None,
        unique_by: Sequence[str] | ArgsFunction | None = None,
        unique_for: float | timedelta | None = None,
        limit_key: str | None = None,
        depends_on: Sequence[int] | None = None,
        on_parent_failure: OnParentFailure | None = None,
    ) -> Options:
        """Check every option; raise InvalidJobError (or InvalidNameError) on the first bad one."""
        if queue is not None:
            validate_queue(queue)
        if priority is not None:
            check_priority(priority)
        if max_attempts is not None:
            check_max_attempts(max_attempts)
        if run_at is not None and delay is not None:
            raise InvalidJobError("give run_at or delay, not both")
        if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
            raise InvalidJobError(f"run_at must be a timezone-aware datetime, not {run_at!r}")
        if unique_key is not None:
            check_unique_key(unique_key)
        if meta is not None and not isinstance(meta, dict):
            raise InvalidJobError(f"meta must be a dict, not {type(meta).__name__}")
        if on_duplicate not in ("existing", "none"):
            raise InvalidJobError(
                f"on_duplicate must be 'existing' or 'none', not {on_duplicate!r}"
            )
        if unique is not None and not isinstance(unique, bool):
            raise InvalidJobError(f"unique must be True or False, not {unique!r}")
        if limit_key is not None:
            check_limit_key(limit_key)
        return cls(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            run_at=run_at,
            delay=_seconds(delay),
            unique_key=unique_key,
            meta=to_json(meta, "job metadata") if meta else "{}",
            on_duplicate=on_duplicate,
            unique=unique,
            unique_by=None if unique_by is None else check_key_source(unique_by, "unique_by"),
            unique_for=None if unique_for is None else check_period(unique_for, "unique_for"),
            limit_key=limit_key,
            depends_on=None if depends_on is None else check_parents(depends_on),
            on_parent_failure=(
                None if on_parent_failure is None else check_on_parent_failure(on_parent_failure)
            ),
            plain=unique is None and unique_by is None and unique_for is None and limit_key is None,
        )


def check_priority(priority: object) -> int:
    """``priority`` if it is an int in the accepted range."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidJobError(f"priority must be an integer, not {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidJobError(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX} (lower runs first), "
            f"not {priority}"
        )
    return priority


def check_max_attempts(max_attempts: object) -> int:
    """``max_attempts`` if it is a positive int that the database can store."""
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise InvalidJobError(
            f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}, not {max_attempts!r}"
        )
    return max_attempts


def check_unique_key(key: object) -> str:
    """``key`` if it is a non-empty string that PostgreSQL can store and index."""
    if not isinstance(key, str) or not key:
        raise InvalidJobError(f"unique_key must be a non-empty string, not {key!r}")
    if "\x00" in key:
        raise InvalidJobError("unique_key contains a NUL character, which text cannot store")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJobError("unique_key contains a lone surrogate, not valid Unicode") from None
    if size > UNIQUE_KEY_MAX_BYTES:
        raise InvalidJobError(
            f"unique_key must be at most {UNIQUE_KEY_MAX_BYTES} bytes of UTF-8, not {size}; "
            "hash a longer key"
        )
    return key


def check_limit_key(key: object) -> str:
    """``key`` if it is a non-empty string of at most LIMIT_KEY_MAX_BYTES bytes of UTF-8."""
    if not isinstance(key, str) or not key:
        raise InvalidJobError(f"limit_key must be a non-empty string, not {key!r}")
    if "\x00" in key:
        raise InvalidJobError("limit_key contains a NUL character, which text cannot store")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJobError("limit_key contains a lone surrogate, not valid Unicode") from None
    if size > LIMIT_KEY_MAX_BYTES:
        raise InvalidJobError(
            f"limit_key must be at most {LIMIT_KEY_MAX_BYTES} bytes of UTF-8, not {size}"
        )
    return key


def check_key_source(source: object, option: str) -> KeySource:
    """Argument names (a non-empty sequence of strings) or a function of the arguments."""
    if callable(source):
        return source
    if isinstance(source, str):
        return (source,)  # one name: a common slip for ("name",)
    if (
        isinstance(source, Sequence)
        and source
        and all(isinstance(name, str) and name for name in source)
    ):
        return tuple(dict.fromkeys(source))
    raise InvalidJobError(
        f"{option} must be argument names (e.g. ('user_id', 'course_id')) or a function of "
        f"the arguments, not {source!r}"
    )


def check_period(period: object, option: str) -> float:
    """A positive period, in seconds, from seconds or a timedelta."""
    seconds = period.total_seconds() if isinstance(period, timedelta) else period
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_DELAY.total_seconds()
    ):
        raise InvalidJobError(
            f"{option} must be a positive number of seconds or timedelta (at most "
            f"{MAX_DELAY.days} days), not {period!r}"
        )
    return float(seconds)


def check_parents(parents: object) -> tuple[int, ...] | None:
    """Parent job ids, without repeats, in the order given; None for none."""
    if isinstance(parents, str | bytes) or not isinstance(parents, Sequence | set | frozenset):
        raise InvalidJobError(f"depends_on must be a list of job ids, not {parents!r}")
    ids: dict[int, None] = {}
    for parent in parents:
        if isinstance(parent, bool) or not isinstance(parent, int):
            raise InvalidJobError(f"depends_on must hold job ids (positive ints), not {parent!r}")
        if not 1 <= parent <= _BIGINT_MAX:
            raise InvalidJobError(f"depends_on must hold job ids (positive ints), not {parent!r}")
        ids[int(parent)] = None
    if len(ids) > MAX_PARENTS:
        raise InvalidJobError(f"a job can depend on at most {MAX_PARENTS} jobs, not {len(ids)}")
    return tuple(ids) or None


def check_on_parent_failure(policy: object) -> OnParentFailure:
    """'dead', 'cancel' or 'run'."""
    if policy not in ON_PARENT_FAILURE:
        raise InvalidJobError(
            f"on_parent_failure must be 'dead', 'cancel' or 'run', not {policy!r}"
        )
    return policy  # type: ignore[return-value]


def canonical_json(value: Any, what: str) -> str:
    """``value`` as canonical JSON: sorted keys, no whitespace, UTF-8 characters as is."""
    try:
        return json.dumps(
            value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serialisable: {exc}") from None


def derive_unique_key(
    task: str, args: dict[str, Any], by: KeySource | None, defaults: Mapping[str, Any]
) -> str:
    """``task:sha256(canonical JSON of the chosen arguments)``; see the module docstring."""
    if callable(by):
        chosen: Any = by(args)
    elif by is None:
        chosen = {**defaults, **args}
    else:
        chosen = {name: args[name] if name in args else defaults.get(name) for name in by}
    text = canonical_json(chosen, "the arguments a unique key is derived from")
    try:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:
        raise PayloadError("unique key arguments contain a lone surrogate") from None
    return f"{task}:{digest}"


def in_period(key: str, period: float, now: float) -> tuple[str, datetime]:
    """``key`` for the period bucket ``now`` falls in, and the end of that bucket."""
    bucket = math.floor(now / period)
    until = datetime.fromtimestamp((bucket + 1) * period, tz=UTC)
    return check_unique_key(f"{key}@{period:g}s:{bucket}"), until


def resolve_unique(
    task: str,
    args: dict[str, Any],
    options: Options,
    rule: UniqueRule | None,
    defaults: Mapping[str, Any],
    now: float,
) -> tuple[str | None, datetime | None]:
    """The job's (unique_key, unique_until). Precedence: the call's ``unique_key``, its
    ``unique=False``, its ``unique_by``, then the task's rule (also when the call says
    ``unique=True`` or ``unique_for`` without one: every argument). A period comes from the
    call's ``unique_for``, else the task's."""
    if options.unique_key is not None:
        key = options.unique_key
    elif options.unique is False:
        return None, None
    elif options.unique_by is not None:
        key = derive_unique_key(task, args, options.unique_by, defaults)
    elif rule is not None or options.unique or options.unique_for is not None:
        key = derive_unique_key(task, args, rule.by if rule else None, defaults)
    else:
        return None, None
    period = options.unique_for if options.unique_for is not None else (rule and rule.period)
    if not period:
        return key, None
    return in_period(key, period, now)


def resolve_limit_key(
    args: dict[str, Any], options: Options, limit_by: KeySource | None, defaults: Mapping[str, Any]
) -> str | None:
    """The job's limit key: the call's ``limit_key``, else derived by the task's ``limit_by``
    (one argument: its value, as is when a string, else as JSON; several: a JSON array of
    their values; a function: the string it returns, or None for no key)."""
    if options.limit_key is not None or limit_by is None:
        return options.limit_key
    if callable(limit_by):
        value = limit_by(args)
        return None if value is None else check_limit_key(value)
    values = [args[name] if name in args else defaults.get(name) for name in limit_by]
    if len(values) == 1:
        value = values[0]
        text = value if isinstance(value, str) else canonical_json(value, "limit_by arguments")
    else:
        text = canonical_json(values, "limit_by arguments")
    return check_limit_key(text)


def now() -> float:
    """The clock unique periods are bucketed by (seconds since the epoch)."""
    return time.time()


def _seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
    ):
        raise InvalidJobError(f"delay must be a number of seconds or a timedelta, not {delay!r}")
    if seconds < 0:
        raise InvalidJobError(f"delay must not be negative, got {seconds} seconds")
    if seconds > MAX_DELAY.total_seconds():
        raise InvalidJobError(f"delay must be at most {MAX_DELAY.days} days, got {seconds} seconds")
    return float(seconds)


def to_json(value: Any, what: str) -> str:
    """``value`` as JSON text that PostgreSQL's jsonb accepts, or PayloadError saying why not."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serialisable: {exc}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{what} contain a lone surrogate, which is not valid Unicode") from None
    if _NUL.search(text):
        raise PayloadError(f"{what} contain a NUL character (\\u0000), which jsonb cannot store")
    return text


def make_spec(
    task: str,
    args: dict[str, Any],
    options: Options,
    defaults: dict[str, Any],
    unique: tuple[str | None, datetime | None] | None = None,
    limit_key: str | None = None,
) -> JobSpec:
    """A JobSpec from validated options, falling back to the task's ``defaults``.

    ``task`` is already validated (at registration, or by the enqueue-by-name path): this
    runs once per job of a bulk enqueue, so it checks only what differs per job. ``unique``
    is the resolved (key, until) when the caller derived one; ``limit_key`` likewise.
    """
    if not isinstance(args, dict):
        raise InvalidJobError(f"job arguments must be a dict, not {type(args).__name__}")
    if not all(isinstance(key, str) for key in args):
        raise PayloadError("job argument names must be strings")
    if unique is None and limit_key is None and options.depends_on is None:
        # The common case, kept lean: this runs once per job of a bulk enqueue.
        return JobSpec(
            task,
            to_json(args, "job arguments"),
            options.queue or defaults["queue"],
            options.priority if options.priority is not None else defaults["priority"],
            options.max_attempts or defaults["max_attempts"],
            options.run_at,
            options.delay,
            options.unique_key,
            options.meta,
            None,
            options.limit_key,
        )
    key, until = unique if unique is not None else (options.unique_key, None)
    parents = options.depends_on
    return JobSpec(
        task=task,
        args=to_json(args, "job arguments"),
        queue=options.queue or defaults["queue"],
        priority=options.priority if options.priority is not None else defaults["priority"],
        max_attempts=options.max_attempts or defaults["max_attempts"],
        run_at=options.run_at,
        delay=options.delay,
        unique_key=key,
        meta=options.meta,
        unique_until=until,
        limit_key=limit_key if limit_key is not None else options.limit_key,
        depends_on=parents,
        on_parent_failure=(
            (options.on_parent_failure or defaults.get("on_parent_failure") or "dead")
            if parents
            else None
        ),
    )


def _params(
    specs: Sequence[JobSpec], common: dict[str, Any], parents: bool = False
) -> dict[str, Any]:
    params = {
        "queue": [s.queue for s in specs],
        "task": [s.task for s in specs],
        "args": [s.args for s in specs],
        "priority": [s.priority for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
        "run_at": [s.run_at for s in specs],
        "delay": [s.delay for s in specs],
        "unique_key": [s.unique_key for s in specs],
        # Usually no job of a batch has these: a NULL array (which the statement's unnest
        # reads as all NULL) costs nothing to send or unpack.
        "unique_until": _column(specs, "unique_until"),
        "limit_key": _column(specs, "limit_key"),
        "meta": [s.meta for s in specs],
        **common,
    }
    if parents:
        # Parents vary in number per job: one bigint[] literal each, cast per row in SQL.
        params["depends_on"] = [_array_literal(s.depends_on) for s in specs]
        params["on_parent_failure"] = [s.on_parent_failure for s in specs]
    return params


def _column(specs: Sequence[JobSpec], field: str) -> list[Any] | None:
    values = [getattr(s, field) for s in specs]
    return values if any(v is not None for v in values) else None


def _one_params(spec: JobSpec, common: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue": spec.queue,
        "task": spec.task,
        "args": spec.args,
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "run_at": spec.run_at,
        "delay": spec.delay,
        "unique_key": spec.unique_key,
        "unique_until": spec.unique_until,
        "limit_key": spec.limit_key,
        "meta": spec.meta,
        **common,
    }


def _has_parents(specs: Sequence[JobSpec]) -> bool:
    return any(s.depends_on for s in specs)


def _array_literal(ids: tuple[int, ...] | None) -> str | None:
    return None if not ids else "{" + ",".join(map(str, ids)) + "}"


def _match_inserted(specs: Sequence[JobSpec], rows: Sequence[Sequence[Any]]) -> list[JobId | None]:
    """Line returned (id, unique_key) rows up with the input: rows come back in input order,
    and an input is missing only when its unique key was already taken. A row with a NULL
    id (insert_dependent_jobs) lists parents that do not exist: nothing was written."""
    if rows and rows[-1][0] is None:
        raise MissingParentError(rows[-1][2])
    ids: list[JobId | None] = []
    position = 0
    for spec in specs:
        if position < len(rows) and rows[position][1] == spec.unique_key:
            ids.append(JobId(rows[position][0]))
            position += 1
        else:
            ids.append(None)
    return ids


@dataclass
class Writer:
    """Writes JobSpecs for one schema; the sync and async paths share everything but I/O.

    One job without parents goes through ``insert_job`` (scalar parameters, the common
    case); several through ``insert_jobs``; any job with parents through
    ``insert_dependent_jobs``, so jobs without dependencies never pay for them.
    """

    queries: Queries
    channel: str
    notify: bool = True
    events: bool = False  # publish `enqueued` events (opt-in: a NOTIFY in every enqueue)
    events_channel: str = ""

    def _common(self) -> dict[str, Any]:
        """The parameters every insert statement shares."""
        return {
            "channel": self.channel,
            "notify": self.notify,
            "notify_queue_limit": _NOTIFY_QUEUE_LIMIT,
            "events": self.events,
            "events_channel": self.events_channel,
        }

    def _batch(self, specs: Sequence[JobSpec]) -> tuple[Any, dict[str, Any]]:
        """The statement and parameters that insert ``specs``."""
        if _has_parents(specs):
            return self.queries.insert_dependent_jobs, _params(specs, self._common(), True)
        return self.queries.insert_jobs, _params(specs, self._common())

    def insert(
        self, conn: psycopg.Connection[Any], specs: Sequence[JobSpec], on_duplicate: OnDuplicate
    ) -> list[JobId | None]:
        """Insert ``specs`` through ``conn``; duplicates resolve per ``on_duplicate``."""
        if len(specs) == 1 and not specs[0].depends_on:
            return [self._insert_one(conn, specs[0], on_duplicate)]
        pending = list(range(len(specs)))
        ids: list[JobId | None] = [None] * len(specs)
        for _ in range(_UNIQUE_ROUNDS):
            batch = [specs[i] for i in pending]
            with schema_errors(self.queries.schema), conn.cursor() as cur:
                cur.execute(*self._batch(batch))
                inserted = _match_inserted(batch, cur.fetchall())
                keys = [s.unique_key for s, i in zip(batch, inserted, strict=True) if i is None]
                existing = (
                    dict(cur.execute(self.queries.find_live_unique, {"keys": keys}).fetchall())
                    if keys
                    else {}
                )
            pending = self._resolve(specs, pending, inserted, existing, ids, on_duplicate)
            if not pending:
                return ids
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    async def insert_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        specs: Sequence[JobSpec],
        on_duplicate: OnDuplicate,
    ) -> list[JobId | None]:
        """The async twin of :meth:`insert`."""
        if len(specs) == 1 and not specs[0].depends_on:
            return [await self._insert_one_async(conn, specs[0], on_duplicate)]
        pending = list(range(len(specs)))
        ids: list[JobId | None] = [None] * len(specs)
        for _ in range(_UNIQUE_ROUNDS):
            batch = [specs[i] for i in pending]
            with schema_errors(self.queries.schema):
                async with conn.cursor() as cur:
                    await cur.execute(*self._batch(batch))
                    inserted = _match_inserted(batch, await cur.fetchall())
                    keys = [s.unique_key for s, i in zip(batch, inserted, strict=True) if i is None]
                    existing = {}
                    if keys:
                        await cur.execute(self.queries.find_live_unique, {"keys": keys})
                        existing = dict(await cur.fetchall())
            pending = self._resolve(specs, pending, inserted, existing, ids, on_duplicate)
            if not pending:
                return ids
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    def _insert_one(
        self, conn: psycopg.Connection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> JobId | None:
        """One job through ``insert_job`` (scalar parameters); the same rules as insert."""
        params = _one_params(spec, self._common())
        for _ in range(_UNIQUE_ROUNDS):
            with schema_errors(self.queries.schema):
                row = conn.execute(self.queries.insert_job, params).fetchone()
                if row is not None:
                    return JobId(row[0])
                found = conn.execute(
                    self.queries.find_live_unique, {"keys": [spec.unique_key]}
                ).fetchone()
            if found is not None:
                return JobId.existing(found[1]) if on_duplicate == "existing" else None
            # The live duplicate finished in between: insert again.
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    async def _insert_one_async(
        self, conn: psycopg.AsyncConnection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> JobId | None:
        """The async twin of :meth:`_insert_one`."""
        params = _one_params(spec, self._common())
        for _ in range(_UNIQUE_ROUNDS):
            with schema_errors(self.queries.schema):
                cur = await conn.execute(self.queries.insert_job, params)
                row = await cur.fetchone()
                if row is not None:
                    return JobId(row[0])
                cur = await conn.execute(self.queries.find_live_unique, {"keys": [spec.unique_key]})
                found = await cur.fetchone()
            if found is not None:
                return JobId.existing(found[1]) if on_duplicate == "existing" else None
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    @staticmethod
    def _resolve(
        specs: Sequence[JobSpec],
        pending: list[int],
        inserted: list[JobId | None],
        existing: dict[str, int],
        ids: list[JobId | None],
        on_duplicate: OnDuplicate,
    ) -> list[int]:
        """Fill ``ids``; return the positions whose live duplicate vanished (to insert again).

        A duplicate within one call resolves too: the look-up sees this transaction's rows.
        """
        again = []
        for position, job_id in zip(pending, inserted, strict=True):
            if job_id is not None:
                ids[position] = job_id
                continue
            key = specs[position].unique_key
            assert key is not None
            if key in existing:
                ids[position] = (
                    JobId.existing(existing[key]) if on_duplicate == "existing" else None
                )
            else:
                again.append(position)
        return again


@contextmanager
def schema_errors(schema: str) -> Iterator[None]:
    """Turn 'relation does not exist' into a pointer to ``pgjobs migrate``."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
        raise SchemaNotReadyError(
            f"the pgjobs schema {schema!r} is not installed in this database: "
            "run `pgjobs migrate upgrade` first"
        ) from exc

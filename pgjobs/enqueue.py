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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Literal, TypedDict

import psycopg

from pgjobs.errors import (
    TRANSIENT_SQLSTATES,
    DatabaseError,
    InvalidJobError,
    PayloadError,
    SchemaNotReadyError,
    UniqueConflictError,
    one_line,
)
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
# The deepest nesting of arrays and objects a stored document may have (arguments, meta,
# results, progress). Without a bound, json raises RecursionError somewhere near 1000
# levels, depending on the caller's stack; real payloads nest a few levels.
MAX_JSON_DEPTH = 100
# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_CONTAINERS = (dict, list, tuple)  # what json encodes as arrays and objects
# A JSON string (matched whole, so that a number-like run inside one is left alone), or a
# number with a positive exponent, which is how repr writes every float from 1e16 up.
_STRING_OR_EXPONENT = re.compile(
    r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9]+(?:\.[0-9]+)?e\+[0-9]+)', re.DOTALL
)
# A duplicate whose live job finished in between our insert and our look-up is enqueued
# again. Where keyed jobs finish and are retried many times a second (the churn of
# test_mixed_bulk_enqueues_and_dead_retries_never_deadlock), five rounds of a 25-key batch
# all lost a key that way on a slow server; more rounds than this means something else
# is wrong.
_UNIQUE_ROUNDS = 20
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
    except RecursionError:
        raise PayloadError(_too_deep(what)) from None
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
    """``value`` as JSON text that PostgreSQL's jsonb accepts and gives back unchanged, or
    PayloadError saying why not (``what`` names the value in the message, e.g. "job
    arguments").

    Refused: what json cannot encode (objects, NaN, infinities, cycles), NUL characters and
    lone surrogates (jsonb cannot store them), nesting deeper than :data:`MAX_JSON_DEPTH`,
    and dict keys that are not strings at any depth (json would turn ``1`` into ``"1"``,
    and ``{1: "a", "1": "b"}`` into ``{"1": "b"}``). Every finite float reads back as the
    same float, however large (only the sign of ``-0.0`` is lost: numeric has no -0).
    """
    try:
        text = _ENCODER.encode(value)
    except RecursionError:
        raise PayloadError(_too_deep(what)) from None
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serialisable: {exc}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{what} contain a lone surrogate, which is not valid Unicode") from None
    if _NUL.search(text):
        raise PayloadError(f"{what} contain a NUL character (\\u0000), which jsonb cannot store")
    # A walk of the value costs more than encoding it, so the text decides whether one is
    # needed: every level of nesting opens a bracket or brace, and every dict a brace.
    # Brackets inside strings only make the counts larger, never wrongly small.
    braces = text.count("{")
    nested_dicts = braces > 1 if type(value) is dict else braces > 0
    if nested_dicts or braces + text.count("[") > MAX_JSON_DEPTH:
        _check_structure(value, what)
    elif braces:
        _check_top_keys(value, what)  # a dict holding no other dict
    if "e+" in text:
        text = _STRING_OR_EXPONENT.sub(_positional, text)
    return text


def _too_deep(what: str) -> str:
    return f"{what} are nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"


def _not_a_string(what: str, key: object, where: str) -> str:
    return (
        f"{what}: dict keys must be strings, but the dict at {where} has the key {key!r} "
        f"({type(key).__name__}); JSON would turn it into a string, which can collide "
        "with another key"
    )


def _check_top_keys(value: dict[Any, Any], what: str) -> None:
    # A plain loop: cheaper than all(...) for the few keys of a typical payload.
    for key in value:
        if not isinstance(key, str):
            raise PayloadError(_not_a_string(what, key, "the top level"))


def _check_structure(value: Any, what: str) -> None:
    """PayloadError if ``value`` nests too deep or has a dict key that is not a string."""
    fault = _fault(value, 1)
    if fault is None:
        return
    path, key = fault
    if path is None:
        raise PayloadError(_too_deep(what))
    raise PayloadError(_not_a_string(what, key, "".join(reversed(path)) or "the top level"))


def _fault(value: Any, depth: int) -> tuple[list[str] | None, object] | None:
    """The first fault in ``value`` (a container at ``depth``): (None, None) when too deep,
    else (the path to the dict holding it, innermost segment first; the offending key)."""
    if depth > MAX_JSON_DEPTH:
        return None, None
    entries: Iterable[tuple[str | int, Any]]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                return [], key
        entries = value.items()
    elif isinstance(value, (list, tuple)):
        entries = enumerate(value)
    else:
        return None
    for where, item in entries:
        if isinstance(item, _CONTAINERS):
            fault = _fault(item, depth + 1)
            if fault is not None:
                if fault[0] is not None:
                    segment = (
                        json.dumps(where, ensure_ascii=False) if isinstance(where, str) else where
                    )
                    fault[0].append(f"[{segment}]")
                return fault
    return None


def _positional(match: re.Match[str]) -> str:
    number = match.group(1)
    if number is None:
        return match.group(0)  # a string
    # jsonb stores numbers as numeric and prints them without an exponent, so 1e+17 would
    # read back as the int 100000000000000000 (and "1.0e+17" too: numeric drops the scale
    # an exponent implies). Written out with a ".0", numeric keeps the scale and reads
    # back as a float; its digits are repr's, so it is the same float.
    digits = format(Decimal(number), "f")
    return digits if "." in digits else digits + ".0"


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
    # Argument names that are not strings: to_json refuses them (as any non-string key).
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
        """Insert ``specs`` through ``conn``; duplicates resolve per ``on_duplicate``.

        Keyed jobs are written under a savepoint when a round may have to be undone: a
        batch whose duplicate finished before it was looked up (the batch is written again
        whole, so its keys are taken in key order again; see insert_jobs), and any keyed
        write under REPEATABLE READ or SERIALIZABLE (see :class:`UniqueConflictError`).
        """
        keyed = any(s.unique_key is not None for s in specs)
        single = len(specs) == 1 and not specs[0].depends_on
        guarded = keyed and (not single or _strict_isolation(conn))
        for _ in range(_UNIQUE_ROUNDS):
            with (
                suppress(_KeyVanished),
                _statement_errors(self.queries.schema, guarded),
                conn.transaction() if guarded else nullcontext(),
            ):
                if single:
                    ids = self._write_one(conn, specs[0], on_duplicate)
                else:
                    ids = self._write_batch(conn, specs, on_duplicate)
                if ids is not None:
                    return ids
                if guarded:
                    raise _KeyVanished  # undo this round's rows, and the keys they hold
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    async def insert_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        specs: Sequence[JobSpec],
        on_duplicate: OnDuplicate,
    ) -> list[JobId | None]:
        """The async twin of :meth:`insert`."""
        keyed = any(s.unique_key is not None for s in specs)
        single = len(specs) == 1 and not specs[0].depends_on
        guarded = keyed and (not single or await _strict_isolation_async(conn))
        for _ in range(_UNIQUE_ROUNDS):
            with suppress(_KeyVanished), _statement_errors(self.queries.schema, guarded):
                async with conn.transaction() if guarded else nullcontext():
                    if single:
                        ids = await self._write_one_async(conn, specs[0], on_duplicate)
                    else:
                        ids = await self._write_batch_async(conn, specs, on_duplicate)
                    if ids is not None:
                        return ids
                    if guarded:
                        raise _KeyVanished
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    def _write_batch(
        self, conn: psycopg.Connection[Any], specs: Sequence[JobSpec], on_duplicate: OnDuplicate
    ) -> list[JobId | None] | None:
        """One round of :meth:`insert`; None when a duplicate's live job vanished."""
        with conn.cursor() as cur:
            cur.execute(*self._batch(specs))
            inserted = _match_inserted(specs, cur.fetchall())
            keys = _skipped_keys(specs, inserted)
            existing = {}
            if keys:
                existing = dict(cur.execute(self.queries.find_live_unique, {"keys": keys}))
        return _resolve(specs, inserted, existing, on_duplicate)

    async def _write_batch_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        specs: Sequence[JobSpec],
        on_duplicate: OnDuplicate,
    ) -> list[JobId | None] | None:
        """The async twin of :meth:`_write_batch`."""
        async with conn.cursor() as cur:
            await cur.execute(*self._batch(specs))
            inserted = _match_inserted(specs, await cur.fetchall())
            keys = _skipped_keys(specs, inserted)
            existing = {}
            if keys:
                await cur.execute(self.queries.find_live_unique, {"keys": keys})
                existing = dict(await cur.fetchall())
        return _resolve(specs, inserted, existing, on_duplicate)

    def _write_one(
        self, conn: psycopg.Connection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> list[JobId | None] | None:
        """One job through ``insert_job`` (scalar parameters); None as for _write_batch."""
        row = conn.execute(self.queries.insert_job, _one_params(spec, self._common())).fetchone()
        if row is not None:
            return [JobId(row[0])]
        found = conn.execute(self.queries.find_live_unique, {"keys": [spec.unique_key]})
        return _resolve([spec], [None], dict(found.fetchall()), on_duplicate)

    async def _write_one_async(
        self, conn: psycopg.AsyncConnection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> list[JobId | None] | None:
        """The async twin of :meth:`_write_one`."""
        cur = await conn.execute(self.queries.insert_job, _one_params(spec, self._common()))
        row = await cur.fetchone()
        if row is not None:
            return [JobId(row[0])]
        cur = await conn.execute(self.queries.find_live_unique, {"keys": [spec.unique_key]})
        return _resolve([spec], [None], dict(await cur.fetchall()), on_duplicate)


class _KeyVanished(Exception):
    """A round of a keyed batch found a duplicate whose live job has finished since."""


def _skipped_keys(specs: Sequence[JobSpec], inserted: list[JobId | None]) -> list[str | None]:
    return [s.unique_key for s, job_id in zip(specs, inserted, strict=True) if job_id is None]


def _resolve(
    specs: Sequence[JobSpec],
    inserted: list[JobId | None],
    existing: dict[str, int],
    on_duplicate: OnDuplicate,
) -> list[JobId | None] | None:
    """The ids to return for ``specs``, or None when a skipped duplicate's live job has
    finished between the insert and the look-up (then the round is written again).

    A duplicate within one call resolves too: the look-up sees this transaction's rows.
    """
    ids: list[JobId | None] = []
    for spec, job_id in zip(specs, inserted, strict=True):
        if job_id is None:
            key = spec.unique_key
            if key not in existing:
                return None
            job_id = JobId.existing(existing[key]) if on_duplicate == "existing" else None
        ids.append(job_id)
    return ids


# The isolation level a connection's transactions get by default, asked once per
# connection when psycopg was not told one.
_DEFAULT_STRICT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_STRICT_LEVELS = ("repeatable read", "serializable")
_STRICT_ISOLATION = (psycopg.IsolationLevel.REPEATABLE_READ, psycopg.IsolationLevel.SERIALIZABLE)


def _strict_isolation(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``conn``'s transactions run under REPEATABLE READ or SERIALIZABLE."""
    if conn.isolation_level is not None:
        return conn.isolation_level in _STRICT_ISOLATION
    strict = _DEFAULT_STRICT.get(conn)
    if strict is None:
        row = conn.execute("SHOW default_transaction_isolation").fetchone()
        strict = _DEFAULT_STRICT[conn] = row is not None and row[0] in _STRICT_LEVELS
    return strict


async def _strict_isolation_async(conn: psycopg.AsyncConnection[Any]) -> bool:
    """The async twin of :func:`_strict_isolation`."""
    if conn.isolation_level is not None:
        return conn.isolation_level in _STRICT_ISOLATION
    strict = _DEFAULT_STRICT.get(conn)
    if strict is None:
        cur = await conn.execute("SHOW default_transaction_isolation")
        row = await cur.fetchone()
        strict = _DEFAULT_STRICT[conn] = row is not None and row[0] in _STRICT_LEVELS
    return strict


@contextmanager
def _statement_errors(schema: str, guarded: bool) -> Iterator[None]:
    """pgjobs errors for what the database answered an enqueue. ``guarded``: the write ran
    under a savepoint, so a serialization failure undid only pgjobs' own work."""
    try:
        with schema_errors(schema):
            yield
    except psycopg.errors.SerializationFailure as exc:
        if not guarded:
            raise _database_error(exc) from exc
        raise UniqueConflictError(
            "a unique key of this enqueue is held by a job committed after this "
            "transaction's snapshot (REPEATABLE READ or SERIALIZABLE): nothing was written "
            "and the transaction is still usable; enqueue again in a new transaction to get "
            "the existing job",
            exc.sqlstate,
        ) from exc
    except psycopg.Error as exc:
        raise _database_error(exc) from exc


def _database_error(exc: psycopg.Error) -> DatabaseError:
    message = one_line(exc)
    if exc.sqlstate in TRANSIENT_SQLSTATES:
        message += ": PostgreSQL rolled back the transaction; run it again"
    return DatabaseError(f"enqueue failed: {message}", exc.sqlstate)


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

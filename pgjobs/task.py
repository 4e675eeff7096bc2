"""Tasks: functions registered with ``@app.task``, and how they enqueue themselves."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pgjobs.enqueue import (
    OPTION_NAMES,
    ArgsFunction,
    JobId,
    JobSpec,
    KeySource,
    OnDuplicate,
    OnParentFailure,
    Options,
    UniqueRule,
    canonical_json,
    check_key_source,
    check_on_parent_failure,
    check_period,
    make_spec,
    now,
    resolve_limit_key,
    resolve_unique,
)
from pgjobs.errors import ConfigurationError, InvalidJobError, PgJobsError
from pgjobs.flow import JobCall

if TYPE_CHECKING:
    from pgjobs.app import App

P = ParamSpec("P")
R = TypeVar("R")

# Keyword arguments of .enqueue() that are options, not task arguments.
ENQUEUE_OPTIONS = OPTION_NAMES | {"conn"}


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """How a task runs: the defaults its jobs get and the worker's policy for them."""

    name: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    discard_on: tuple[type[BaseException], ...] = ()
    backoff: Callable[[int], float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unique: UniqueRule | None = None
    limit_by: KeySource | None = None
    on_parent_failure: OnParentFailure = "dead"

    def defaults(self) -> dict[str, Any]:
        """The job defaults enqueue falls back to."""
        return {
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "on_parent_failure": self.on_parent_failure,
        }


def flow_config(
    *,
    unique: bool = False,
    unique_by: Sequence[str] | ArgsFunction | None = None,
    unique_for: float | timedelta | None = None,
    limit_by: Sequence[str] | ArgsFunction | None = None,
    on_parent_failure: OnParentFailure = "dead",
) -> dict[str, Any]:
    """The TaskConfig fields of ``@app.task``'s unique, limit and dependency options,
    validated (ConfigurationError). ``unique_by`` or ``unique_for`` imply ``unique``."""
    try:
        rule = None
        if unique or unique_by is not None or unique_for is not None:
            rule = UniqueRule(
                by=None if unique_by is None else check_key_source(unique_by, "unique_by"),
                period=None if unique_for is None else check_period(unique_for, "unique_for"),
            )
        return {
            "unique": rule,
            "limit_by": None if limit_by is None else check_key_source(limit_by, "limit_by"),
            "on_parent_failure": check_on_parent_failure(on_parent_failure),
        }
    except InvalidJobError as exc:
        raise ConfigurationError(str(exc)) from None


class Task(Generic[P, R]):
    """A registered task. Call it to run the function in-process; ``.enqueue()`` to run it
    on a worker."""

    def __init__(self, app: App, fn: Callable[P, R], config: TaskConfig) -> None:
        self.app = app
        self.fn = fn
        self.config = config
        self.signature = inspect.signature(fn)
        self.context_parameter = _context_parameter(self.signature)
        self._is_async = inspect.iscoroutinefunction(fn)
        # What enqueue checks arguments against: the parameters less the JobContext one.
        self._job_signature = self.signature.replace(
            parameters=[
                p for name, p in self.signature.parameters.items() if name != self.context_parameter
            ]
        )
        clashes = ENQUEUE_OPTIONS & set(self.signature.parameters)
        if clashes:
            raise ConfigurationError(
                f"task {config.name!r} has parameter(s) {sorted(clashes)} that clash with "
                f"enqueue options; rename them"
            )
        self._fast_check = _fast_check(self._job_signature)
        # Parameter defaults: arguments left out count with them in derived keys.
        self._arg_defaults = {
            name: p.default
            for name, p in self._job_signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        self._check_flow_config()
        self._plain = config.unique is None and config.limit_by is None
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", config.name)
        self.__wrapped__ = fn

    def _check_flow_config(self) -> None:
        """Names in unique_by/limit_by must be parameters; defaults they use, JSON."""
        rule = self.config.unique
        for option, source in (("unique_by", rule and rule.by), ("limit_by", self.config.limit_by)):
            if isinstance(source, tuple):
                try:
                    self._check_names(source, option)
                except InvalidJobError as exc:
                    raise ConfigurationError(str(exc)) from None
        if rule is not None and not callable(rule.by):
            used = rule.by or tuple(self._arg_defaults)
            defaults = {n: self._arg_defaults[n] for n in used if n in self._arg_defaults}
            try:
                canonical_json(defaults, f"the defaults of task {self.name!r}")
            except PgJobsError as exc:
                raise ConfigurationError(f"{exc}: unique keys are derived from them") from None

    def _check_names(self, names: tuple[str, ...], option: str) -> None:
        parameters = self._job_signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [n for n in names if n not in parameters]
        if unknown and not takes_any:
            raise InvalidJobError(
                f"{option} of task {self.name!r} names {unknown}, which are not its "
                f"parameters ({', '.join(parameters) or 'none'})"
            )

    @property
    def name(self) -> str:
        """The name jobs of this task are stored under."""
        return self.config.name

    @property
    def is_async(self) -> bool:
        """True for ``async def`` tasks."""
        return self._is_async

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<pgjobs.Task {self.name} queue={self.config.queue}>"

    def check_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` if they bind to the task's parameters, else InvalidJobError."""
        fast = self._fast_check
        if fast is not None:
            names, required, any_name = fast
            keys = kwargs.keys()
            if required <= keys and (any_name or keys <= names):
                return kwargs
            # Fall through: bind() names what is wrong.
        try:
            self._job_signature.bind(**kwargs)
        except TypeError as exc:
            raise InvalidJobError(f"bad arguments for task {self.name!r}: {exc}") from None
        return kwargs

    def enqueue(
        self,
        *,
        conn: Any = None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        unique_key: str | None = None,
        meta: dict[str, Any] | None = None,
        on_duplicate: OnDuplicate = "existing",
        unique: bool | None = None,
        unique_by: Sequence[str] | ArgsFunction | None = None,
        unique_for: float | timedelta | None = None,
        limit_key: str | None = None,
        depends_on: Sequence[int] | None = None,
        on_parent_failure: OnParentFailure | None = None,
        **kwargs: Any,
    ) -> JobId | None:
        """Enqueue one job with ``kwargs`` as the task's arguments; return its id, a
        :class:`~pgjobs.JobId` (an ``int`` whose ``created`` says whether this call made it).

        With ``conn`` the job is written in the caller's transaction and exists once it
        commits; without it pgjobs commits at once. A unique key (``unique_key``, or
        derived: ``unique=True``, ``unique_by=``; held for ``unique_for``) that a job
        holds returns that job's id with ``created`` False (or None with
        ``on_duplicate="none"``). ``limit_key`` names the partition of the queue's limits
        the job counts against. ``depends_on`` (job ids) keeps the job ``pending`` until
        those jobs succeed; ``on_parent_failure`` ('dead', 'cancel' or 'run') says what a
        failed parent does to it.
        """
        options = Options.validate(
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            unique_key=unique_key,
            meta=meta,
            on_duplicate=on_duplicate,
            unique=unique,
            unique_by=unique_by,
            unique_for=unique_for,
            limit_key=limit_key,
            depends_on=depends_on,
            on_parent_failure=on_parent_failure,
        )
        return self.app._enqueue_specs([self._spec(kwargs, options)], options, conn)[0]

    async def enqueue_async(
        self,
        *,
        conn: Any = None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        unique_key: str | None = None,
        meta: dict[str, Any] | None = None,
        on_duplicate: OnDuplicate = "existing",
        unique: bool | None = None,
        unique_by: Sequence[str] | ArgsFunction | None = None,
        unique_for: float | timedelta | None = None,
        limit_key: str | None = None,
        depends_on: Sequence[int] | None = None,
        on_parent_failure: OnParentFailure | None = None,
        **kwargs: Any,
    ) -> JobId | None:
        """The async twin of :meth:`enqueue` (``conn`` is an async connection or session)."""
        options = Options.validate(
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            unique_key=unique_key,
            meta=meta,
            on_duplicate=on_duplicate,
            unique=unique,
            unique_by=unique_by,
            unique_for=unique_for,
            limit_key=limit_key,
            depends_on=depends_on,
            on_parent_failure=on_parent_failure,
        )
        ids = await self.app._enqueue_specs_async([self._spec(kwargs, options)], options, conn)
        return ids[0]

    def enqueue_many(
        self,
        items: Iterable[dict[str, Any]],
        *,
        conn: Any = None,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
        **options: Any,
    ) -> list[JobId | None]:
        """Enqueue one job per dict of arguments with one statement; return their ids in
        input order. ``options`` (queue, priority, delay, depends_on, …) apply to every
        job; ``unique_key``, if given, derives each job's key from its arguments (as do
        ``unique``/``unique_by``). Unique periods are bucketed by one clock reading."""
        opts = _batch_options(options, unique_key)
        clock = now()
        specs = [self._spec(args, opts, unique_key, clock) for args in items]
        return self.app._enqueue_specs(specs, opts, conn)

    async def enqueue_many_async(
        self,
        items: Iterable[dict[str, Any]],
        *,
        conn: Any = None,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
        **options: Any,
    ) -> list[JobId | None]:
        """The async twin of :meth:`enqueue_many`."""
        opts = _batch_options(options, unique_key)
        clock = now()
        specs = [self._spec(args, opts, unique_key, clock) for args in items]
        return await self.app._enqueue_specs_async(specs, opts, conn)

    def job(self, **kwargs: Any) -> JobCall:
        """A job of this task, not enqueued yet: for :meth:`pgjobs.App.chain` and
        :meth:`pgjobs.App.fan_in`. Takes the task's arguments and the enqueue options
        of :meth:`enqueue` (but ``conn``, given to chain/fan_in, and ``on_duplicate``:
        a duplicate always resolves to the existing job, which the next ones wait for)."""
        for refused in ("conn", "on_duplicate"):
            if refused in kwargs:
                raise InvalidJobError(
                    f"task.job() takes no {refused!r}: pass conn to app.chain()/app.fan_in()"
                    if refused == "conn"
                    else "task.job() jobs resolve a duplicate to the existing job"
                )
        options = {k: kwargs.pop(k) for k in ENQUEUE_OPTIONS & kwargs.keys()}
        validated = Options.validate(**options)
        self._spec(kwargs, validated)  # every check enqueue makes, now
        return JobCall(self, kwargs, validated)

    def _spec(
        self,
        kwargs: dict[str, Any],
        options: Options,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
        clock: float | None = None,
    ) -> JobSpec:
        if not isinstance(kwargs, dict):
            raise InvalidJobError(f"job arguments must be a dict, not {type(kwargs).__name__}")
        if unique_key is not None:
            options = options.with_unique_key(unique_key(kwargs))
        args = self.check_args(kwargs)
        if self._plain and options.plain:
            return make_spec(self.name, args, options, self.config.defaults())
        if isinstance(options.unique_by, tuple):
            self._check_names(options.unique_by, "unique_by")
        defaults = self._arg_defaults
        unique = resolve_unique(
            self.name,
            args,
            options,
            self.config.unique,
            defaults,
            now() if clock is None else clock,
        )
        limit_key = resolve_limit_key(args, options, self.config.limit_by, defaults)
        return make_spec(self.name, args, options, self.config.defaults(), unique, limit_key)


def _batch_options(options: dict[str, Any], unique_key: object = None) -> Options:
    if unique_key is not None and not callable(unique_key):
        # One key for a whole batch would make every job after the first a duplicate.
        raise InvalidJobError(
            "unique_key of enqueue_many must be a function that derives a job's key from its "
            f"arguments, not {unique_key!r}"
        )
    return Options.of_call(options)


def _fast_check(
    signature: inspect.Signature,
) -> tuple[frozenset[str], frozenset[str], bool] | None:
    """What keyword arguments bind to ``signature``, as sets: (accepted names, required
    names, whether any other name is accepted). None when a set test cannot decide it
    (positional-only or ``*args`` parameters): check_args then binds every time."""
    names, required, any_name = set(), set(), False
    for name, parameter in signature.parameters.items():
        kind = parameter.kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            any_name = True
        elif kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(name)
            if parameter.default is inspect.Parameter.empty:
                required.add(name)
        else:
            return None
    return frozenset(names), frozenset(required), any_name


def _context_parameter(signature: inspect.Signature) -> str | None:
    """The name of the parameter that receives the JobContext, if the task takes one."""
    for name, parameter in signature.parameters.items():
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            continue
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        if text.rsplit(".", 1)[-1] == "JobContext":
            return name
    return "ctx" if "ctx" in signature.parameters else None

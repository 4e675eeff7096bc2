"""Tasks: functions registered with ``@app.task``, and how they enqueue themselves."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pgjobs.enqueue import JobSpec, OnDuplicate, Options, make_spec
from pgjobs.errors import ConfigurationError, InvalidJobError

if TYPE_CHECKING:
    from pgjobs.app import App

P = ParamSpec("P")
R = TypeVar("R")

# Keyword arguments of .enqueue() that are options, not task arguments.
ENQUEUE_OPTIONS = frozenset(
    {
        "conn",
        "queue",
        "priority",
        "run_at",
        "delay",
        "max_attempts",
        "unique_key",
        "meta",
        "on_duplicate",
    }
)


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

    def defaults(self) -> dict[str, Any]:
        """The job defaults enqueue falls back to."""
        return {"queue": self.queue, "priority": self.priority, "max_attempts": self.max_attempts}


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
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", config.name)
        self.__wrapped__ = fn

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
        **kwargs: Any,
    ) -> int | None:
        """Enqueue one job with ``kwargs`` as the task's arguments; return its id.

        With ``conn`` the job is written in the caller's transaction and exists once it
        commits; without it pgjobs commits at once. A ``unique_key`` that a live job holds
        returns that job's id (or None with ``on_duplicate="none"``).
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
        **kwargs: Any,
    ) -> int | None:
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
    ) -> list[int | None]:
        """Enqueue one job per dict of arguments with one statement; return their ids in
        input order. ``options`` (queue, priority, delay, …) apply to every job;
        ``unique_key``, if given, derives each job's key from its arguments."""
        opts = _batch_options(options, unique_key)
        specs = [self._spec(args, opts, unique_key) for args in items]
        return self.app._enqueue_specs(specs, opts, conn)

    async def enqueue_many_async(
        self,
        items: Iterable[dict[str, Any]],
        *,
        conn: Any = None,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
        **options: Any,
    ) -> list[int | None]:
        """The async twin of :meth:`enqueue_many`."""
        opts = _batch_options(options, unique_key)
        specs = [self._spec(args, opts, unique_key) for args in items]
        return await self.app._enqueue_specs_async(specs, opts, conn)

    def _spec(
        self,
        kwargs: dict[str, Any],
        options: Options,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
    ) -> JobSpec:
        if not isinstance(kwargs, dict):
            raise InvalidJobError(f"job arguments must be a dict, not {type(kwargs).__name__}")
        if unique_key is not None:
            options = options.with_unique_key(unique_key(kwargs))
        return make_spec(self.name, self.check_args(kwargs), options, self.config.defaults())


def _batch_options(options: dict[str, Any], unique_key: object = None) -> Options:
    unknown = set(options) - ENQUEUE_OPTIONS
    if unknown:
        raise InvalidJobError(f"unknown enqueue option(s): {sorted(unknown)}")
    if unique_key is not None and not callable(unique_key):
        # One key for a whole batch would make every job after the first a duplicate.
        raise InvalidJobError(
            "unique_key of enqueue_many must be a function that derives a job's key from its "
            f"arguments, not {unique_key!r}"
        )
    return Options.validate(**options)


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

"""Threads for sync tasks: reused while idle, added when none is free, never a fixed cap.

A fixed-size pool (``ThreadPoolExecutor``) breaks per-task timeouts: a sync task past its
timeout cannot be killed, only abandoned, and abandoned threads that never return would
exhaust a fixed pool and starve every later job. Here a hung thread is simply not idle, and
the next job gets a new thread. Threads are daemons, so a hung one cannot keep the process
alive at exit (``ThreadPoolExecutor`` joins its threads at interpreter exit).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_IDLE_SECONDS = 60.0


class ElasticThreadPool:
    """Run callables in daemon threads; ``submit`` returns a ``concurrent.futures.Future``."""

    def __init__(self, name: str = "pgjobs-task", idle_seconds: float = _IDLE_SECONDS) -> None:
        self._name = name
        self._idle_seconds = idle_seconds
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0

    def submit(self, fn: Callable[..., Any], /, **kwargs: Any) -> Future[Any]:
        """Run ``fn(**kwargs)`` in a thread of the pool."""
        future: Future[Any] = Future()
        context = contextvars.copy_context()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = context.run(fn, **kwargs)
            except BaseException as exc:  # a task's SystemExit must not kill the thread silently
                future.set_exception(exc)
            else:
                future.set_result(result)

        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self._count += 1
            else:
                self._idle -= 1
        self._work.put(work)
        if spawn:
            name = f"{self._name}-{self._count}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            try:
                work = self._work.get(timeout=self._idle_seconds)
            except queue.Empty:
                if self._retire():
                    return
                continue
            work()
            del work
            with self._lock:
                self._idle += 1

    def _retire(self) -> bool:
        with self._lock:
            if self._idle == 0:  # our idle slot was promised to a submit in flight
                return False
            self._idle -= 1
            self._count -= 1
            return True

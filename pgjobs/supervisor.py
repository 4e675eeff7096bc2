"""``pgjobs work --processes P``: run P worker processes and keep them running.

Each child is the same ``pgjobs work`` command with ``--processes 1``, started fresh (not
forked, so no connection or thread of the parent leaks into it). A child that exits on its
own is restarted, with a growing pause if it keeps dying right after starting. SIGTERM and
SIGINT are forwarded to every child (which then shut down gracefully); a second signal is
forwarded too (children exit at once), and the supervisor exits when they are gone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

log = logging.getLogger("pgjobs.supervisor")

# A child that lived shorter than this counts as a crash loop: wait before restarting.
_HEALTHY_SECONDS = 5.0
_MAX_RESTART_PAUSE = 30.0
# Set in a child's environment: the supervisor's pid, so an orphaned child stops itself.
SUPERVISOR_ENV = "PGJOBS_SUPERVISOR_PID"


class Supervisor:
    """Keep ``processes`` copies of ``argv`` running until a signal arrives (with
    ``burst``, until every child has exited cleanly)."""

    def __init__(
        self, argv: Sequence[str], processes: int, env: dict[str, str], *, burst: bool = False
    ) -> None:
        self.argv = list(argv)
        self.burst = burst
        self.processes = processes
        self.env = env
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.restarts = 0
        self._signals: list[int] = []
        self._pause = 0.5

    def run(self) -> int:
        """Supervise until stopped; the exit status (0, or 128 + signal when forced)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        for slot in range(self.processes):
            self._spawn(slot)
        while not self._signals and self.children:
            self._reap_and_restart()
            time.sleep(0.1)
        return self._stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        for child, _ in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def _spawn(self, slot: int) -> None:
        # A process group of its own: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once (reaching the children twice would force them out at once).
        child = subprocess.Popen(self.argv, env=self.env, process_group=0)
        self.children[slot] = (child, time.monotonic())
        log.info("started worker process %d (pid %d)", slot, child.pid)

    def _reap_and_restart(self) -> None:
        for slot, (child, started) in list(self.children.items()):
            code = child.poll()
            if code is None or self._signals:
                continue
            if self.burst and code == 0:
                del self.children[slot]  # out of work: done, not dead
                continue
            lived = time.monotonic() - started
            log.warning(
                "worker process %d (pid %d) exited with status %s after %.1f s; restarting",
                slot,
                child.pid,
                code,
                lived,
            )
            if lived < _HEALTHY_SECONDS:
                time.sleep(self._pause)
                self._pause = min(self._pause * 2, _MAX_RESTART_PAUSE)
            else:
                self._pause = 0.5
            self.restarts += 1
            if not self._signals:
                self._spawn(slot)

    def _stop(self) -> int:
        log.info("stopping %d worker process(es)", len(self.children))
        for child, _ in self.children.values():
            child.wait()
        forced = len(self._signals) > 1
        return 128 + self._signals[-1] if forced else 0


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line of one supervised child: this command with ``--processes 1``."""
    return [sys.executable, "-m", "pgjobs", *argv, "--processes", "1"]


def child_env(database_url: str, app: str | None, listen_url: str | None = None) -> dict[str, str]:
    """The children's environment: the resolved database (so they share one embedded
    server), its direct URL for LISTEN if there is one, and the application (so the demo
    is seeded once, by the supervisor)."""
    env = dict(os.environ)
    env["PGJOBS_DATABASE_URL"] = database_url
    if listen_url is not None and listen_url != database_url:
        env["PGJOBS_LISTEN_URL"] = listen_url
    env[SUPERVISOR_ENV] = str(os.getpid())
    if app:
        env["PGJOBS_APP"] = app
    return env


def watch_supervisor(stop: Callable[[], None]) -> None:
    """In a supervised child: call ``stop`` (a graceful stop) if the supervisor dies."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        log.warning("the supervisor (pid %s) is gone; stopping", parent)
        stop()

    threading.Thread(target=watch, name="pgjobs-supervisor-watch", daemon=True).start()

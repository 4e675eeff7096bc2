"""The application the many-hosts test runs on its namespaced hosts.

Executions are counted in files, not in the database: a host whose network is cut can
still write them, and the count is then independent of what pgjobs managed to store. Each
worker process appends JSON lines to ``<MANY_HOSTS_DIR>/<hostname>-<pid>.jsonl``, one
``write`` per line.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pgjobs

app = pgjobs.App()

DIR_ENV = "MANY_HOSTS_DIR"
RELEASE = "release"
# A held job that is never released fails instead of hanging its worker for good.
HOLD_LIMIT = 120.0


def _note(ctx: pgjobs.JobContext, phase: str) -> None:
    host = socket.gethostname()
    line = {
        "job": ctx.id,
        "attempt": ctx.attempt,
        "lease": str(ctx.lease_token),
        "host": host,
        "pid": os.getpid(),
        "phase": phase,
        "at": time.time(),
    }
    path = Path(os.environ[DIR_ENV]) / f"{host}-{os.getpid()}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


@app.task(name="hosts.work", queue="hosts", max_attempts=3)
def work(
    ctx: pgjobs.JobContext, hold_on: str | None = None, seconds: float = 0.0
) -> dict[str, Any]:
    """Note the start and the end of each execution, ``seconds`` apart; on host
    ``hold_on``, wait in between until the test creates the release file."""
    _note(ctx, "start")
    time.sleep(seconds)
    if hold_on == socket.gethostname():
        release = Path(os.environ[DIR_ENV]) / RELEASE
        deadline = time.monotonic() + HOLD_LIMIT
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not released within {HOLD_LIMIT} s")
            time.sleep(0.02)
    _note(ctx, "end")
    return {"host": socket.gethostname(), "pid": os.getpid(), "attempt": ctx.attempt}


def executions(directory: Path) -> list[dict[str, Any]]:
    """Every line written by the workers so far."""
    lines = []
    for path in sorted(directory.glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines


def lease(value: str) -> uuid.UUID:
    """A lease token as noted."""
    return uuid.UUID(value)

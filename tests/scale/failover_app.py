"""The application the failover tests run in real ``pgjobs work`` processes.

Its task records every run in a ledger file outside the database: the database is what
fails over, and a run whose row was lost with the old primary must still be counted.
One ``write`` of one short line to a file opened with ``O_APPEND`` is atomic, so the
worker processes may share the file. Task names are explicit: the tests import this
module as ``failover_app``, the workers as ``tests.scale.failover_app``.
"""

from __future__ import annotations

import os
import time

import pgjobs

app = pgjobs.App()


@app.task(name="failover.step", queue="failover", max_attempts=5)
def step(n: int, ledger: str, seconds: float, ctx: pgjobs.JobContext) -> int:
    """Log this run of job ``ctx.id`` (job number ``n``) in ``ledger`` ("-": none), then
    take ``seconds``."""
    line = f"{ctx.id} {n} {ctx.attempt} {ctx.lease_token} {os.getpid()} {time.time():.6f}\n"
    if ledger == "-":  # no ledger
        time.sleep(seconds)
        return n
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return n

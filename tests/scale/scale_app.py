"""The application the scale tests run in real ``pgjobs work`` processes behind PgBouncer.

Its tasks touch no database themselves: whatever connection count the tests measure is
pgjobs' own. Each returns the pid of the process that ran it, so the jobs table alone says
who ran what. Task names are explicit: the tests import this module as ``scale_app``,
the workers as ``tests.scale.scale_app``.
"""

from __future__ import annotations

import os
import time

import pgjobs

app = pgjobs.App()


@app.task(name="where", queue="scale")
def where(n: int) -> int:
    """The pid of the worker process that ran job ``n``."""
    return os.getpid()


@app.task(name="nap", queue="scale")
def nap(seconds: float) -> int:
    """Sleep, then the pid of the worker process that ran it."""
    time.sleep(seconds)
    return os.getpid()

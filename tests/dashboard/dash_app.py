"""The application the dashboard tests run in real ``pgjobs work`` processes."""

from __future__ import annotations

import time

import pgjobs

app = pgjobs.App()


@app.task(name="d.quick", queue="dash")
def quick(n: int = 0) -> dict[str, int]:
    """Succeed at once."""
    return {"n": n}


@app.task(name="d.flaky", queue="dash", max_attempts=1)
def flaky(ctx: pgjobs.JobContext) -> str:
    """Fail the first attempt (dead at once with max_attempts=1), succeed when retried."""
    if ctx.attempt == 1:
        raise ValueError("first attempts always fail")
    return "recovered"


@app.task(name="d.progress", queue="dash")
def progress(ctx: pgjobs.JobContext, steps: int = 2, pause: float = 0.2) -> str:
    """Report progress ``steps`` times, ``pause`` seconds apart."""
    for step in range(1, steps + 1):
        ctx.progress(step / steps, {"step": step})
        time.sleep(pause)
    return "done"

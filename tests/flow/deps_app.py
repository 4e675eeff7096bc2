"""The application the dependency tests run in real ``pgjobs work`` processes
(``--app tests.flow.deps_app:app``). Every task is in queue ``flow`` and runs once
(``max_attempts=1``): a failure is final at once, which is what the tests look at."""

from __future__ import annotations

import os
import time
from typing import Any

import pgjobs

app = pgjobs.App()
QUEUE = "flow"


@app.task(name="flow.step", queue=QUEUE, max_attempts=1)
def step(
    label: str, fail: bool = False, cancel: bool = False, sleep: float = 0.0
) -> dict[str, Any]:
    """Sleep a little, then succeed with a result naming the step, fail (dead), or cancel
    itself."""
    if sleep:
        time.sleep(sleep)
    if cancel:
        raise pgjobs.Cancel(f"{label} cancelled itself")
    if fail:
        raise ValueError(f"{label} failed")
    return {"label": label, "pid": os.getpid()}


@app.task(name="flow.collect", queue=QUEUE, max_attempts=1)
def collect(ctx: pgjobs.JobContext, label: str = "") -> dict[str, Any]:
    """Return the results of this job's parents (JSON object keys are strings)."""
    parents = ctx.parent_results()
    return {"label": label, "parents": {str(k): v for k, v in parents.items()}}


@app.task(name="flow.acollect", queue=QUEUE, max_attempts=1)
async def acollect(ctx: pgjobs.JobContext, label: str = "") -> dict[str, Any]:
    """The async twin of collect."""
    parents = await ctx.parent_results_async()
    return {"label": label, "parents": {str(k): v for k, v in parents.items()}}

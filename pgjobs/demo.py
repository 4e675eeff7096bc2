"""The demo ``pgjobs work`` runs when no application is named: a few tasks and a seed.

Shows the shape of a pgjobs application: sync and async tasks, a job that retries, a
delayed job, a chain whose last step reads its parent's result, and a periodic job. Run
``pgjobs work`` and watch the jobs go through; inspect them with psql.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from pgjobs.app import App
from pgjobs.context import JobContext

app = App()
log = logging.getLogger("pgjobs.demo")


@app.task(name="demo.greet", queue="demo")
def greet(name: str) -> str:
    """A plain function: workers run it in a thread."""
    time.sleep(0.05)
    log.info("greet: hello, %s", name)
    return f"hello, {name}"


@app.task(name="demo.resize", queue="demo", max_attempts=3)
async def resize(image: str, width: int) -> dict[str, Any]:
    """An async task: workers await it on their event loop."""
    await asyncio.sleep(0.1)
    log.info("resize: %s resized to %d px wide", image, width)
    return {"image": image, "width": width}


@app.task(name="demo.flaky", queue="demo", max_attempts=4, backoff=lambda attempt: 1.0)
def flaky(chance: float) -> str:
    """Fails at random, to show retries with backoff and, when unlucky, the dead state."""
    if random.random() < chance:
        log.info("flaky: failing on purpose; pgjobs will retry it with backoff")
        raise RuntimeError("the demo's flaky task failed (on purpose)")
    log.info("flaky: made it")
    return "made it"


@app.task(name="demo.report", queue="demo")
def report(ctx: JobContext) -> str:
    """The last step of a chain: runs once its parent succeeded, and reads its result."""
    parents = ctx.parent_results()
    log.info("report: the image before me came out as %s", list(parents.values()))
    return "reported"


@app.periodic(every=15, name="demo.tick")
@app.task(name="demo.tick", queue="demo")
def tick() -> None:
    """A periodic job: every 15 s, enqueued once per slot however many workers run."""
    log.info("tick: a periodic job (every 15 s)")


def seed() -> list[int | None]:
    """Enqueue a handful of demo jobs; return their ids."""
    ids: list[int | None] = []
    ids += greet.enqueue_many([{"name": n} for n in ("Ada", "Grace", "Edsger")])
    ids.append(resize.enqueue(image="cat.png", width=640))
    ids.append(flaky.enqueue(chance=0.5))
    ids.append(greet.enqueue(name="later", delay=3))
    ids += app.chain(resize.job(image="dog.png", width=320), report.job())
    log.info(
        "demo: enqueued jobs %s; see them with: SELECT id, task, state, attempts, result "
        "FROM pgjobs.jobs ORDER BY id",
        ", ".join(str(i) for i in ids),
    )
    return ids

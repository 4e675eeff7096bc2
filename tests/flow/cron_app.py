"""The application the cron tests run in real ``pgjobs work`` processes: one task and two
every-second schedules of it (a six-field cron expression that backfills, and an
interval that skips slots later than its grace)."""

from __future__ import annotations

from datetime import timedelta

import pgjobs

app = pgjobs.App()

QUEUE = "cron"


@app.periodic("* * * * * *", name="tick.cron", missed="backfill", args={"label": "cron"})
@app.periodic(
    every=timedelta(seconds=1),
    name="tick.every",
    grace=timedelta(seconds=10),
    args={"label": "every"},
)
@app.task(name="cron.tick", queue=QUEUE)
def tick(label: str) -> str:
    """A periodic job: nothing to do but succeed."""
    return label

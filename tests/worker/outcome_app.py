"""A worker test application whose task asks for an outcome the database cannot store.

Kept apart from ``worker_app`` so that its odd task does not change what the other worker
tests run; ``test_outcome_storage`` starts workers on it.
"""

from __future__ import annotations

import pgjobs

app = pgjobs.App()


@app.task(name="o.snooze_beyond_time", queue="q", max_attempts=3)
def snooze_beyond_time() -> None:
    """Snooze so far that ``now() + delay`` is past PostgreSQL's last timestamp: the
    outcome's own content is unstorable (SQLSTATE 22008, timestamp out of range)."""
    raise pgjobs.Snooze(1e300)

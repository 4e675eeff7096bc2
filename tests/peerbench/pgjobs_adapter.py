"""pgjobs adapter for the peer benchmark harness (../shared/bench, see bench_common.py).

Copied beside the harness by run.sh; the harness runs it with pgjobs' own Python
(``PY_pgjobs``). The worker processes it starts are plain ``pgjobs work`` processes whose
``--app`` is this module.
"""

from __future__ import annotations

import sys
from typing import Any

import bench_common as bc

import pgjobs

DB = "bench_pgjobs"
URL = bc.pg_dsn(DB)

app = pgjobs.App(URL)


@app.task(name="noop", max_attempts=1)
async def noop(p: dict[str, Any]) -> None:
    """The harness's job: record that it ran, once."""
    bc.record(p)


class Adapter:
    """The harness's adapter interface for pgjobs."""

    name = "pgjobs"
    durability = "PG fsync+sync_commit; logged tables"
    default_concurrency = 500

    def __init__(self, args: Any) -> None:
        self.settings = {
            "driver": "psycopg3",
            "concurrency": args.concurrency,
            "claim": "batched to free slots",
            "completion": "batched",
        }

    def version(self) -> str:
        return pgjobs.__version__

    def reset(self) -> None:
        # Imported here: the worker processes import this module as their app, and need
        # no migration machinery.
        from pgjobs import migrate

        app.close()
        bc.recreate_db(DB)
        migrate.upgrade(URL)

    def enqueue_one(self, payload: dict[str, Any]) -> None:
        noop.enqueue(p=payload)

    def enqueue_bulk(self, payloads: list[dict[str, Any]], chunk: int = 10_000) -> None:
        for k in range(0, len(payloads), chunk):
            noop.enqueue_many([{"p": p} for p in payloads[k : k + chunk]])

    def worker_argv(self, concurrency: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pgjobs",
            "--database-url",
            URL,
            "--app",
            "pgjobs_adapter:app",
            "work",
            "--queues",
            "default",
            "--concurrency",
            str(concurrency),
            "--log-level",
            "WARNING",
        ]

    def post_check(self) -> dict[str, str]:
        return {
            "states": bc.psql(
                "SELECT string_agg(state || '=' || c, ',') FROM "
                "(SELECT state, count(*) c FROM pgjobs.jobs GROUP BY 1) s",
                DB,
            )
        }

    def server_pid(self) -> int | None:
        return bc.pg_server_pid()

    def close(self) -> None:
        app.close()


if __name__ == "__main__":
    bc.main(Adapter)

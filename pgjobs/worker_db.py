"""The connections a worker process opens for itself.

Each is autocommit (every worker statement is its own transaction, so none ever holds the
xmin horizon back or sits idle in a transaction), forces READ COMMITTED (the claim and the
fenced writes rely on re-checking rows at lock time; a role defaulting to SERIALIZABLE
would fail them with serialization errors), turns on TCP keepalives (a half-open
connection is noticed instead of waited on forever), and names itself in
``pg_stat_activity.application_name`` (``pgjobs-worker``, ``pgjobs-listener``,
``pgjobs-heartbeat``).

A session of the worker that sits idle inside a transaction for
``IDLE_IN_TRANSACTION_TIMEOUT`` is ended by the server: worker transactions run statement
after statement with no wait in between, so such a session belongs to a frozen process
(SIGSTOP, a paused VM) whose row locks would otherwise hold up every other worker.

The claim connection does not wait for its commits to reach disk
(``synchronous_commit=off``): a claim lost in a server crash only means the job is claimed
again, and the worker that had it cannot record anything for it (its lease token is gone),
which at-least-once execution allows anyway. That takes a WAL flush off the path from
enqueue to start. Outcomes are written durably.

The claim connection also plans its statements once (``plan_cache_mode =
force_generic_plan``): planning the claim costs more than running it, and the plancache
keeps choosing per-execution custom plans for it. Its statements are written so that the
generic plan is the right one for any parameters (see claim_jobs in queries.sql).

Job arguments arrive as jsonb with every claimed job; the worker's connections parse them
with orjson (a quarter of what the json module costs, which was a tenth of the worker's CPU
per job). orjson turns integers beyond 64 bits into floats, so a document with a run of 19
or more digits anywhere goes to the json module, which keeps them exact.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgjobs import database

# See the module docstring; a module attribute so that a test can shorten it.
IDLE_IN_TRANSACTION_TIMEOUT = "10s"


def worker_conninfo(
    url: str,
    name: str,
    *,
    durable: bool = True,
    generic_plans: bool = False,
    lock_timeout: str | None = None,
) -> str:
    """``url`` with the worker's connection settings added (the URL's own options kept);
    ``lock_timeout`` (e.g. ``"2s"``) makes a statement that waits that long for a lock fail
    with ``LockNotAvailable``."""
    params = conninfo_to_dict(url)
    options = str(params.get("options") or "")
    options += f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}"
    if lock_timeout is not None:
        options += f" -c lock_timeout={lock_timeout}"
    if not durable:
        options += " -c synchronous_commit=off"
    if generic_plans:
        options += " -c plan_cache_mode=force_generic_plan"
    params.update(
        application_name=name,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        options=f"{options} -c default_transaction_isolation=read\\ committed".strip(),
    )
    params.setdefault("connect_timeout", database.CONNECT_TIMEOUT)
    return make_conninfo("", **params)


async def connect_async(
    url: str, name: str, *, durable: bool = True, generic_plans: bool = False
) -> psycopg.AsyncConnection[Any]:
    """A new autocommit async connection for the worker."""
    conninfo = worker_conninfo(url, name, durable=durable, generic_plans=generic_plans)
    conn = await database.connect_async(conninfo, autocommit=True)
    conn.adapters.register_loader("jsonb", _JsonbLoader)
    return conn


def connect_sync(
    url: str, name: str, *, lock_timeout: str | None = None
) -> psycopg.Connection[Any]:
    """A new autocommit connection for the worker's threads."""
    return database.connect(worker_conninfo(url, name, lock_timeout=lock_timeout), autocommit=True)


# Every integer orjson may turn into a float has at least 19 digits (|n| >= 2**63).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


class _JsonbLoader(Loader):
    """jsonb (text format) through orjson, loading exactly what the json module loads."""

    def load(self, data: Buffer) -> Any:
        text = bytes(data)
        if _LONG_DIGITS.search(text) is None:
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        return json.loads(text)

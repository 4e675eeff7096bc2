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

Through a transaction pooler (PgBouncer in ``pool_mode = transaction``, see
:func:`pgjobs.database.behind_pooler`) a client's statements run on whichever server
session is free, so none of the above can be a session setting: the connections send no
startup options and prepare nothing (``prepare_threshold=None``); every transaction the
worker opens itself sets its timeouts locally (:func:`local_settings`), and the role's
default isolation must be READ COMMITTED (checked when the worker starts). Claims are then
written durably, and planned per execution.

Job arguments arrive as jsonb with every claimed job; the worker's connections parse them
with orjson (a quarter of what the json module costs, which was a tenth of the worker's CPU
per job). orjson turns integers beyond 64 bits into floats, so a document with a run of 19
or more digits anywhere goes to the json module, which keeps them exact.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgjobs import database

# See the module docstring; a module attribute so that a test can shorten it.
IDLE_IN_TRANSACTION_TIMEOUT = "10s"

# The worker connections that go through a transaction pooler.
_pooled: weakref.WeakSet[Any] = weakref.WeakSet()


def worker_conninfo(
    url: str,
    name: str,
    *,
    durable: bool = True,
    generic_plans: bool = False,
    lock_timeout: str | None = None,
    pooled: bool = False,
) -> str:
    """``url`` with the worker's connection settings added (the URL's own options kept);
    ``lock_timeout`` (e.g. ``"2s"``) makes a statement that waits that long for a lock fail
    with ``LockNotAvailable``. ``pooled``: the URL goes through a transaction pooler, which
    takes no session settings."""
    params = conninfo_to_dict(url)
    # Keepalives only probe an idle connection: one with a statement unacknowledged (a
    # network cut mid-heartbeat) would wait out TCP's retransmissions, ~15 min, and up to
    # 2 min more once the network is back; hence tcp_user_timeout too. The URL may tune
    # them (a failover manager's own figures).
    params.update(database.connection_defaults(url), application_name=name)
    if pooled:
        return make_conninfo("", **params)
    options = str(params.get("options") or "")
    options += f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}"
    if lock_timeout is not None:
        options += f" -c lock_timeout={lock_timeout}"
    if not durable:
        options += " -c synchronous_commit=off"
    if generic_plans:
        options += " -c plan_cache_mode=force_generic_plan"
    params["options"] = f"{options} -c default_transaction_isolation=read\\ committed".strip()
    return make_conninfo("", **params)


async def connect_async(
    url: str, name: str, *, durable: bool = True, generic_plans: bool = False
) -> psycopg.AsyncConnection[Any]:
    """A new autocommit async connection for the worker."""
    pooled = await database.behind_pooler_async(url)
    conninfo = worker_conninfo(
        url, name, durable=durable, generic_plans=generic_plans, pooled=pooled
    )
    conn = await database.connect_async(conninfo, autocommit=True, **_kwargs(pooled))
    conn.adapters.register_loader("jsonb", _JsonbLoader)
    if pooled:
        _pooled.add(conn)
    return conn


def connect_sync(
    url: str, name: str, *, lock_timeout: str | None = None
) -> psycopg.Connection[Any]:
    """A new autocommit connection for the worker's threads."""
    pooled = database.behind_pooler(url)
    conninfo = worker_conninfo(url, name, lock_timeout=lock_timeout, pooled=pooled)
    conn = database.connect(conninfo, autocommit=True, **_kwargs(pooled))
    if pooled:
        _pooled.add(conn)
    return conn


def _kwargs(pooled: bool) -> dict[str, Any]:
    # The next statement may run on another server session, where a statement prepared
    # on this one does not exist.
    return {"prepare_threshold": None} if pooled else {}


def is_pooled(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether this worker connection goes through a transaction pooler."""
    return conn in _pooled


def local_settings_query(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    lock_timeout: str | None = None,
) -> tuple[str, dict[str, str]] | None:
    """The statement that opens a transaction of the worker on a pooled connection with the
    settings a direct connection has for its whole session (None on a direct one): a
    frozen worker's transaction is still ended by the server, a lock wait still bounded."""
    if conn not in _pooled:
        return None
    query = "SELECT set_config('idle_in_transaction_session_timeout', %(idle)s, true)"
    params = {"idle": IDLE_IN_TRANSACTION_TIMEOUT}
    if lock_timeout is not None:
        query += ", set_config('lock_timeout', %(lock)s, true)"
        params["lock"] = lock_timeout
    return query, params


def local_settings(conn: psycopg.Connection[Any], lock_timeout: str | None = None) -> None:
    """Run :func:`local_settings_query` first in a transaction just opened on ``conn``."""
    query = local_settings_query(conn, lock_timeout)
    if query is not None:
        conn.execute(*query)


async def local_settings_async(
    conn: psycopg.AsyncConnection[Any], lock_timeout: str | None = None
) -> None:
    """The async twin of :func:`local_settings`."""
    query = local_settings_query(conn, lock_timeout)
    if query is not None:
        await conn.execute(*query)


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

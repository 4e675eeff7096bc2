"""Payload limits: what JSON cannot carry faithfully is refused with PayloadError, and what
it can is stored exactly.

* nesting deeper than ``MAX_JSON_DEPTH`` levels (arguments, meta, results) is refused,
  never a RecursionError, and the caller's transaction stays usable;
* dict keys must be strings at every depth (json would turn ``1`` into ``"1"`` and let it
  collide with a real ``"1"``);
* every finite float reads back as the same float: jsonb keeps numbers as numeric and
  prints them without an exponent, so ``1e+17`` would come back as an integer.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from typing import Any

import psycopg
import pytest

import pgjobs
from pgjobs.enqueue import MAX_JSON_DEPTH


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` lists: a value ``depth`` levels deep (a bare leaf is 0)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _jobs(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()
    assert row is not None
    return int(row[0])


async def _drain(app: pgjobs.App) -> None:
    # Bounded: a job whose outcome is never recorded would keep a burst worker waiting.
    worker = pgjobs.Worker(app, burst=True, heartbeat_interval=0.5, heartbeat_timeout=3)
    await asyncio.wait_for(worker.run_async(), 60)


@pytest.fixture
def store(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="store", queue="limits")
    def store(doc: Any = None) -> None: ...

    return store


@pytest.fixture
def store_unique(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="store_unique", queue="limits", unique=True)
    def store_unique(doc: Any = None) -> None: ...

    return store_unique


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


DEEP = {
    "5000-deep argument": lambda task, conn: task.enqueue(conn=conn, doc=nested(5000)),
    "5000-deep dict argument": lambda task, conn: task.enqueue(conn=conn, doc=_deep_dict(5000)),
    "5000-deep meta": lambda task, conn: task.enqueue(conn=conn, meta={"m": nested(5000)}),
    "argument one level too deep": lambda task, conn: task.enqueue(
        conn=conn,
        doc=nested(MAX_JSON_DEPTH),  # the arguments object is one more level
    ),
    "5000-deep item of a batch": lambda task, conn: task.enqueue_many(
        [{"doc": 1}, {"doc": nested(5000)}], conn=conn
    ),
}


@pytest.mark.parametrize("case", list(DEEP))
def test_too_deep_is_a_payload_error_and_the_transaction_stays_usable(
    case: str, store: pgjobs.Task[Any, Any], db_url: str, conn: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(db_url) as caller:
        caller.execute("CREATE TEMP TABLE mine (x int)")
        with pytest.raises(pgjobs.PayloadError, match=f"deeper than {MAX_JSON_DEPTH} levels"):
            DEEP[case](store, caller)
        caller.execute("INSERT INTO mine VALUES (1)")  # the transaction is still usable
        store.enqueue(conn=caller, doc="after")
        caller.commit()
    assert _jobs(conn) == 1, "nothing of the refused call was written"


def test_too_deep_with_a_derived_unique_key_is_a_payload_error(
    store_unique: pgjobs.Task[Any, Any], db_url: str
) -> None:
    with psycopg.connect(db_url) as caller:
        with pytest.raises(pgjobs.PayloadError):
            store_unique.enqueue(conn=caller, doc=nested(5000))
        assert caller.execute("SELECT 1").fetchone() == (1,)


def test_nesting_up_to_the_limit_round_trips(app: pgjobs.App, store: pgjobs.Task[Any, Any]) -> None:
    # Levels: the arguments object, MAX_JSON_DEPTH - 3 lists, the leaf's dict and its list.
    doc = nested(MAX_JSON_DEPTH - 3, {"leaf": [1.5]})
    job_id = store.enqueue(doc=doc, meta={"m": nested(MAX_JSON_DEPTH - 1)})
    job = app.get_job(job_id)
    assert job.args == {"doc": doc}
    assert job.meta == {"m": nested(MAX_JSON_DEPTH - 1)}


NON_STR_KEYS = {
    "int key colliding with its string": ({1: "a", "1": "b"}, '["doc"]'),
    "nested int key": ({"a": {"b": {2: "x"}}}, '["doc"]["a"]["b"]'),
    "None key in a list item": ([{"ok": 1}, {None: 2}], '["doc"][1]'),
    "bool key in a tuple": (({True: 1},), '["doc"][0]'),
    "float key": ({1.5: "x"}, '["doc"]'),
}


@pytest.mark.parametrize("case", list(NON_STR_KEYS))
def test_non_string_keys_in_arguments_are_refused_saying_where(
    case: str, store: pgjobs.Task[Any, Any], db_url: str, conn: psycopg.Connection[Any]
) -> None:
    doc, where = NON_STR_KEYS[case]
    with psycopg.connect(db_url) as caller:
        with pytest.raises(pgjobs.PayloadError, match="keys must be strings") as raised:
            store.enqueue(conn=caller, doc=doc)
        assert f"at {where}" in str(raised.value)
        assert caller.execute("SELECT 1").fetchone() == (1,)
    assert _jobs(conn) == 0


def test_non_string_keys_at_the_top_level_are_refused(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    @app.task(name="anything", queue="limits")
    def anything(**kwargs: Any) -> None: ...

    with psycopg.connect(db_url) as caller:
        with pytest.raises(pgjobs.PayloadError, match="keys must be strings"):
            app.enqueue("anything", {1: "a", "1": "b"}, conn=caller)
        with pytest.raises(pgjobs.PayloadError, match=r"job metadata.*keys must be strings"):
            anything.enqueue(conn=caller, meta={1: "a", "1": "b"})
        with pytest.raises(pgjobs.PayloadError, match=r'at \["m"\]\[0\]'):
            anything.enqueue(conn=caller, meta={"m": [{2: "x"}]})
        assert caller.execute("SELECT 1").fetchone() == (1,)
    assert _jobs(conn) == 0


async def test_results_that_cannot_be_stored_end_the_job_dead_with_the_error(
    app: pgjobs.App,
) -> None:
    @app.task(name="colliding_keys", queue="results", max_attempts=3)
    async def colliding_keys() -> dict[Any, str]:
        return {1: "a", "1": "b"}

    @app.task(name="deep_keys", queue="results", max_attempts=3)
    def deep_keys() -> list[Any]:
        return [{"fine": {7: "x"}}]

    @app.task(name="too_deep", queue="results", max_attempts=3)
    async def too_deep() -> Any:
        return nested(5000)

    ids = [colliding_keys.enqueue(), deep_keys.enqueue(), too_deep.enqueue()]
    await _drain(app)
    messages = []
    for job_id in ids:
        job = await app.get_job_async(job_id)
        assert (job.state, job.attempts, job.result) == ("dead", 1, None)
        (error,) = job.errors
        assert error["type"] == "pgjobs.errors.PayloadError"
        assert error["message"].startswith("the job's result cannot be stored: job results")
        messages.append(error["message"])
    assert "key 1 (int)" in messages[0] and "keys must be strings" in messages[0]
    assert 'at [0]["fine"]' in messages[1]
    assert f"deeper than {MAX_JSON_DEPTH} levels" in messages[2]


def _random_floats(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    floats = [
        # Edges: the report's value, around 1e16 (where repr switches to an exponent),
        # the largest and smallest (subnormal) floats, and negative ones.
        -2.4451754014806947e17,
        1e16,
        9999999999999998.0,
        1.0000000000000002e16,
        1e17,
        -1e17,
        1e22,
        1e23,
        123456789012345680.0,
        2.0**63,
        2.0**64,
        1e308,
        -1e308,
        1.7976931348623157e308,
        5e-324,
        -5e-324,
        2.2250738585072014e-308,
        1e-5,
        0.1,
        1.5,
        0.0,
    ]
    while len(floats) < count:
        # Random bit patterns cover every exponent; scaled uniforms cover "human" values.
        if rng.random() < 0.5:
            value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        else:
            value = rng.uniform(-10, 10) * 10.0 ** rng.randint(-30, 30)
        if math.isfinite(value) and value != 0.0:
            floats.append(value)
    return floats


async def test_every_finite_float_round_trips_exactly(app: pgjobs.App) -> None:
    floats = _random_floats(3000, seed=15)
    text_lookalikes = {"s": "1e+17", "q": 'say "2e+20" and \\"3e+21', "k1e+5": [1e300]}

    @app.task(name="echo_floats", queue="floats")
    async def echo_floats(values: list[float], extra: dict[str, Any]) -> dict[str, Any]:
        # What the worker hands the handler: every value a float, bit for bit.
        return {
            "hex": [v.hex() if type(v) is float else repr(v) for v in values],
            "values": values,
            "extra": extra,
        }

    chunks = [floats[i : i + 500] for i in range(0, len(floats), 500)]
    ids = [echo_floats.enqueue(values=chunk, extra=text_lookalikes) for chunk in chunks]
    ids.append(
        echo_floats.enqueue(
            values=[], extra={"big_int": 10**20, "neg_int": -(10**30)}, meta={"f": 1e17}
        )
    )
    await _drain(app)
    for job_id, chunk in zip(ids, chunks, strict=False):
        job = await app.get_job_async(job_id)
        assert job.state == "succeeded", job.errors
        # Read back by get_job (the json module) ...
        assert [v.hex() for v in job.args["values"]] == [v.hex() for v in chunk]
        assert all(type(v) is float for v in job.args["values"])
        assert job.args["extra"] == text_lookalikes, "exponents in strings are left alone"
        # ... by the worker (orjson, or json for long digit runs), and stored as a result.
        assert job.result["hex"] == [v.hex() for v in chunk]
        assert [v.hex() for v in job.result["values"]] == [v.hex() for v in chunk]
        assert job.result["extra"] == text_lookalikes
    last = await app.get_job_async(ids[-1])
    assert last.args["extra"] == {"big_int": 10**20, "neg_int": -(10**30)}
    assert type(last.meta["f"]) is float and last.meta["f"] == 1e17

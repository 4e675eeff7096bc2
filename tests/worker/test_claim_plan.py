"""The claim's generic plan stays an index plan.

Workers run the claim as a generic prepared plan (``plan_cache_mode=force_generic_plan`` on
the claim connection: no planning per claim). A generic plan cannot look at the parameters,
so a join between the claimed ids and ``jobs`` could be planned as a merge or hash join over
the whole table (it once merge-joined a 200k-row backlog: 80 ms per claim). This pins the
plan shape on a table with finished history and a backlog.
"""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg

from pgjobs.queries import Queries


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


def _prepare_claim(conn: psycopg.Connection[Any]) -> None:
    text = Queries("pgjobs").claim_jobs.as_string(conn)
    numbered = {"queues": "$1", "limit": "$2", "worker": "$3", "events": "$4",
                "events_channel": "$5", "start": "$6"}  # fmt: skip
    text = re.sub(r"%\((\w+)\)[sb]", lambda m: numbered[m.group(1)], text)
    conn.execute(f"PREPARE claim(text[], int, text, bool, text, int) AS {text}")


def test_generic_claim_plan_never_scans_or_merges_the_jobs_table(
    conn: psycopg.Connection[Any],
) -> None:
    conn.execute(
        """
        INSERT INTO pgjobs.jobs (queue, task, state, finished_at, started_at)
        SELECT 'q', 't', 'succeeded', now(), now() FROM generate_series(1, 30000);
        INSERT INTO pgjobs.jobs (queue, task) SELECT 'q', 't' FROM generate_series(1, 20000);
        ANALYZE pgjobs.jobs;
        """
    )
    conn.execute("SET plan_cache_mode = force_generic_plan")
    _prepare_claim(conn)
    for limit in (1, 100):
        # EXECUTE is a utility statement: its arguments are literals, not bound parameters.
        row = conn.execute(
            "EXPLAIN (FORMAT JSON) "
            f"EXECUTE claim('{{q,other}}', {limit:d}, 'w', false, 'c', {limit:d})"
        ).fetchone()
        assert row is not None
        plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
        nodes = _nodes(plan[0]["Plan"])
        # A partitioned table (PGJOBS_TEST_PARTITIONED=1) is read in jobs_current alone.
        read = {"jobs", "jobs_current"}
        assert not [n for n in nodes if str(n.get("Relation Name")).startswith("jobs_until_")]
        on_jobs = [n for n in nodes if n.get("Relation Name") in read]
        assert on_jobs, "the plan does not read jobs at all?"
        assert not [n for n in on_jobs if n["Node Type"] == "Seq Scan"], json.dumps(plan)
        # Joins over small inputs (the paused-queues anti-join) are fine; a join that reads
        # jobs on one side is the full-table plan this test guards against.
        bulk_joins = [
            n
            for n in nodes
            if n["Node Type"] in ("Merge Join", "Hash Join")
            and any(m.get("Relation Name") in read for m in _nodes(n))
        ]
        assert not bulk_joins, json.dumps(plan)
        used = {n.get("Index Name") for n in on_jobs}
        assert {"jobs_runnable_idx", "jobs_pkey"} <= used, used
    # And the prepared claim still claims what it should under that plan.
    claimed = conn.execute("EXECUTE claim('{q}', 5, 'w', false, 'c', 5)").fetchall()
    assert len([r for r in claimed if r[0] is not None]) == 5

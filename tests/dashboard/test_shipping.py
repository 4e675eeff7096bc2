"""The dashboard's templates and static files are declared as package data, so the
wheel carries every one of them (the wheel itself is built in tests/test_packaging.py)."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_template_and_static_file_is_package_data() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pgjobs.dashboard" in setuptools["packages"]
    patterns = setuptools["package-data"]["pgjobs.dashboard"]
    package = ROOT / "pgjobs" / "dashboard"
    files = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert any(name.startswith("templates/") for name in files)
    assert any(name.startswith("static/") for name in files)
    unshipped = [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)]
    assert not unshipped

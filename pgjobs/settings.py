"""Names and settings pgjobs accepts, validated before they reach SQL."""

from __future__ import annotations

import os
import re

from pgjobs.errors import InvalidNameError

DEFAULT_SCHEMA = "pgjobs"
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 20
PRIORITY_MIN, PRIORITY_MAX = -100, 100

DATABASE_URL_ENV = "PGJOBS_DATABASE_URL"
LISTEN_URL_ENV = "PGJOBS_LISTEN_URL"
SCHEMA_ENV = "PGJOBS_SCHEMA"
APP_ENV = "PGJOBS_APP"

# Lower-case only: PostgreSQL folds unquoted identifiers, and a schema that needs quoting in
# every psql session is a trap for operators. 48 bytes leaves room for the channel prefix.
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
# Queue names travel as values (never identifiers), but they appear in CLIs, URLs and logs.
_QUEUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
_TASK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:<>-]{0,254}$")


def validate_schema(name: str) -> str:
    """Return ``name`` if it is an acceptable schema name, else raise InvalidNameError."""
    if not isinstance(name, str) or not _SCHEMA.match(name):
        raise InvalidNameError(
            f"invalid schema name {name!r}: use 1-48 lower-case letters, digits and "
            "underscores, starting with a letter or underscore"
        )
    return name


def validate_queue(name: str) -> str:
    """Return ``name`` if it is an acceptable queue name, else raise InvalidNameError."""
    if not isinstance(name, str) or not _QUEUE.match(name):
        raise InvalidNameError(
            f"invalid queue name {name!r}: use 1-128 letters, digits and _ . : -, "
            "starting with a letter, digit or underscore"
        )
    return name


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is an acceptable task name, else raise InvalidNameError."""
    if not isinstance(name, str) or not _TASK.match(name):
        raise InvalidNameError(
            f"invalid task name {name!r}: use up to 255 letters, digits and _ . : - < >, "
            "starting with a letter or underscore"
        )
    return name


def schema_from_env() -> str:
    """The schema named by PGJOBS_SCHEMA, or the default."""
    return validate_schema(os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA)


def channel_for(schema: str) -> str:
    """The NOTIFY channel of one pgjobs schema: one per schema, so two installations in
    one database never wake each other's workers."""
    return f"pgjobs_{validate_schema(schema)}"


def events_channel_for(schema: str) -> str:
    """The channel of job events (opt-in, see pgjobs.events): at most 7 + 48 + 7 = 62
    bytes, within PostgreSQL's 63-byte identifier limit."""
    return channel_for(schema) + "_events"


def control_channel_for(schema: str) -> str:
    """The channel on which workers are told to stop a job (a cancelled running job):
    ``{"cancel": [ids], "worker": id}``."""
    return channel_for(schema) + "_control"


def events_application_name(schema: str) -> str:
    """The application_name an events subscriber connects with: workers look for a session
    with this name and publish events only while one exists."""
    return f"pgjobs-events:{validate_schema(schema)}"

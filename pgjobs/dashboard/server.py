"""``pgjobs dashboard``: serve the dashboard with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os

from pgjobs.app import App
from pgjobs.dashboard.security import Auth

log = logging.getLogger("pgjobs.dashboard")

TOKEN_ENV = "PGJOBS_DASHBOARD_TOKEN"
PASSWORD_ENV = "PGJOBS_DASHBOARD_PASSWORD"
USER_ENV = "PGJOBS_DASHBOARD_USER"
# Open event streams are closed this long after a stop request (they never end on their own).
_SHUTDOWN_GRACE = 2


def auth_from_env() -> Auth | None:
    """Credentials from PGJOBS_DASHBOARD_TOKEN and/or PGJOBS_DASHBOARD_PASSWORD (user
    PGJOBS_DASHBOARD_USER, default 'pgjobs'); None when neither is set."""
    token = os.environ.get(TOKEN_ENV) or None
    password = os.environ.get(PASSWORD_ENV) or None
    if token is None and password is None:
        return None
    return Auth(username=os.environ.get(USER_ENV) or "pgjobs", password=password, token=token)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: App, *, host: str, port: int, read_only: bool, auth: Auth | None) -> None:
    """Serve the dashboard of ``app`` until interrupted."""
    import uvicorn

    from pgjobs.dashboard.web import create_app

    if auth is None and not _is_loopback(host):
        log.warning(
            "the dashboard listens on %s without a login: set %s or %s",
            host,
            TOKEN_ENV,
            PASSWORD_ENV,
        )
    app.database_url  # noqa: B018 - resolve (or start the embedded server) before serving
    web = create_app(app, read_only=read_only, auth=auth)
    mode = " (read-only)" if read_only else ""
    log.info("dashboard%s on http://%s:%d/", mode, host, port)
    uvicorn.run(
        web,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=_SHUTDOWN_GRACE,
    )

"""The web dashboard: queues, jobs, the dead-letter queue and workers, live over
server-sent events, with Prometheus ``/metrics``.

Needs the ``dashboard`` extra (``pip install 'pgjobs[dashboard]'``). Serve it with
``pgjobs dashboard`` or mount :func:`create_app` in an ASGI application;
:func:`progress_app` streams one job's progress to an application's own users.
"""

from __future__ import annotations

from pgjobs.errors import ConfigurationError

try:
    import jinja2  # noqa: F401
    import python_multipart  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError(
        f"the dashboard needs its extra: pip install 'pgjobs[dashboard]' ({exc})"
    ) from exc

from pgjobs.dashboard.security import Auth
from pgjobs.dashboard.web import create_app, progress_app

__all__ = ["Auth", "create_app", "progress_app"]

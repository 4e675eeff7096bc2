"""The dashboard's guards: who may see it (basic auth or a token), which POSTs are genuine
(CSRF), and which identifiers from a URL are acceptable."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pgjobs.admin import InvalidStateError, parse_state
from pgjobs.errors import InvalidNameError
from pgjobs.settings import validate_queue, validate_task_name

CSRF_COOKIE = "pgjobs_csrf"
CSRF_FIELD = "csrf_token"
_BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Auth:
    """Credentials the dashboard asks for. ``password`` enables HTTP basic auth (as
    ``username``); ``token`` is accepted as ``Authorization: Bearer <token>`` (scripts,
    Prometheus) and as the basic-auth password under any user name (browsers)."""

    username: str = "pgjobs"
    password: str | None = None
    token: str | None = None

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries acceptable credentials."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token:
            return _same(value.strip(), self.token)
        if scheme != "basic":
            return False
        user, password = _basic(value.strip())
        if password is None:
            return False
        if self.token and _same(password, self.token):
            return True
        if self.password is None:
            return False
        # Both compared, always: the time taken tells nothing about which one was wrong.
        return _same(user or "", self.username) & _same(password, self.password)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic(value: str) -> tuple[str | None, str | None]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, None)


class AuthMiddleware:
    """Answers 401 to every HTTP request without acceptable credentials."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.auth.allows(Headers(scope=scope).get("authorization")):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "pgjobs dashboard: log in first\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="pgjobs", charset="UTF-8"'},
        )
        await response(scope, receive, send)


class Csrf:
    """CSRF tokens bound to a per-browser cookie: the cookie holds a random nonce, forms
    carry ``HMAC(secret, nonce)``. A forged cross-site form has neither the nonce (the
    cookie is SameSite=Strict and HttpOnly) nor the means to compute its token."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def token_for(self, nonce: str) -> str:
        """The form token of one browser's nonce."""
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()

    def nonce(self, request: Request) -> tuple[str, bool]:
        """This browser's nonce, and whether it is new (to be set as a cookie)."""
        existing = request.cookies.get(CSRF_COOKIE, "")
        if 16 <= len(existing) <= 128 and existing.isalnum():
            return existing, False
        return secrets.token_hex(16), True

    def check(self, request: Request, form_token: Any) -> None:
        """403 unless the request is same-origin and carries this browser's token."""
        if not _same_origin(request):
            raise HTTPException(403, "cross-site request refused")
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or not isinstance(form_token, str):
            raise HTTPException(403, "missing CSRF token: reload the page and try again")
        if not _same(form_token, self.token_for(nonce)):
            raise HTTPException(403, "invalid CSRF token: reload the page and try again")


def _same_origin(request: Request) -> bool:
    # Browsers say where a request comes from; anything but the dashboard's own origin is
    # refused (requests without these headers, e.g. from scripts, still need the token).
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.url.scheme}://{request.url.netloc}"


# -- identifiers from URLs ----------------------------------------------------------------


def job_id(value: Any) -> int:
    """A job id from a path or form: a positive bigint, else 404."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise HTTPException(404, "no such job") from None
    if not 1 <= number <= _BIGINT_MAX:
        raise HTTPException(404, "no such job")
    return number


def optional_id(value: str | None, name: str) -> int | None:
    """A keyset cursor (``before``/``after``): empty is None, anything else a bigint."""
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a job id") from None
    if not 0 <= number <= _BIGINT_MAX:
        raise HTTPException(400, f"{name} must be a job id")
    return number


def state_filter(value: str | None) -> str | None:
    """A job state filter, validated; 400 for an unknown state."""
    if not value:
        return None
    try:
        return parse_state(value).value
    except InvalidStateError as exc:
        raise HTTPException(400, str(exc)) from None


def queue_name(value: str | None) -> str | None:
    """A queue name (filter or path), validated; 400 for an invalid one."""
    if not value:
        return None
    try:
        return validate_queue(value)
    except InvalidNameError as exc:
        raise HTTPException(400, str(exc)) from None


def task_name(value: str | None) -> str | None:
    """A task name filter, validated; 400 for an invalid one."""
    if not value:
        return None
    try:
        return validate_task_name(value)
    except InvalidNameError as exc:
        raise HTTPException(400, str(exc)) from None

"""Callers of a gateway's admin API: read the live routes, flip one (no reload, no dropped connection).

    set_route("http://127.0.0.1:8081", "unlearned", "unlearned_green", key)
    routes("http://127.0.0.1:8081", key)   # {"unlearned": "unlearned_green"}

The gateway answers a PUT only after the new route is in routes.json (it survives a
restart) and in the shared dict (the very next request of every worker uses it), so
when set_route returns, every request sent from then on goes to `upstream`. The
key defaults to $FV_ADMIN_KEY. Every failure is a ServerError that says what the
gateway answered (a wrong key, a route its config does not allow, an unknown model)
or that it did not answer.
"""

from __future__ import annotations

import http.client
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.triton.control import ADMIN_HEADER, KEY_ENV

ROUTES_PATH = "/fv/routes"
DEFAULT_TIMEOUT_S = 10.0
# What an HTTP header value carries unchanged (and what a key from secrets.token_urlsafe is made of).
_KEY = re.compile(r"[\x21-\x7e]{1,4096}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_key(key: str) -> str:
    """`key` if it can travel in an HTTP header as is; InvalidInputError (without the key) otherwise."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidInputError(
            "the admin key must be 1-4096 printable ASCII characters without spaces (it travels in the "
            f"{ADMIN_HEADER} header)"
        )
    return key


def set_route(
    admin_url: str, public: str, upstream: str, key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Route public model `public` to Triton model `upstream` at the gateway whose admin listener is `admin_url`.

    Returns once the gateway has stored and applied the route; ServerError if it refused or did not answer.
    """
    for what, name in (("public model", public), ("upstream model", upstream)):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(f"{what} must be a model name (letters, digits, '_', '.', '-'), got {name!r}")
    answer = _call(admin_url, "PUT", f"{ROUTES_PATH}/{public}", key, timeout_s, {"upstream": upstream})
    table = answer.get("routes")
    if not isinstance(table, dict) or table.get(public) != upstream:
        raise ServerError(f"the gateway at {admin_url} answered the route change {public} -> {upstream} with {answer}")


def routes(admin_url: str, key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str]:
    """The live routes (public model -> Triton model) of the gateway whose admin listener is `admin_url`."""
    answer = _call(admin_url, "GET", ROUTES_PATH, key, timeout_s)
    table = answer.get("routes")
    if not isinstance(table, dict):
        raise ServerError(f"the gateway at {admin_url} answered GET {ROUTES_PATH} without routes: {answer}")
    return {str(k): str(v) for k, v in table.items()}


def _call(
    admin_url: str, method: str, path: str, key: str | None, timeout_s: float, body: Any = None
) -> dict[str, Any]:
    if key is None:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise ServerError(f"no admin key for the gateway at {admin_url}: pass one or set ${KEY_ENV}")
    check_key(key)
    parts = urlsplit(admin_url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidInputError(f"the gateway's admin URL must be http://HOST:PORT, got {admin_url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise InvalidInputError(f"the gateway's admin URL must be http://HOST:PORT, got {admin_url!r}") from None
    payload = json.dumps(body).encode() if body is not None else None
    headers = {ADMIN_HEADER: key, "Accept": "application/json"}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"the gateway's admin API at {admin_url} did not answer {method} {path}: {exc}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ServerError(
            f"the gateway's admin API at {admin_url} answered {method} {path} with {status} and no JSON object: "
            f"{raw[:200]!r}"
        )
    if status != 200:
        message = answer.get("error", answer)
        why = {401: "no key was accepted", 403: "the key was refused"}.get(status, "refused")
        raise ServerError(f"the gateway at {admin_url} {why}: {method} {path} answered {status}: {message}")
    return answer

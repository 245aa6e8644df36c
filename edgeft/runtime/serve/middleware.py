"""The HTTP edge every route shares: middleware, reading a body, and errors turned into answers.

``EdgeMiddleware`` gives each request an id, checks the bearer key on ``/v1`` (and
``/metrics``), answers 503 past ``--max-connections`` (except ``/health`` and ``/metrics``:
the connection layer, ``process``, marks such a request ``SATURATED``), counts it in the
metrics and writes one access-log line (control characters escaped, so a request cannot
forge a line); a request still running at the drain timeout is counted and logged as
``shutdown``, not as a 500. ``api`` wraps a
route so that the errors a request can cause (``ApiError``, ``Overloaded``, the engine's
``EdgeftError``, a client that hung up) become OpenAI-style bodies, never a 500;
``read_json`` reads a body within its size limit. The exception handlers answer what
Starlette raises itself (404, 405) in the same shape. This module knows HTTP (Starlette)
and the settings; it knows nothing of models, engines or the request fields.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from edgeft.errors import EdgeftError
from edgeft.runtime.batching import Overloaded
from edgeft.runtime.serve.state import ServerState
from edgeft.runtime.serve.wire import ApiError, bad

log = logging.getLogger("edgeft.serve")
access_log = logging.getLogger("edgeft.access")

CLIENT_CLOSED = 499  # nginx's "client closed request": no one reads this response
SHUTDOWN = "shutdown"  # the status label of a request cancelled at the drain timeout (not a 5xx)
SATURATED = "edgeft.saturated"  # a scope extension: this request came past --max-connections
ALWAYS_ANSWERED = ("/health", "/metrics")  # answered even past --max-connections


def printable(text: str) -> str:
    """``text`` with what is not printable escaped (CR, LF, ESC, the other controls, line separators,
    bidi overrides: ``\\n`` becomes ``\\x0a``) and ``\\`` doubled, so one log line stays one honest line."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    return "\\\\" if c == "\\" else f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_unicode(body: Any) -> None:
    """Refuse a body holding a string UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``).

    JSON allows ``\\ud800`` escapes, Python decodes them into unencodable strings, and the
    tokenizers (and the response writer) would fail on them later: one 400 here instead.
    Walks the body without recursion, so any nesting the JSON parser accepted is fine.
    """
    todo = [("", body)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, dict):
            todo.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
            todo.extend((where, k) for k in v)
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                name = where.split(".")[0].split("[")[0] or None
                raise bad(f"'{where or 'body'}' holds a lone UTF-16 surrogate: not valid Unicode text",
                          name, "invalid_unicode") from None


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, within ``limit`` bytes (413 past it, 400 if not JSON)."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad("invalid Content-Length header")
        if int(declared) > limit:
            raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    try:
        body = json.loads(bytes(buf), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_unicode(body)
    return body


async def request_body(request: Request) -> tuple[ServerState, dict[str, Any]]:
    """The app's state, once it is serving, and the request's JSON body (within ``--max-body-bytes``)."""
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    return state, await read_json(request, state.config.max_body_bytes)


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def api(handler: Callable) -> Callable:
    """Turn the errors a request can cause into OpenAI-style bodies; never a 500 for bad input."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return client_left(request)
        except ApiError as exc:
            return error_response(exc)
        except Overloaded as exc:
            return error_response(ApiError(429, str(exc), type="rate_limit_error", code="queue_full"))
        except EdgeftError as exc:  # the engine refused the input (context, template...)
            return error_response(bad(str(exc)))

    wrapped.__name__ = handler.__name__
    return wrapped


def client_left(request: Request) -> Response:
    """A client that hung up before its body arrived: a client event, not a server error."""
    state: ServerState = request.app.state.edgeft
    state.metrics.disconnects.inc(route=state.route_label(request.url.path))
    log.info("client left before sending its whole request on %s", printable(request.url.path))
    return Response(status_code=CLIENT_CLOSED)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


async def _disconnected(request: Request, exc: Exception) -> Response:
    return client_left(request)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s: %s", printable(request.url.path), exc, exc_info=exc)
    return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)


EXCEPTION_HANDLERS = {HTTPException: _http_error, ClientDisconnect: _disconnected, Exception: _server_error}


def bearer_token(header: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header; the scheme is case-insensitive (RFC 9110)."""
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class EdgeMiddleware:
    """Request ids, bearer-key checks on /v1 (and /metrics), request metrics and one access-log line per request."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        cfg = state.config
        self.keys = [cfg.api_key.encode()] if cfg.api_key else []
        self.metrics_keys = [k.encode() for k in (cfg.metrics_key, cfg.api_key) if k]

    def _unauthorized(self, path: str, headers: dict[bytes, bytes]) -> str | None:
        """Why this request may not pass (a message for the 401), or None."""
        if path.startswith("/v1"):
            keys, what = self.keys, "API key"
        elif path == "/metrics":
            keys, what = self.metrics_keys, "metrics key" if self.state.config.metrics_key else "API key"
        else:
            return None
        if not keys:
            return None
        token = bearer_token(headers.get(b"authorization", b"")) or headers.get(b"x-api-key", b"").strip() or None
        # compare with every key (no early exit) so the time taken says nothing about which one was close
        ok = [hmac.compare_digest(token or b"", k) for k in keys]
        return None if token is not None and any(ok) else \
            f"missing or incorrect {what}: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path = time.perf_counter(), scope["path"]
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status: int | str = 500
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            refused = self._unauthorized(path, headers)
            if refused is not None:
                err = ApiError(401, refused, code="invalid_api_key")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_with_id)
            elif path not in ALWAYS_ANSWERED and (scope.get("extensions") or {}).get(SATURATED):
                await error_response(ApiError(
                    503, f"the server has {self.state.config.max_connections} connections open, its limit "
                    "(--max-connections): retry shortly", type="server_error", code="server_busy",
                ))(scope, receive, send_with_id)
            else:
                with self.state.hold():  # the models it uses count it in flight (unloading waits for it)
                    await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            await _end_at_shutdown(send_with_id, started)
            status = SHUTDOWN  # uvicorn cancels what still runs at --drain-timeout: shutdown, not a server error
        finally:
            self._record(scope, path, status, time.perf_counter() - t0, rid)

    def _record(self, scope: dict, path: str, status: int | str, seconds: float, rid: str) -> None:
        route, method = self.state.route_label(path), scope.get("method", "")
        self.state.metrics.requests.inc(route=route, method=method, status=str(status))
        self.state.metrics.latency.observe(seconds, route=route)
        if path in ALWAYS_ANSWERED and status == 200:
            return  # probes and scrapes would drown the log
        client = scope.get("client") or ("", 0)
        access_log.info("%s %s %s %.1fms", printable(method), printable(path), status, seconds * 1000,
                        extra={"fields": {"method": method, "path": path, "status": status,
                                          "ms": round(seconds * 1000, 2), "request_id": rid, "client": client[0]}})


async def _end_at_shutdown(send: Callable, started: bool) -> None:
    """Answer a request cut off by the drain timeout: a 503 body if nothing was sent yet, else end the stream."""
    log.warning("a request was still running at the drain timeout: cancelled by shutdown")
    try:
        if not started:
            err = ApiError(503, "the server shut down before this request finished (--drain-timeout)",
                           type="server_error", code="shutting_down")
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": json.dumps(err.body()).encode()})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # the connection is going away too: nothing more to tell the client
        pass

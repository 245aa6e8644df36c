"""The server process: logging, the listening socket, uvicorn, its connections, and SIGTERM's drain.

``serve`` checks the artifacts (and their signatures) before it listens, binds the socket
(one clear line when the port is taken), runs uvicorn over ``build_app`` and exits 0 after
SIGTERM or SIGINT once the requests in flight finish (up to ``--drain-timeout``).

Connections go through ``GuardedH11``, uvicorn's HTTP/1.1 protocol with two guards, so idle
sockets cannot take the server offline: a read deadline (``--header-timeout`` for a request's
headers, again for its body; a connection that misses it is closed) and a cap per client
address (``--max-connections-per-client``; past it a connection is answered 429 with an error
body and closed, without reaching the app). Past ``--max-connections`` open connections the
app answers 503 to everything but ``/health`` and ``/metrics`` (``saturation_gate``). This
module knows uvicorn, h11, sockets, signals and logging; nothing of routes or models.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeft.errors import EdgeftError
from edgeft.runtime.serve.app import build_app
from edgeft.runtime.serve.middleware import SATURATED
from edgeft.runtime.serve.state import ServerState
from edgeft.runtime.serve.wire import ApiError
from edgeft.serve_config import LogFormat, ServeConfig

log = logging.getLogger("edgeft.serve")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # --log-format text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
             "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        d.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str, ensure_ascii=False)


def configure_logging(fmt: LogFormat, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.json else
                         logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ConnectionGuard:
    """The open connections, in all and per client address, and the limits ``GuardedH11`` holds them to."""

    def __init__(self, limit: int, per_client: int, read_timeout: float) -> None:
        self.limit, self.per_client, self.read_timeout = limit, per_client, read_timeout
        self.open = 0
        self.by_client: collections.Counter[str] = collections.Counter()
        self._last_warning = -1e9

    @property
    def saturated(self) -> bool:
        return self.open > self.limit

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``, or refuse it (False) when that address is at its cap."""
        if self.per_client and self.by_client[client] >= self.per_client:
            now = time.monotonic()
            if now - self._last_warning > 10:  # one line per 10 s, however many sockets an attacker opens
                self._last_warning = now
                log.warning("refusing connections from %s: it holds %d, the --max-connections-per-client",
                            client, self.per_client)
            return False
        self.by_client[client] += 1
        self.open += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def refusal(self) -> bytes:
        """The whole HTTP answer to a connection over its address's cap: 429 with an OpenAI-style body."""
        err = ApiError(429, f"this address already has {self.per_client} open connections, the server's cap "
                       "(--max-connections-per-client): reuse or close them", type="rate_limit_error",
                       code="too_many_connections")
        body = json.dumps(err.body()).encode()
        head = ("HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
        return head.encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a read deadline and a cap per client address (``ConnectionGuard``).

    The deadline runs while the connection waits for a request's headers (from the moment it
    opens, or the previous response ends) and again while it waits for the body; the app's
    own time is not limited. A refused connection gets the 429 at once, then a half-close:
    its request is read and dropped (so the client reads the answer rather than a reset)
    until it hangs up or ``LINGER_S`` passes.
    """

    guard: ConnectionGuard  # set per server by ``protocol_for``
    LINGER_S = 2.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None
        peer = transport.get_extra_info("peername")
        self._addr = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        self._admitted = self.guard.admit(self._addr)
        if not self._admitted:
            self.transport = transport
            transport.write(self.guard.refusal())
            if transport.can_write_eof():
                transport.write_eof()
            self._deadline = self.loop.call_later(min(self.LINGER_S, self.guard.read_timeout), transport.close)
            return
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # the refused connection's request: read and dropped
        super().data_received(data)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._admitted:
            return
        self.guard.release(self._addr)
        super().connection_lost(exc)

    def _reading(self) -> str | None:
        """What the connection waits for from the client: "headers", "body", or None (the app has the request)."""
        theirs = self.conn.their_state
        return "headers" if theirs is h11.IDLE else "body" if theirs is h11.SEND_BODY else None

    def _arm(self) -> None:
        """Start the deadline when the connection starts waiting for headers or a body; stop it when not."""
        waiting_for = self._reading()
        if waiting_for == self._waiting_for:
            return  # still waiting for the same thing: the deadline set when it began still holds
        self._disarm()
        self._waiting_for = waiting_for
        if waiting_for is not None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.guard.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        log.debug("closing a connection from %s: no complete request %s within %gs (--header-timeout)",
                  self._addr, self._waiting_for, self.guard.read_timeout)
        self.transport.close()


def protocol_for(guard: ConnectionGuard) -> type[GuardedH11]:
    """``GuardedH11`` bound to one server's guard (uvicorn builds one protocol object per connection)."""
    return type("GuardedH11", (GuardedH11,), {"guard": guard})


def saturation_gate(app: Callable, guard: ConnectionGuard) -> Callable:
    """Mark a request that arrives past ``--max-connections`` (``SATURATED``); the middleware answers it 503."""

    async def gate(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and guard.saturated:
            scope["extensions"] = {**(scope.get("extensions") or {}), SATURATED: True}
        await app(scope, receive, send)

    return gate


def make_server(config: ServeConfig, app: Starlette) -> uvicorn.Server:
    """uvicorn over ``app`` with the connection guards, draining on SIGTERM/SIGINT (``server.run(sockets=...)``)."""

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that SIGTERM/SIGINT mark the app draining and the process then exits 0."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state: ServerState = app.state.edgeft
            if not state.draining:
                log.info("received %s: draining in-flight requests (up to %gs)",
                         signal.Signals(sig).name, config.drain_timeout)
            state.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    guard = ConnectionGuard(config.max_connections, config.max_connections_per_client, config.header_timeout)
    uv = uvicorn.Config(saturation_gate(app, guard), host=config.host, port=config.port, log_config=None,
                        access_log=False, log_level=config.log_level.lower(), http=protocol_for(guard),
                        timeout_graceful_shutdown=config.drain_timeout, server_header=False, lifespan="on")
    return DrainingServer(uv)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (port in use, address not here...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EdgeftError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = ": choose another --port or stop what holds it" if exc.errno == errno.EADDRINUSE else ""
        raise EdgeftError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def _auth_note(config: ServeConfig) -> str:
    if config.api_key:
        return ", API key required on /v1" + (", metrics key on /metrics" if config.metrics_key else " and /metrics")
    return ", metrics key required on /metrics" if config.metrics_key else ""


def _check_artifacts(config: ServeConfig) -> None:
    for path in config.artifacts:
        if not path.exists():
            raise EdgeftError(f"{path} does not exist")
    if config.trusted_keys:  # a wrong key or an unsigned artifact fails before listening
        from edgeft.artifact import check_header
        from edgeft.signing import load_trusted_keys

        keys = load_trusted_keys(config.trusted_keys)
        for path in config.artifacts:
            check_header(path, keys)


def serve(config: ServeConfig) -> None:
    """Run the server until SIGTERM/SIGINT; raise ``EdgeftError`` if the port or the models cannot be had."""
    _check_artifacts(config)
    configure_logging(config.log_format, config.log_level)
    sock = bind(config.host, config.port)
    app = build_app(config)
    state: ServerState = app.state.edgeft
    server = make_server(config, app)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    port = sock.getsockname()[1]
    log.info("listening on http://%s:%d (models load in the background; /health says when ready)%s",
             config.host, port, _auth_note(config))
    with sock:
        server.run(sockets=[sock])
    if state.failed:
        raise EdgeftError(f"could not load the models: {state.failed}")

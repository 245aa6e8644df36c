"""The server process: logging, the listening socket, uvicorn, and SIGTERM's drain.

``serve`` checks the artifacts (and their signatures) before it listens, binds the socket
(one clear line when the port is taken), runs uvicorn over ``build_app`` and exits 0 after
SIGTERM or SIGINT once the requests in flight finish (up to ``--drain-timeout``). This
module knows uvicorn, sockets, signals and logging; nothing of routes or models.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import sys
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette

from edgeft.errors import EdgeftError
from edgeft.runtime.serve.app import build_app
from edgeft.runtime.serve.state import ServerState
from edgeft.serve_config import LogFormat, ServeConfig

log = logging.getLogger("edgeft.serve")


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
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _make_server(config: ServeConfig, app: Starlette) -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that SIGTERM/SIGINT mark the app draining and the process then exits 0."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state: ServerState = app.state.edgeft
            if not state.draining:
                log.info("received %s: draining in-flight requests (up to %.0fs)",
                         signal.Signals(sig).name, config.drain_timeout)
            state.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    uv = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                        log_level=config.log_level.lower(), timeout_graceful_shutdown=config.drain_timeout,
                        limit_concurrency=config.max_connections, server_header=False, lifespan="on")
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
    server = _make_server(config, app)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    port = sock.getsockname()[1]
    log.info("listening on http://%s:%d (models load in the background; /health says when ready)%s",
             config.host, port, _auth_note(config))
    with sock:
        server.run(sockets=[sock])
    if state.failed:
        raise EdgeftError(f"could not load the models: {state.failed}")

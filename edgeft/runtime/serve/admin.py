"""``POST /v1/models/load`` and ``POST /v1/models/unload``: change the served models while serving.

llama-server's router-mode shape (``{"model": name}``), plus an optional ``path``: the
artifact (folder or packed file) to load, absolute or relative to a ``--model-dir``, and by
default the model's name there. Only with ``--api-key`` (the middleware checks the key on
``/v1``) and only for artifacts under a ``--model-dir``: anything else is a 403. A load is
checked like a startup load (every byte, the signature with ``--trusted-key``) and a trunk
already loaded is reused, so adding a model tuned from a served base costs its top only (its weights
and its KV slots: the trunk's KV pool is the served models' already, ``edgeft.runtime.trunk_group``).
Unloading stops routing new requests to the model, waits for those in flight (up to
``--drain-timeout``, else a 409 and the model stays), then closes its engine or batcher.
One load or unload runs at a time. This module knows Starlette, the settings and
``ServerState``; how an artifact is opened is ``state.load_model``'s.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeft.errors import EdgeftError
from edgeft.runtime.serve import middleware
from edgeft.runtime.serve.middleware import api
from edgeft.runtime.serve.state import ServerState, load_model
from edgeft.runtime.serve.wire import ApiError, bad

log = logging.getLogger("edgeft.serve")


async def _admin_body(request: Request) -> tuple[ServerState, dict[str, Any], str]:
    """The state, the body and its ``model`` name, for a server that allows loading at all."""
    state: ServerState = request.app.state.edgeft
    if not state.config.api_key:
        raise ApiError(403, "loading and unloading models needs a server started with --api-key",
                       type="permission_error", code="admin_disabled")
    if state.draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    state, body = await middleware.request_body(request)
    name = body.get("model")
    if not isinstance(name, str) or not name.strip() or len(name) > 256 or not name.isprintable():
        raise bad("'model' must be a model name (a non-empty printable string)", "model")
    return state, body, name


def allowed_path(dirs: tuple[Path, ...], value: str) -> Path:
    """The artifact ``value`` names (absolute, or relative to a ``--model-dir``), if it lies under one: else 403."""
    if not dirs:
        raise ApiError(403, "this server loads no models while serving: start it with --model-dir",
                       type="permission_error", code="path_not_allowed", param="path")
    roots = [d.resolve() for d in dirs]
    given = Path(value)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        try:
            real = candidate.resolve()  # symlinks and '..' followed: where the bytes really are
            found = real.exists()
        except (OSError, ValueError):  # a NUL byte, a name too long, a link loop
            raise bad(f"'path' is not a usable file name: {value[:200]!r}", "path") from None
        if not any(real != root and real.is_relative_to(root) for root in roots):
            raise ApiError(403, f"'{value}' is not under a --model-dir of this server", type="permission_error",
                           code="path_not_allowed", param="path")
        if found:
            return real
    raise bad(f"no artifact '{value}' under --model-dir", "path", "artifact_not_found")


@api
async def load(request: Request) -> Response:
    state, body, name = await _admin_body(request)
    path_value = body.get("path", name)
    if not isinstance(path_value, str) or not path_value:
        raise bad("'path' must be a non-empty string", "path")
    path = allowed_path(state.config.model_dirs, path_value)
    async with state.admin:
        if name in state.models:
            raise ApiError(409, f"a model named '{name}' is already served: unload it first", param="model",
                           code="model_exists")
        try:
            m = await asyncio.to_thread(load_model, state.config, state.metrics, name, path, len(state.models))
        except EdgeftError as exc:
            raise bad(f"'{name}' was not loaded: {exc}", "path", "artifact_refused") from None
        if state.draining:
            await m.close()
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        state.add_model(m)
    shared = state.shared_with(m)
    log.info("serving %s%s", name, f"; its trunk is shared with {', '.join(shared)}" if shared else "",
             extra={"fields": {"model": name, "shared_with": shared}})
    return JSONResponse({"success": True, **m.info(shared)})


@api
async def unload(request: Request) -> Response:
    state, _body, name = await _admin_body(request)
    async with state.admin:
        if name not in state.models:
            raise ApiError(404, f"the model '{name}' is not served here", param="model", code="model_not_found")
        await state.remove_model(name, state.config.drain_timeout)
    log.info("unloaded %s", name, extra={"fields": {"model": name}})
    return JSONResponse({"success": True, "id": name})


ROUTES = [Route("/v1/models/load", load, methods=["POST"]),
          Route("/v1/models/unload", unload, methods=["POST"])]

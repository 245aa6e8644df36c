"""The ASGI app: the route table, the lifespan that loads and closes the models, the middleware.

``FAMILIES`` is the route table: each entry is a module whose ``ROUTES`` are one family of
routes (a new family, e.g. ``/v1/rerank``, is a new module and one line here). Their
paths are also the route labels of the metrics. The models load in the background
(``/health`` says 503 until they are ready); a load that fails stops the process with one
line. This module knows Starlette and the parts of this package; nothing of uvicorn,
sockets or signals (``process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.routing import Route

from edgeft.runtime.serve import admin, completions, encoders, messages, rerank, responses_api, status
from edgeft.runtime.serve.metrics import Registry
from edgeft.runtime.serve.middleware import EXCEPTION_HANDLERS, EdgeMiddleware
from edgeft.runtime.serve.state import Model, ServerState, load_models
from edgeft.serve_config import ServeConfig

log = logging.getLogger("edgeft.serve")

FAMILIES = (
    status,  # /health, /metrics, /v1/models
    completions,  # /v1/completions, /v1/chat/completions
    encoders,  # /v1/classify, /v1/embeddings
    rerank,  # /v1/rerank (a pair classifier)
    messages,  # /v1/messages, /v1/messages/count_tokens (Anthropic)
    responses_api,  # /v1/responses, /v1/responses/input_tokens (OpenAI's Responses API, stateless)
    admin,  # /v1/models/load, /v1/models/unload (with --api-key, artifacts under --model-dir)
)


def api_routes() -> list[Route]:
    return [r for family in FAMILIES for r in family.ROUTES]


def build_app(config: ServeConfig, loader: Callable[[ServeConfig, Registry], dict[str, Model]] = load_models
              ) -> Starlette:
    """The ASGI app; its lifespan loads the models (``loader``) in the background and closes them at the end."""
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().create_task(_load(state, loader))
        try:
            yield
        finally:
            state.draining = True
            for cancel in list(state.cancels):
                cancel.set()
            if loading.done():
                for m in state.models.values():
                    await m.close()
            log.info("stopped")

    state.routes = api_routes()
    routes = list(state.routes)
    if config.ui:
        from edgeft.runtime import ui

        routes += ui.routes()
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=dict(EXCEPTION_HANDLERS))
    app.state.edgeft = state
    app.add_middleware(EdgeMiddleware, state=state)
    return app


async def _load(state: ServerState, loader: Callable) -> None:
    try:
        models = await asyncio.to_thread(loader, state.config, state.metrics)
    except Exception as exc:  # a broken artifact stops the server with one clear line
        state.failed = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.error("could not load the models: %s", state.failed)
        if state.on_fatal is not None:
            state.on_fatal()
        return
    for m in models.values():
        if m.batcher is not None:
            m.batcher.start()
    state.models = models
    state.ready = True
    log.info("ready: serving %s", ", ".join(models), extra={"fields": {"models": list(models)}})

"""``/v1/models``, ``/v1/models/{model}``, ``/health`` and ``/metrics``: what is served and how it goes.

``/health`` answers 503 while the models load, when loading failed and while draining, so
load balancers send work only to a ready server; a split classifier's entry in ``/v1/models``
names its trunk (digest, boundary) and the served models that share it; ``/metrics`` is the Prometheus text of
``ServerState.metrics``. This module knows Starlette and ``ServerState``; nothing else.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgeft.runtime.serve.middleware import api
from edgeft.runtime.serve.state import ServerState
from edgeft.runtime.serve.wire import ApiError


@api
async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    return JSONResponse({"object": "list", "data": [m.info(state.shared_with(m)) for m in state.models.values()]})


@api
async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    name = request.path_params["model"]
    if name not in state.models:
        raise ApiError(404, f"the model '{name}' is not served here", param="model", code="model_not_found")
    m = state.models[name]
    return JSONResponse(m.info(state.shared_with(m)))


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    if state.failed:
        return JSONResponse({"status": "failed", "error": state.failed}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(state.models)})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTES = [Route("/health", health, methods=["GET", "HEAD"]),
          Route("/metrics", metrics, methods=["GET"]),
          Route("/v1/models", list_models, methods=["GET"]),
          Route("/v1/models/{model:path}", get_model, methods=["GET"])]

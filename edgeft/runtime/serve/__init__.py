"""``edgeft serve``: an OpenAI-compatible HTTP server over one or more artifacts.

Routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream: true``
answers server-sent events), Anthropic's ``/v1/messages`` and OpenAI's ``/v1/responses`` (the
same generation path in other shapes), ``/v1/classify``, ``/v1/embeddings``, ``/health`` (503 until every model is
loaded, and again while draining), ``/metrics`` (Prometheus text; behind the API key,
or ``metrics_key``, when one is set) and, unless ``--no-ui``, a page for the browser at ``/``
(``edgeft.runtime.ui``). A client that hangs up before its body arrives is a quiet 499
(counted in ``edgeft_client_disconnects_total``), not a logged 500.

How it holds load: the event loop only parses, validates and streams; each generation model
has one continuous-batching ``Engine`` (``--parallel`` KV slots decoded together in one
step, a bounded waiting line that answers 429 past its size) and concurrent classification
requests are batched together (``ClassifyBatcher``; embeddings the same way). SIGTERM stops accepting
connections, lets the requests in flight finish (up to ``drain_timeout`` seconds), then exits with status 0.

One module per concern:

- ``process``: logging, the socket, uvicorn, signals (``serve``, ``bind``);
- ``app``: the route table (``FAMILIES``), the lifespan, the middleware stack (``build_app``);
- ``middleware``: request ids, bearer keys, the access log, errors as OpenAI-style bodies, ``read_json``;
- ``state``: the served models and what the routes share (``Model``, ``load_models``, ``ServerState``);
- ``generation``: a generation request into the engine and its chunks back (any generation route);
- ``completions``: ``/v1/completions`` and ``/v1/chat/completions`` (one small protocol object each);
- ``messages``: ``/v1/messages`` and its ``count_tokens`` (Anthropic's Messages API, errors in its shape);
- ``responses_api``: ``/v1/responses`` and its ``input_tokens`` (OpenAI's Responses API, stateless;
  its requests parsed in ``responses_wire``);
- ``replies``: a reply as parts (thinking, text, tool calls), for the two routes above;
- ``encoders``: ``/v1/classify`` and ``/v1/embeddings``; ``rerank``: ``/v1/rerank`` over a pair classifier;
- ``status``: ``/v1/models``, ``/health``, ``/metrics``;
- ``wire``: the OpenAI JSON shapes (requests parsed from ``SamplingParams``' own table; ``chat_wire``:
  messages, tools, reasoning settings and ``parse_chat``);
- ``admin``: ``/v1/models/load`` and ``/v1/models/unload`` (with ``--api-key``, artifacts under ``--model-dir``);
- ``metrics``: the Prometheus registry and the engine events that feed it.

The package knows HTTP (Starlette, uvicorn), the settings and the engines' agreed API
(``edgeft.runtime.load``, ``Generator``, ``TextClassifier``, ``SamplingParams``); it knows
nothing of torch or of how artifacts are made. Names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgeft.serve_config import ServeConfig

__all__ = ["ServeConfig", "build_app", "serve", "bind", "load_models", "Model", "ServerState", "manifest_card"]

_HOMES = {"build_app": "app", "serve": "process", "bind": "process", "load_models": "state", "Model": "state",
          "ServerState": "state", "manifest_card": "state"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)

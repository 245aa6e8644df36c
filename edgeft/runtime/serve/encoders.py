"""``/v1/classify`` and ``/v1/embeddings``: the encoder routes, batched across requests.

A request's texts join other requests' in the model's ``ClassifyBatcher`` (one classifier
or embedder run for many); a pair classifier's inputs are ``[text, text_pair]`` pairs. The
answer is each text's (or pair's) label and scores, or its vector
(float or base64, truncated to ``dimensions`` when the model was trained for it). This
module knows Starlette and the wire shapes; it knows nothing of graphs or tokenizers
beyond the embedder's ``check_ids`` and ``truncate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.runtime.serve import middleware, responses
from edgeft.runtime.serve.middleware import api
from edgeft.runtime.serve.wire import bad, is_int, model_name, opt_int


@dataclass(frozen=True)
class ClassifyRequest:
    model: str | None
    texts: list  # strings, or (text, text_pair) pairs
    single: bool  # the input was one string, not a list


def _pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str | None
    inputs: list  # strings or token-id lists
    encoding_format: str  # "float" | "base64"
    dimensions: int | None


def parse_classify(body: dict, max_inputs: int) -> ClassifyRequest:
    """``POST /v1/classify``: ``{"model", "input": str | [str] | [[text, text_pair], ...]}``."""
    value = body.get("input")
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) or _pair(t) for t in texts):
        raise bad("'input' must be a string, a non-empty list of strings, or a list of [text, text_pair] pairs",
                  "input")
    if len(texts) > max_inputs:
        raise bad(f"at most {max_inputs} inputs per request, got {len(texts)}", "input")
    return ClassifyRequest(model=model_name(body), texts=[t if isinstance(t, str) else tuple(t) for t in texts],
                           single=single)


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(is_int(t) and t >= 0 for t in v)


def parse_embeddings(body: dict, max_inputs: int) -> EmbeddingsRequest:
    """``POST /v1/embeddings``: ``input`` is a string, a list of strings, token ids, or a list of token-id lists."""
    value = body.get("input")
    if isinstance(value, str):
        inputs = [value]
    elif _token_list(value):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or _token_list(v) for v in value):
        inputs = value
    else:
        raise bad("'input' must be a string, a non-empty list of strings, a list of token ids "
                  "or a list of token-id lists", "input")
    if any(isinstance(v, str) and not v for v in inputs):
        raise bad("'input' must not contain empty strings", "input")
    if len(inputs) > max_inputs:
        raise bad(f"at most {max_inputs} inputs per request, got {len(inputs)}", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user")
    return EmbeddingsRequest(model=model_name(body), inputs=inputs, encoding_format=fmt,
                             dimensions=opt_int(body, "dimensions", 1, None))


@api
async def classify(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    if isinstance(body.get("model"), list):
        return await classify_models(state, body)
    req = parse_classify(body, state.config.max_inputs)
    model = state.model(req.model, Task.classification)
    if getattr(model.front, "pairs", None) is None and any(not isinstance(t, str) for t in req.texts):
        raise bad(f"'{model.name}' is not a pair classifier: give it texts, not [text, text_pair] pairs", "input")
    results = await model.batcher.classify(req.texts)
    return JSONResponse(responses.classify_body(model.name, results))


async def classify_models(state: Any, body: dict) -> Response:
    """``"model": [names]``: every model over the same inputs, as ``{"results": {name: its own answer}}``;
    the models that share a trunk run it once per batch (``classify_many``, off the event loop)."""
    from edgeft.runtime.classify import classify_many

    names = body["model"]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise bad("'model' must be a model name or a non-empty list of distinct names", "model")
    req = parse_classify({**body, "model": None}, state.config.max_inputs)
    models = [state.model(n, Task.classification) for n in names]
    answers = await state.run_many(classify_many, [m.front for m in models], req.texts, state.config.batch_size)
    return JSONResponse({"object": "list", "model": names,
                         "results": {m.name: responses.classify_body(m.name, a) for m, a in zip(models, answers)}})


@api
async def embeddings(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    req = parse_embeddings(body, state.config.max_inputs)
    model = state.model(req.model, Task.embedding)
    if req.dimensions is not None and req.dimensions != model.front.dim:
        allowed = model.manifest.embedding.truncation_dims
        if req.dimensions not in allowed:
            raise bad(f"'dimensions' {req.dimensions} is not supported: '{model.name}' returns {model.front.dim} "
                      "dimensions" + (f" and was trained to be truncated to {', '.join(map(str, allowed))}"
                                      if allowed else " and was not trained to be truncated"), "dimensions")
    model.front.check_ids(req.inputs)  # here, so one bad request never fails the batch it would join
    rows = await model.batcher.classify(req.inputs)
    vectors = [r["embedding"] for r in rows]
    if req.dimensions is not None and req.dimensions != model.front.dim:
        vectors = list(model.front.truncate(np.stack(vectors), req.dimensions))
    tokens = sum(r["tokens"] for r in rows)
    return JSONResponse(responses.embeddings_body(model.name, vectors, req.encoding_format, tokens))


ROUTES = [Route("/v1/classify", classify, methods=["POST"]),
          Route("/v1/embeddings", embeddings, methods=["POST"])]

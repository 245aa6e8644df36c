"""``/v1/rerank``: documents sorted by their relevance to a query, by a tuned pair classifier.

The shape llama-server, Jina and Cohere use: ``{"model", "query", "documents": [str | {"text"}],
"top_n", "return_documents"}`` in; ``{"model", "results": [{"index", "relevance_score",
"document"?}], "usage"}`` out, best first. A document's relevance is the classifier's
probability of the label its manifest says means relevant (or the sigmoid of a single-logit
head: ``TextClassifier.relevance_index``). The (query, document) pairs join other requests'
in the model's ``ClassifyBatcher``, so ``/v1/classify`` on the same pairs gives the same scores.
This module knows Starlette and the wire shapes; nothing of graphs or tokenizers beyond the
classifier's ``tokenizer`` for the usage count.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runtime.serve import middleware
from edgeft.runtime.serve.middleware import api
from edgeft.runtime.serve.wire import bad, model_name, opt_int


@dataclass(frozen=True)
class RerankRequest:
    model: str | None
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    as_objects: bool  # documents came as {"text": ...}: returned the same way


def _document(d: Any, i: int) -> str:
    if isinstance(d, dict):
        d = d.get("text")
    if not isinstance(d, str):
        raise bad(f"'documents' item {i} must be a string or an object with a string 'text'", "documents")
    return d


def parse_rerank(body: dict, max_inputs: int) -> RerankRequest:
    """``POST /v1/rerank``; at most ``max_inputs`` documents (the cap ``/v1/classify`` has)."""
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise bad("'query' must be a non-empty string", "query")
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise bad("'documents' must be a non-empty list of strings or {\"text\": ...} objects", "documents")
    if len(docs) > max_inputs:
        raise bad(f"at most {max_inputs} documents per request, got {len(docs)}", "documents")
    texts = [_document(d, i) for i, d in enumerate(docs)]
    keep = body.get("return_documents", False)
    if not isinstance(keep, bool):
        raise bad("'return_documents' must be true or false", "return_documents")
    _utf8(query, "query")
    for i, t in enumerate(texts):
        _utf8(t, f"documents[{i}]")
    return RerankRequest(model=model_name(body), query=query, documents=texts, top_n=opt_int(body, "top_n", 1, None),
                         return_documents=keep, as_objects=any(isinstance(d, dict) for d in docs))


def _utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{where}' is not valid UTF-8 text (a lone surrogate)", where.split("[")[0]) from None


def rerank_body(model: str, req: RerankRequest, scores: list[float], tokens: int) -> dict[str, Any]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: req.top_n or len(scores)]
    results = []
    for i in order:
        r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            r["document"] = {"text": req.documents[i]} if req.as_objects else req.documents[i]
        results.append(r)
    return {"model": model, "object": "list", "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@api
async def rerank(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    req = parse_rerank(body, state.config.max_inputs)
    model = state.model(req.model, Task.classification)
    clf = model.front
    if getattr(clf, "pairs", None) is None:
        raise bad(f"'{model.name}' is not a pair classifier: /v1/rerank needs one tuned on (query, document) pairs",
                  "model", "not_a_reranker")
    try:
        label = clf.labels[clf.relevance_index()]
    except EdgeftError as exc:  # no label means relevant
        raise bad(str(exc), "model", "not_a_reranker") from None
    pairs = [(req.query, d) for d in req.documents]
    results = await model.batcher.classify(pairs)
    scores = [float(r["scores"][label]) for r in results]
    tokens = await asyncio.to_thread(clf.count_tokens, pairs)
    return JSONResponse(rerank_body(model.name, req, scores, tokens))


ROUTES = [Route("/v1/rerank", rerank, methods=["POST"])]

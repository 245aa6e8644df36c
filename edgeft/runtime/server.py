"""``edgeft serve``: an OpenAI-compatible HTTP server over one or more artifacts.

Routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream: true``
answers server-sent events), ``/v1/classify``, ``/v1/embeddings``, ``/health`` (503 until every model is
loaded, and again while draining), ``/metrics`` (Prometheus text; behind the API key,
or ``metrics_key``, when one is set) and, unless ``--no-ui``, a page for the browser at ``/``
(``edgeft.runtime.ui``). A client that hangs up before its body arrives is a quiet 499
(counted in ``edgeft_client_disconnects_total``), not a logged 500.

How it holds load: the event loop only parses, validates and streams; each generation model
has one continuous-batching ``Engine`` (``--parallel`` KV slots decoded together in one
step, a bounded waiting line that answers 429 past its size) and concurrent classification
requests are batched together (``ClassifyBatcher``; embeddings the same way). SIGTERM stops accepting connections, lets the requests in flight
finish (up to ``drain_timeout`` seconds), then exits with status 0.

This module knows HTTP (Starlette, uvicorn), the settings and the engines' agreed API
(``edgeft.runtime.load``, ``Generator``, ``TextClassifier``, ``SamplingParams``); it knows
nothing of torch, of how artifacts are made, or of the OpenAI JSON shapes (``wire``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runtime import wire
from edgeft.runtime.batching import ClassifyBatcher, Overloaded
from edgeft.runtime.metrics import Registry
from edgeft.runtime.wire import ApiError, bad
from edgeft.serve_config import LogFormat, ServeConfig

log = logging.getLogger("edgeft.serve")
access_log = logging.getLogger("edgeft.access")

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
          "/v1/embeddings")
TASK_ROUTES = {Task.causal_lm: "/v1/completions or /v1/chat/completions", Task.classification: "/v1/classify",
               Task.embedding: "/v1/embeddings"}


# ---------------------------------------------------------------- models

@dataclass
class Model:
    """One served artifact: its batching engine (generation) or a batcher (classification)."""

    name: str
    task: Task
    manifest: Any
    front: Any  # the Generator or classifier: tokenizing and chat templates on the request's thread
    engine: Any = None  # edgeft.runtime.engine.Engine for causal-lm models
    batcher: ClassifyBatcher | None = None
    signature_checked: bool = False  # serve --trusted-key verified the manifest's signature at load
    speculate: str = "auto"  # serve --speculate: a request without its own "speculate" gets this
    created: int = field(default_factory=lambda: int(time.time()))

    def info(self) -> dict[str, Any]:
        d = {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgeft", "task": self.task.value}
        if self.manifest.decoder is not None:
            d["context_length"] = self.manifest.decoder.context_length
        if self.manifest.classifier is not None:
            d["labels"] = list(self.manifest.classifier.labels)
        if self.manifest.embedding is not None:
            d["dimensions"] = self.manifest.embedding.dim
        d["manifest"] = manifest_card(self.manifest, self.signature_checked)
        return d

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
        if self.batcher is not None:
            await self.batcher.close()


def manifest_card(manifest: Any, signature_checked: bool = False) -> dict[str, Any]:
    """What a user needs to trust a model: base, quantization, size, the gate's verdict and figures, signer."""
    gate = {k: v for k, v in (manifest.gate or {}).items() if k in ("passed", "degraded", "metrics", "failures")}
    signature = manifest.signature or {}
    return {
        "architecture": manifest.architecture,
        "base_model": (manifest.source or {}).get("base_model"),
        "quantization": (manifest.quantization or {}).get("scheme"),
        "size_bytes": sum(int(f.get("size", 0)) for f in (manifest.files or {}).values()),
        "gate": gate,
        "digest": manifest.digest,
        "signed_by": signature.get("key_id"),
        "signature_checked": bool(signature) and signature_checked,
    }


def _engine_observer(metrics: Registry, name: str) -> Callable[[str, float], None]:
    """Engine events -> metrics: batch size per step, queue wait, slots in use, waiting, tokens/s."""
    def observe(event: str, value: float) -> None:
        if event == "batch":
            metrics.decode_batch.observe(value, model=name)
        elif event == "queue_wait":
            metrics.queue_wait.observe(value, model=name)
        elif event == "slots":
            metrics.in_flight.set(value, model=name)
        elif event == "waiting":
            metrics.queue_depth.set(value, model=name)
        elif event == "tokens_per_second":
            metrics.tokens_per_second.set(value, model=name)
        elif event == "drafted":
            metrics.drafted_tokens.inc(value, model=name)
        elif event == "accepted":
            metrics.accepted_tokens.inc(value, model=name)
    return observe


def _spin_reserve(config: ServeConfig) -> float:
    """Cores a model's spinning threads must leave free: every other model's threads, and with
    several slots one for the event loop (it streams every slot's chunks while the pool works)."""
    from edgeft.runtime.session import default_threads

    threads = config.threads or default_threads()
    return threads * (len(config.artifacts) - 1) + (1.0 if config.parallel > 1 else 0.0)


def load_models(config: ServeConfig, metrics: Registry) -> dict[str, Model]:
    """Open every artifact, hashing every byte (blocking: run it off the event loop)."""
    from edgeft.runtime import load
    from edgeft.runtime.engine import Engine
    from edgeft.signing import load_trusted_keys

    models: dict[str, Model] = {}
    wait_s = config.batch_wait_ms / 1000
    keys = load_trusted_keys(config.trusted_keys) if config.trusted_keys else []
    for name, path in zip(config.model_names(), config.artifacts):
        t0 = time.perf_counter()
        first = load(path, threads=config.threads, trusted_keys=keys, spin=config.spin,
                     reserve=_spin_reserve(config))
        task = first.manifest.task
        if task is Task.causal_lm:
            engine = Engine(first, parallel=config.parallel, ctx_size=config.ctx_size, queue_size=config.queue_size,
                            prefix_cache=config.prefix_cache, observe=_engine_observer(metrics, name))
            metrics.slots.set(config.parallel, model=name)
            m = Model(name, task, first.manifest, first, engine=engine, speculate=config.speculate.value)
        else:
            method = "embed_rows" if task is Task.embedding else "classify"
            batcher = ClassifyBatcher(name, first, config.batch_size, wait_s, config.queue_size, metrics, method)
            m = Model(name, task, first.manifest, first, batcher=batcher)
        m.signature_checked = bool(keys)
        models[name] = m
        metrics.loaded.set(1, model=name)
        spin = getattr(first, "spinning", None)
        log.info("loaded %s (%s) from %s in %.1fs%s", name, task.value, path, time.perf_counter() - t0,
                 "" if spin is None else f"; threads {'spin' if spin else 'sleep'} ({first.spin_reason})",
                 extra={"fields": {"model": name, "task": task.value, "path": str(path), "spin": spin}})
    return models


class ServerState:
    """What the routes share: settings, metrics, the models once loaded, and the lifecycle flags."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Registry()
        self.models: dict[str, Model] = {}
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.cancels: set[threading.Event] = set()

    def check_serving(self) -> None:
        # While draining, requests that reached us are served: uvicorn has stopped accepting
        # connections and /health says 503, so load balancers send nothing new.
        if not self.ready:
            raise ApiError(503, "the models are still loading", type="server_error", code="loading")

    def model(self, name: str | None, task: Task) -> Model:
        served = ", ".join(self.models) or "none"
        if name is None:
            fits = [m for m in self.models.values() if m.task is task]
            if len(fits) == 1:
                return fits[0]
            raise bad(f"'model' is required (served here: {served})", "model")
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"the model '{name}' is not served here (served: {served})",
                           param="model", code="model_not_found")
        if m.task is not task:
            raise bad(f"'{name}' is a {m.task.value} model: use {TASK_ROUTES[m.task]}", "model", "wrong_model_task")
        return m


# ---------------------------------------------------------------- request helpers

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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
    wire.check_unicode(body)
    return body


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def api(handler: Callable) -> Callable:
    """Turn the errors a request can cause into OpenAI-style bodies; never a 500 for bad input."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return _client_left(request)
        except ApiError as exc:
            return _error_response(exc)
        except Overloaded as exc:
            return _error_response(ApiError(429, str(exc), type="rate_limit_error", code="queue_full"))
        except EdgeftError as exc:  # the engine refused the input (context, template...)
            return _error_response(bad(str(exc)))

    wrapped.__name__ = handler.__name__
    return wrapped


CLIENT_CLOSED = 499  # nginx's "client closed request": no one reads this response


def _client_left(request: Request) -> Response:
    """A client that hung up before its body arrived: a client event, not a server error."""
    state: ServerState = request.app.state.edgeft
    state.metrics.disconnects.inc(route=_route_label(request.url.path))
    log.info("client left before sending its whole request on %s", request.url.path)
    return Response(status_code=CLIENT_CLOSED)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- generation

def _prompt_ids(model: Model, req: wire.GenerationRequest) -> list[int]:
    """Tokenize (after the chat template for chat); blocking, so called off the event loop."""
    if req.messages is not None:
        try:
            if req.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
                from edgeft.runtime.tools import Tool, ToolChoice, render_tools

                return model.front.encode(render_tools(model.front, req.messages, [Tool(**t) for t in req.tools],
                                                       ToolChoice(*req.tool_choice)))
            return model.front.encode(model.front.render_chat(req.messages))
        except EdgeftError:
            raise
        except Exception as exc:  # a template that refuses these messages (e.g. roles out of order)
            raise bad(f"the chat template refused these messages: {exc}", "messages") from None
    if isinstance(req.prompt, str):
        return model.front.encode(req.prompt)
    vocab = model.manifest.decoder.vocab_size
    if any(t >= vocab for t in req.prompt):
        raise bad(f"token ids must be below the vocabulary size {vocab}", "prompt")
    return list(req.prompt)


def _params(model: Model, req: wire.GenerationRequest, n_prompt: int, cap: int) -> Any:
    from edgeft.runtime import SamplingParams

    ctx = model.manifest.decoder.context_length
    param = "messages" if req.messages is not None else "prompt"
    if n_prompt >= ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} tokens.",
                  param, "context_length_exceeded")
    room = ctx - n_prompt
    if req.max_tokens is None:
        defaults = model.manifest.generation
        max_new = max(1, min(defaults.max_new_tokens if defaults else 128, cap, room,
                             model.engine.slot_len - n_prompt))
    elif req.max_tokens > room:
        raise bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                  f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, {req.max_tokens} for the "
                  "completion). Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
    else:
        max_new = req.max_tokens
    if n_prompt + max_new > model.engine.slot_len:
        raise bad(f"{n_prompt} prompt tokens and {max_new} new tokens exceed a slot of {model.engine.slot_len} "
                  f"tokens on this server ({model.engine.parallel} slots share --ctx-size). Please reduce the "
                  "prompt or max_tokens.", param if req.max_tokens is None else "max_tokens", "context_length_exceeded")
    try:
        return SamplingParams.over(model.manifest.generation, max_new_tokens=max_new, temperature=req.temperature,
                                   top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                   repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                                   frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias or None,
                                   seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos or None,
                                   logprobs=req.logprobs, speculate=req.speculate or model.speculate)
    except (ValueError, TypeError, EdgeftError) as exc:
        raise bad(getattr(exc, "message", None) or str(exc)) from None


class Choice:
    """One sequence of a request in the engine: its chunks arrive on the engine thread, are read on the loop."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        self.index, self.loop, self.events = index, loop, events
        self.seq: Any = None

    def on_chunk(self, chunk: Any) -> None:  # engine thread
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, chunk))


class Generation:
    """Every choice of one request (prompts x n), submitted together; ``set()`` cancels them all."""

    def __init__(self, model: Model, jobs: list[tuple[list[int], Any]], on_first: Callable[[], None],
                 grammar: Any = None) -> None:
        self.model, self.on_first = model, on_first
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i, self.loop, self.events) for i in range(len(jobs))]
        self.first_seen = False
        try:
            for choice, (ids, params) in zip(self.choices, jobs):
                masks = [grammar.mask()] if grammar is not None else []  # one per sequence: it holds its state
                choice.seq = model.engine.submit(ids, params, choice.on_chunk, processors=masks)
        except BaseException:
            self.set()
            raise

    def set(self) -> None:
        """Cancel every choice still running (client gone, shutdown)."""
        for c in self.choices:
            if c.seq is not None and not c.seq.done:
                self.model.engine.cancel(c.seq)

    async def events_until_done(self) -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of (choice index, Chunk) as they arrive, until every choice has finished."""
        left = len(self.choices)
        while left:
            items = [await self.events.get()]
            while not self.events.empty():
                items.append(self.events.get_nowait())
            for _, chunk in items:
                if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                    left -= 1
                if not self.first_seen and not isinstance(chunk, BaseException) and chunk.token_id is not None:
                    self.first_seen = True
                    self.on_first()
            yield items


def _token_text(model: Model, token: int) -> str:
    return model.front.tokenizer.decode([token], skip_special_tokens=False)


def _logprob_entries(model: Model, lps: list[Any]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [(_token_text(model, lp.token), lp.logprob, [(_token_text(model, t), v) for t, v in lp.top]) for lp in lps]


def _jobs(model: Model, req: wire.GenerationRequest, prompt_ids: list[list[int]],
          cap: int) -> list[tuple[list[int], Any]]:
    """(ids, params) per choice: prompt by prompt, n choices each; choice j seeded with seed + j."""
    jobs = []
    for ids in prompt_ids:
        if not ids:
            raise bad("the prompt is empty: nothing to continue from", "prompt")
        params = _params(model, req, len(ids), cap)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            jobs.append((ids, dataclasses.replace(params, seed=seed) if j else params))
    return jobs


async def _generate(request: Request, chat: bool) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    cfg = state.config
    body = await read_json(request, cfg.max_body_bytes)
    req = (wire.parse_chat if chat else wire.parse_completion)(body, cfg.max_tokens)
    model = state.model(req.model, Task.causal_lm)
    if req.echo and req.logprobs is not None:
        raise bad("'echo' with 'logprobs' (the prompt's logprobs) is not supported by this server", "echo")
    wanted = len(req.prompts or (None,)) * req.n
    most = model.engine.parallel + model.engine.queue_size
    if wanted > most:
        raise bad(f"{wanted} sequences (prompts x n) asked for; this server holds at most {most} per model "
                  "(--parallel + --queue-size)", "n")
    if model.engine.room() < wanted:  # refused before any tokenizing
        state.metrics.rejected.inc(model=model.name)
        raise Overloaded(f"all {model.engine.parallel} slots of '{model.name}' are busy and the waiting line is full")
    prompt_ids = await asyncio.to_thread(_all_prompt_ids, model, req)
    jobs = _jobs(model, req, prompt_ids, cfg.max_tokens)
    constrained = req.response_format is not None or (req.tools and req.tool_choice[0] in ("required", "function"))
    grammar = await asyncio.to_thread(_grammar, model, req) if constrained else None
    rid = wire.new_id("chatcmpl" if chat else "cmpl")
    t_admit = time.perf_counter()
    on_first = lambda: state.metrics.first_token.observe(time.perf_counter() - t_admit, model=model.name)  # noqa: E731
    try:
        gen = Generation(model, jobs, on_first, grammar)
    except Overloaded:
        state.metrics.rejected.inc(model=model.name)
        raise
    state.cancels.add(gen)  # shutdown stops it even if the response never starts
    n_prompt = sum(len(ids) for ids in prompt_ids)
    state.metrics.prompt_tokens.inc(n_prompt, model=model.name)
    echoes = [await asyncio.to_thread(model.front.decode, ids) if req.echo else "" for ids in prompt_ids]
    if req.stream:
        events = _stream_events(state, model, req, rid, chat, n_prompt, gen, echoes)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts: list[list[str]] = [[] for _ in jobs]
    lps: list[list[Any]] = [[] for _ in jobs]
    finish: list[str] = ["length"] * len(jobs)
    n = 0
    try:
        async for items in gen.events_until_done():
            for i, chunk in items:
                if isinstance(chunk, BaseException):
                    raise chunk
                texts[i].append(chunk.text)
                if chunk.token_id is not None:
                    n += 1
                    if chunk.logprob is not None:
                        lps[i].append(chunk.logprob)
                finish[i] = chunk.finish_reason or finish[i]
    finally:
        gen.set()
        state.cancels.discard(gen)
        state.metrics.generated_tokens.inc(n, model=model.name)
    choices = []
    for i in range(len(jobs)):
        text = "".join(texts[i])
        lp = None
        if req.logprobs is not None:
            entries = _logprob_entries(model, lps[i])
            lp = wire.chat_logprobs(entries) if chat else wire.completion_logprobs(entries)
        if chat:
            content, calls = _tool_calls(req, text)
            choices.append(wire.chat_choice(i, content, "tool_calls" if calls else finish[i], lp, calls))
        else:
            choices.append(wire.completion_choice(i, echoes[i // req.n] + text, finish[i], lp))
    build = wire.chat_body if chat else wire.completion_body
    return JSONResponse(build(rid, model.name, "", "", wire.usage(n_prompt, n), choices))


def _grammar(model: Model, req: wire.GenerationRequest) -> Any:
    """The request's constraint compiled for the model (a required tool call, else response_format), or None.

    Blocking (compiling takes milliseconds, the model's first one a second or two): call it off the loop.
    A schema the engine cannot compile is a 400 naming the problem."""
    from edgeft.runtime import compile_for
    from edgeft.runtime.constrain import Constraint, ConstraintError
    from edgeft.runtime.tools import Tool, ToolChoice, call_constraint

    choice = ToolChoice(*req.tool_choice)
    try:
        if req.tools and choice.forced:
            param = "tools"
            constraint = call_constraint([Tool(**t) for t in req.tools], choice, req.parallel_tool_calls)
        elif req.response_format is not None:
            param, (kind, schema) = "response_format", req.response_format
            constraint = Constraint.json_object() if kind == "json_object" else Constraint.json_schema(schema)
        else:
            return None
        return compile_for(model.front, constraint)
    except ConstraintError as exc:
        raise bad(str(exc), param, "invalid_schema") from None


def _tool_calls(req: wire.GenerationRequest, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a chat answer: calls only when the request offered tools."""
    if not req.tools or req.tool_choice[0] == "none":
        return text, []
    from edgeft.runtime.tools import Tool, parse_calls

    return parse_calls(text, [Tool(**t) for t in req.tools])


def _all_prompt_ids(model: Model, req: wire.GenerationRequest) -> list[list[int]]:
    if req.messages is not None:
        return [_prompt_ids(model, req)]
    return [_prompt_ids(model, dataclasses.replace(req, prompt=p)) for p in (req.prompts or (req.prompt,))]


async def _stream_events(state: ServerState, model: Model, req: wire.GenerationRequest, rid: str, chat: bool,
                         n_prompt: int, gen: Generation, echoes: list[str]) -> AsyncIterator[str]:
    """Server-sent events for one streamed request (every choice, by index); always ends with ``data: [DONE]``."""
    n = 0
    total = len(gen.choices)
    held = [[] for _ in range(total)] if chat and req.tools and req.tool_choice[0] != "none" else None

    def piece(i: int, text: str, finish: str | None, lps: list | None = None) -> str:
        lp = None
        if lps:
            entries = _logprob_entries(model, lps)
            lp = wire.chat_logprobs(entries) if chat else wire.completion_logprobs(entries)
        if chat:
            return _sse(wire.chat_chunk(rid, model.name, {"content": text} if text else {}, finish, i, lp))
        return _sse(wire.completion_chunk(rid, model.name, text, finish, i, lp))

    try:
        first = []
        for i in range(total):
            if chat:
                first.append(_sse(wire.chat_chunk(rid, model.name, {"role": "assistant", "content": ""}, None, i)))
            elif echoes[i // req.n]:
                first.append(piece(i, echoes[i // req.n], None))
        if first:
            yield "".join(first)
        async for items in gen.events_until_done():
            # Every chunk already waiting goes out in one write: fewer syscalls when the client lags.
            out = []
            for i, chunk in items:
                if isinstance(chunk, BaseException):
                    log.error("generation failed: %s", chunk, exc_info=chunk)
                    message = str(chunk) if isinstance(chunk, EdgeftError) else "generation failed"
                    yield "".join(out) + _sse(wire.ApiError(500, message, type="server_error").body())
                    return
                if chunk.token_id is not None:
                    n += 1
                lps = [chunk.logprob] if chunk.logprob is not None else None
                if held is not None:  # tool calls: the text is held until it can be parsed
                    held[i].append(chunk.text)
                elif chunk.text or lps:
                    out.append(piece(i, chunk.text, None, lps))
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason if chunk.finish_reason != "cancelled" else "length"
                    if held is not None:
                        content, calls = _tool_calls(req, "".join(held[i]))
                        if calls:
                            out.append(_sse(wire.chat_chunk(rid, model.name, wire.tool_call_delta(calls), None, i)))
                            finish = "tool_calls"
                        elif content:
                            out.append(piece(i, content, None))
                    out.append(piece(i, "", finish))
            if out:
                yield "".join(out)
        if req.include_usage:
            yield _sse(wire.usage_chunk(rid, model.name, chat, wire.usage(n_prompt, n)))
        yield "data: [DONE]\n\n"
    finally:
        if any(c.seq is not None and not c.seq.done for c in gen.choices):
            state.metrics.cancelled.inc(model=model.name)
        gen.set()  # the client left (or we are done): the engine drops what is still running
        state.cancels.discard(gen)
        state.metrics.generated_tokens.inc(n, model=model.name)


@api
async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


@api
async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


# ---------------------------------------------------------------- other routes

@api
async def classify(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    body = await read_json(request, state.config.max_body_bytes)
    req = wire.parse_classify(body, state.config.max_inputs)
    model = state.model(req.model, Task.classification)
    results = await model.batcher.classify(req.texts)
    return JSONResponse(wire.classify_body(model.name, results))


@api
async def embeddings(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    body = await read_json(request, state.config.max_body_bytes)
    req = wire.parse_embeddings(body, state.config.max_inputs)
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
    return JSONResponse(wire.embeddings_body(model.name, vectors, req.encoding_format, tokens))


@api
async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    return JSONResponse({"object": "list", "data": [m.info() for m in state.models.values()]})


@api
async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.edgeft
    state.check_serving()
    name = request.path_params["model"]
    if name not in state.models:
        raise ApiError(404, f"the model '{name}' is not served here", param="model", code="model_not_found")
    return JSONResponse(state.models[name].info())


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


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                    code=code))


async def _disconnected(request: Request, exc: Exception) -> Response:
    return _client_left(request)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s: %s", request.url.path, exc, exc_info=exc)
    return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)


# ---------------------------------------------------------------- middleware: ids, auth, metrics, access log

def _route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


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
        token = bearer_token(headers.get(b"authorization", b""))
        # compare with every key (no early exit) so the time taken says nothing about which one was close
        ok = [hmac.compare_digest(token or b"", k) for k in keys]
        return None if token is not None and any(ok) else f"missing or incorrect {what}: send 'Authorization: Bearer <key>'"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path = time.perf_counter(), scope["path"]
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            refused = self._unauthorized(path, headers)
            if refused is not None:
                err = ApiError(401, refused, code="invalid_api_key")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, path, status, time.perf_counter() - t0, rid)

    def _record(self, scope: dict, path: str, status: int, seconds: float, rid: str) -> None:
        route, method = _route_label(path), scope.get("method", "")
        self.state.metrics.requests.inc(route=route, method=method, status=str(status))
        self.state.metrics.latency.observe(seconds, route=route)
        if path in ("/health", "/metrics") and status == 200:
            return  # probes and scrapes would drown the log
        client = scope.get("client") or ("", 0)
        access_log.info("%s %s %d %.1fms", method, path, status, seconds * 1000, extra={"fields": {
            "method": method, "path": path, "status": status, "ms": round(seconds * 1000, 2),
            "request_id": rid, "client": client[0]}})


# ---------------------------------------------------------------- the app and the process

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

    routes = [
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    if config.ui:
        from edgeft.runtime import ui

        routes += ui.routes()
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, ClientDisconnect: _disconnected,
                                        Exception: _server_error})
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


def serve(config: ServeConfig) -> None:
    """Run the server until SIGTERM/SIGINT; raise ``EdgeftError`` if the port or the models cannot be had."""
    for path in config.artifacts:
        if not path.exists():
            raise EdgeftError(f"{path} does not exist")
    if config.trusted_keys:  # a wrong key or an unsigned artifact fails before listening
        from edgeft.artifact import check_header
        from edgeft.signing import load_trusted_keys

        keys = load_trusted_keys(config.trusted_keys)
        for path in config.artifacts:
            check_header(path, keys)
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

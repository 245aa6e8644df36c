"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI's two generation routes.

Both run the same request through ``generation`` (tokenize, sample settings, admission,
the engine) and the same collecting or streaming loop here; what differs is one small
protocol object per route that renders a choice, a streamed chunk and the logprobs in
that route's JSON shape (``Completions``: text, echo, the legacy logprobs; ``Chat``: a
message, a role chunk first, tool calls streamed as OpenAI's deltas as they are written:
the call with its id and name, then its arguments fragment by fragment). Another
generation route (Anthropic's messages, OpenAI's responses) is a module with its own
protocol and ``ROUTES`` that reuses ``generation``. This module knows Starlette responses
and the wire shapes; it knows nothing of slots, graphs or sampling.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runtime import reasoning
from edgeft.runtime.serve import chat_wire, generation, middleware, responses, wire
from edgeft.runtime.serve.generation import Generation
from edgeft.runtime.serve.state import Model, ServerState
from edgeft.runtime.serve.wire import GenerationRequest

log = logging.getLogger("edgeft.serve")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Completions:
    """How ``/v1/completions`` shows choices: text (after the echoed prompt), the legacy logprobs shape."""

    prefix = "cmpl"  # of the response's id
    parse = staticmethod(wire.parse_completion)
    holds = False  # whether a choice's streamed text is held until it finishes (then given to closing())

    def __init__(self, model: Model, req: GenerationRequest, rid: str, echoes: list[str],
                 phases: list | None = None) -> None:
        self.model, self.req, self.rid, self.echoes = model, req, rid, echoes
        self.phases = phases or [None] * len(echoes) * req.n  # per choice: where a reasoning model's reply starts

    def logprobs(self, lps: list | None) -> dict | None:
        if lps is None:
            return None
        return self.shape_logprobs([(self._text(lp.token), lp.logprob, [(self._text(t), v) for t, v in lp.top])
                                    for lp in lps])

    def _text(self, token: int) -> str:
        return self.model.front.tokenizer.decode([token], skip_special_tokens=False)

    def shape_logprobs(self, entries: list) -> dict:
        return responses.completion_logprobs(entries)

    def choice(self, i: int, text: str, finish: str, lps: list | None) -> dict:
        return responses.completion_choice(i, self.echoes[i // self.req.n] + text, finish, self.logprobs(lps))

    def body(self, choices: list[dict], usage: dict) -> dict:
        return responses.completion_body(self.rid, self.model.name, "", "", usage, choices)

    def chunk(self, i: int, text: str, finish: str | None, lps: list | None = None) -> dict:
        return responses.completion_chunk(self.rid, self.model.name, text, finish, i, self.logprobs(lps))

    def streamed(self, i: int, text: str, lps: list | None) -> list[dict]:
        """The chunks one engine chunk of choice ``i`` makes while it runs (its text, its logprobs)."""
        return [self.chunk(i, text, None, lps)] if text or lps else []

    def opening(self, i: int) -> list[dict]:
        echo = self.echoes[i // self.req.n]
        return [self.chunk(i, echo, None)] if echo else []

    def closing(self, i: int, held: str, finish: str) -> list[dict]:
        return [self.chunk(i, "", finish)]

    def usage_chunk(self, usage: dict) -> dict:
        return responses.usage_chunk(self.rid, self.model.name, False, usage)


class Chat(Completions):
    """How ``/v1/chat/completions`` shows choices: an assistant message, its tool calls parsed from the text.

    With tools offered, each streamed choice's text goes through a ``tools.CallStream``: content
    as it comes (less what may still open a call), a call's first delta carries its index, id,
    type and name, later ones only fragments of its arguments. A choice that made calls ends
    with "tool_calls", unless the budget cut it ("length"): then a call it cut is left out of the
    whole answer (streamed, the deltas already sent stay, as OpenAI's do); markup is never content."""

    prefix = "chatcmpl"
    parse = staticmethod(chat_wire.parse_chat)

    def __init__(self, model: Model, req: GenerationRequest, rid: str, echoes: list[str],
                 phases: list | None = None) -> None:
        super().__init__(model, req, rid, echoes, phases)
        self.readers: dict[int, Any] = {}  # choice -> its tools.CallStream (None: no tools offered)
        self.splitters = [None if p is None else reasoning.Splitter(p) for p in self.phases]

    def shape_logprobs(self, entries: list) -> dict:
        return responses.chat_logprobs(entries)

    def choice(self, i: int, text: str, finish: str, lps: list | None) -> dict:
        phase = self.phases[i]
        thought, text = (None, text) if phase is None else reasoning.split(text, phase)
        content, calls = generation.tool_calls(self.req, text, cut=finish == "length")
        out = responses.chat_choice(i, content, _finish(finish, calls), self.logprobs(lps), calls)
        if thought is not None:
            out["message"]["reasoning_content"] = thought
        return out

    def body(self, choices: list[dict], usage: dict) -> dict:
        return responses.chat_body(self.rid, self.model.name, "", "", usage, choices)

    def chunk(self, i: int, text: str, finish: str | None, lps: list | None = None) -> dict:
        delta = {"content": text} if text else {}
        return responses.chat_chunk(self.rid, self.model.name, delta, finish, i, self.logprobs(lps))

    def opening(self, i: int) -> list[dict]:
        forced = bool(self.req.tools) and self.req.tool_choice[0] in ("required", "function")  # calls, no content
        delta = {"role": "assistant", "content": None if forced else ""}
        return [responses.chat_chunk(self.rid, self.model.name, delta, None, i)]

    def streamed(self, i: int, text: str, lps: list | None) -> list[dict]:
        splitter = self.splitters[i]
        thought, text = ("", text) if splitter is None else splitter.feed(text)
        return self._pieces(i, thought, text, lps)

    def closing(self, i: int, held: str, finish: str) -> list[dict]:
        splitter = self.splitters[i]
        thought, rest = ("", held) if splitter is None else splitter.feed(held)
        if splitter is not None:  # what the splitter still holds
            end_thought, end_rest = splitter.finish()
            thought, rest = thought + end_thought, rest + end_rest
        out = self._pieces(i, thought, rest, None)
        stream = self._stream(i)
        if stream is None:
            return [*out, self.chunk(i, "", finish)]
        out += [responses.chat_chunk(self.rid, self.model.name, _delta(p), None, i)
                for p in stream.finish(cut=finish == "length")]
        return [*out, self.chunk(i, "", _finish(finish, stream.calls))]

    def _pieces(self, i: int, thought: str, text: str, lps: list | None) -> list[dict]:
        """Chunks for a piece of a choice: its thought (reasoning_content), then its answer, which goes
        through the call reader when tools were offered; the logprobs ride on the first chunk."""
        deltas = [{"reasoning_content": thought}] if thought else []
        stream = self._stream(i)
        if stream is None:
            deltas += [{"content": text}] if text else []
        else:
            deltas += [_delta(p) for p in stream.feed(text)]
        deltas = deltas or ([{}] if lps else [])
        return [responses.chat_chunk(self.rid, self.model.name, d, None, i, self.logprobs(lps) if not n else None)
                for n, d in enumerate(deltas)]

    def _stream(self, i: int) -> Any:
        if i not in self.readers:
            self.readers[i] = generation.call_stream(self.req)
        return self.readers[i]

    def usage_chunk(self, usage: dict) -> dict:
        return responses.usage_chunk(self.rid, self.model.name, True, usage)


def _finish(finish: str, calls: list) -> str:
    """A choice that made calls ends with "tool_calls", unless the budget cut it ("length")."""
    return "tool_calls" if calls and finish == "stop" else finish


def _delta(piece: Any) -> dict:
    """A ``tools.Piece`` as a chat chunk's delta (OpenAI's incremental tool calls)."""
    if piece.kind == "content":
        return {"content": piece.text}
    if piece.kind == "call":
        return {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                "function": {"name": piece.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}


def route(protocol: type[Completions]) -> Callable:
    """The route handler of one protocol: parse, admit, then one JSON body or a stream of events."""

    @middleware.api
    async def handler(request: Request) -> Response:
        state, body = await middleware.request_body(request)
        req = protocol.parse(body, state.config.max_tokens)
        model = state.model(req.model, Task.causal_lm)
        gen, prompt_ids = await generation.start(state, model, req)
        echoes = [await asyncio.to_thread(model.front.decode, ids) if req.echo else "" for ids in prompt_ids]
        shape = protocol(model, req, responses.new_id(protocol.prefix), echoes, gen.phases)
        n_prompt = sum(len(ids) for ids in prompt_ids)
        if req.stream:
            return StreamingResponse(_stream(state, shape, n_prompt, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(state, shape, n_prompt, gen))

    handler.__name__ = protocol.__name__.lower()
    return handler


async def _collect(state: ServerState, shape: Completions, n_prompt: int, gen: Generation) -> dict:
    """Every choice's text, logprobs and finish reason, then the whole response body."""
    total = len(gen.choices)
    texts: list[list[str]] = [[] for _ in range(total)]
    lps: list[list[Any]] = [[] for _ in range(total)]
    finish: list[str] = ["length"] * total
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
        generation.finish(state, shape.model, gen, n)
    want_lps = shape.req.logprobs is not None
    choices = [shape.choice(i, "".join(texts[i]), finish[i], lps[i] if want_lps else None) for i in range(total)]
    return shape.body(choices, responses.usage(n_prompt, n))


async def _stream(state: ServerState, shape: Completions, n_prompt: int, gen: Generation) -> AsyncIterator[str]:
    """Server-sent events for one streamed request (every choice, by index); always ends with ``data: [DONE]``."""
    n = 0
    held: list[list[str]] = [[] for _ in gen.choices]
    try:
        first = [sse(c) for i in range(len(gen.choices)) for c in shape.opening(i)]
        if first:
            yield "".join(first)
        async for items in gen.events_until_done():
            out = []  # every chunk already waiting goes out in one write: fewer syscalls when the client lags
            for i, chunk in items:
                if isinstance(chunk, BaseException):
                    log.error("generation failed: %s", chunk, exc_info=chunk)
                    message = str(chunk) if isinstance(chunk, EdgeftError) else "generation failed"
                    yield "".join(out) + sse(wire.ApiError(500, message, type="server_error").body())
                    return
                n += chunk.token_id is not None
                out.extend(sse(c) for c in _step(shape, held[i], i, chunk))
            if out:
                yield "".join(out)
        if shape.req.include_usage:
            yield sse(shape.usage_chunk(responses.usage(n_prompt, n)))
        yield "data: [DONE]\n\n"
    finally:
        if gen.running:
            state.metrics.cancelled.inc(model=shape.model.name)
        generation.finish(state, shape.model, gen, n)


def _step(shape: Completions, held: list[str], i: int, chunk: Any) -> list[dict]:
    """The events one engine chunk of choice ``i`` makes (its text is held while tool calls may come)."""
    lps = [chunk.logprob] if chunk.logprob is not None else None
    out = []
    if shape.holds:
        held.append(chunk.text)
    else:
        out.extend(shape.streamed(i, chunk.text, lps))
    if chunk.finish_reason is not None:
        finish = chunk.finish_reason if chunk.finish_reason != "cancelled" else "length"
        out.extend(shape.closing(i, "".join(held), finish))
    return out


ROUTES = [Route("/v1/completions", route(Completions), methods=["POST"]),
          Route("/v1/chat/completions", route(Chat), methods=["POST"])]

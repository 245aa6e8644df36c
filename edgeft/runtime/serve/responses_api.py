"""``POST /v1/responses``: OpenAI's Responses API, stateless.

The request is translated into the chat route's ``GenerationRequest`` (``parse``):
``instructions`` become the system message, ``input`` (a string, or a list of messages and
items) the conversation, with ``function_call`` items as the assistant's tool calls and
``function_call_output`` items as tool messages; function ``tools``, ``tool_choice``,
``text.format`` (a JSON schema or object) and ``max_output_tokens`` map onto the chat's
fields. From there it is the chat's path (``generation``: the same engine, sampling chain
and limits). The answer is a list of output items (``reasoning`` for a model that thinks,
a ``message`` with its ``output_text``, ``function_call`` items), whole or as the event
stream (``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``);
``/v1/responses/input_tokens`` counts a request's prompt tokens; the request is parsed in
``responses_wire``. Nothing is
stored: ``store`` is answered false and ``previous_response_id`` is refused. This module
knows the Responses JSON and Starlette responses; nothing of slots or sampling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runtime.serve import generation, middleware, replies, responses_wire
from edgeft.runtime.serve.generation import Generation
from edgeft.runtime.serve.replies import THINKING, Reply
from edgeft.runtime.serve.state import Model, ServerState
from edgeft.runtime.serve.wire import GenerationRequest

log = logging.getLogger("edgeft.serve")

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _response(rid: str, model: Model, req: GenerationRequest, body: dict, created: int, status: str,
              output: list[dict], usage: dict | None) -> dict:
    fmt = req.response_format
    text_format = ({"type": "text"} if fmt is None else {"type": fmt[0]} if fmt[1] is None else
                   {"type": "json_schema", "name": (body.get("text") or {}).get("format", {}).get("name", "schema"),
                    "schema": fmt[1]})
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model.name,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": req.max_tokens,
            "parallel_tool_calls": req.parallel_tool_calls,
            "tool_choice": req.tool_choice[0] if req.tool_choice[1] is None else
            {"type": "function", "name": req.tool_choice[1]},
            "tools": [{"type": "function", "strict": False, **t} for t in req.tools],
            "temperature": req.sampling.get("temperature"), "top_p": req.sampling.get("top_p"),
            "text": {"format": text_format}, "store": False, "metadata": body.get("metadata") or {},
            "usage": usage}


def _usage(n_prompt: int, n: int, thought_tokens: int = 0) -> dict:
    return {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": thought_tokens}, "total_tokens": n_prompt + n}


def _status(reply: Reply) -> str:
    return "incomplete" if reply.finish == "length" and not reply.calls else "completed"


def _item_of(kind: str, iid: str, text: str, status: str = "completed") -> dict:
    if kind == THINKING:
        return {"type": "reasoning", "id": iid, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}
    return {"type": "message", "id": iid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict, status: str = "completed", arguments: str | None = None) -> dict:
    fn = call["function"]
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": fn["name"], "arguments": fn["arguments"] if arguments is None else arguments, "status": status}


class Output:
    """The output items of one response, built from a reply's parts as they arrive; ``events`` for a stream."""

    def __init__(self, stream: bool) -> None:
        self.items: list[dict] = []
        self.kind: str | None = None  # the kind of the item still open
        self.texts: list[str] = []
        self.stream = stream
        self.events: list[tuple[str, dict]] = []

    def _emit(self, event: str, **data: Any) -> None:
        if self.stream:
            self.events.append((event, data))

    def part(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self.close()
            self.kind, self.texts = kind, []
            self.items.append(_item_of(kind, _id("rs" if kind == THINKING else "msg"), "", "in_progress"))
            item = self.items[-1]
            self._emit("response.output_item.added", output_index=len(self.items) - 1, item=item)
            part = item["content"][0]
            self._emit("response.content_part.added", item_id=item["id"], output_index=len(self.items) - 1,
                       content_index=0, part=part)
        self.texts.append(text)
        item = self.items[-1]
        name = "response.reasoning_text.delta" if kind == THINKING else "response.output_text.delta"
        extra: dict[str, Any] = {} if kind == THINKING else {"logprobs": []}
        self._emit(name, item_id=item["id"], output_index=len(self.items) - 1, content_index=0, delta=text, **extra)

    def close(self) -> None:
        if self.kind is None:
            return
        index, kind = len(self.items) - 1, self.kind
        item = self.items[index] = _item_of(kind, self.items[index]["id"], "".join(self.texts))
        self.kind = None
        name = "response.reasoning_text.done" if kind == THINKING else "response.output_text.done"
        extra: dict[str, Any] = {} if kind == THINKING else {"logprobs": []}
        self._emit(name, item_id=item["id"], output_index=index, content_index=0, text=item["content"][0]["text"],
                   **extra)
        self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                   part=item["content"][0])
        self._emit("response.output_item.done", output_index=index, item=item)

    def call(self, call: dict) -> None:
        self.close()
        item = _call_item(call)
        self.items.append(item)
        index = len(self.items) - 1
        self._emit("response.output_item.added", output_index=index, item=_call_item(call, "in_progress", ""))
        self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                   delta=item["arguments"])
        self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                   name=item["name"], arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index, item=item)

    def end(self, reply: Reply, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            self.part(kind, text)
        self.close()
        for c in reply.calls:
            self.call(c)


def _thought_tokens(model: Model, output: Output) -> int:
    thought = "".join(i["content"][0]["text"] for i in output.items if i["type"] == "reasoning")
    return len(model.front.tokenizer.encode(thought, add_special_tokens=False).ids) if thought else 0


async def _collect(state: ServerState, model: Model, gen: Generation, reply: Reply, head: dict,
                   n_prompt: int) -> dict:
    output = Output(stream=False)
    parts, n = await replies.collect(state, model, gen, reply)
    for kind, text in parts:
        output.part(kind, text)
    output.end(reply, reply.end())
    return {**head, "status": _status(reply), "output": output.items,
            "incomplete_details": {"reason": "max_output_tokens"} if _status(reply) == "incomplete" else None,
            "usage": _usage(n_prompt, n, _thought_tokens(model, output))}


class Events:
    """Server-sent events numbered in order (``sequence_number``)."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, name: str, data: dict) -> str:
        body = {"type": name, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {name}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, model: Model, gen: Generation, reply: Reply, head: dict,
                  n_prompt: int) -> AsyncIterator[str]:
    output, n, ev = Output(stream=True), 0, Events()

    def drain() -> str:
        out = "".join(ev(name, data) for name, data in output.events)
        output.events.clear()
        return out

    try:
        yield ev("response.created", {"response": head}) + ev("response.in_progress", {"response": head})
        async for items in gen.events_until_done():
            for _, chunk in items:
                if isinstance(chunk, BaseException):
                    log.error("generation failed: %s", chunk, exc_info=chunk)
                    message = str(chunk) if isinstance(chunk, EdgeftError) else "generation failed"
                    yield drain() + ev("error", {"code": "server_error", "message": message, "param": None})
                    return
                n += chunk.token_id is not None
                for kind, text in reply.feed(chunk):
                    output.part(kind, text)
            text = drain()
            if text:
                yield text
        output.end(reply, reply.end())
        status = _status(reply)
        done = {**head, "status": status, "output": output.items,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": _usage(n_prompt, n, _thought_tokens(model, output))}
        yield drain() + ev(f"response.{status}", {"response": done})
    finally:
        if gen.running:
            state.metrics.cancelled.inc(model=model.name)
        generation.finish(state, model, gen, n)


@middleware.api
async def responses(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    req = responses_wire.parse(body, state.config.max_tokens)
    model = state.model(req.model, Task.causal_lm)
    gen, prompt_ids = await generation.start(state, model, req)
    reply, n_prompt = Reply(req, gen.phases[0]), len(prompt_ids[0])
    head = _response(_id("resp"), model, req, body, int(time.time()), "in_progress", [], None)
    if req.stream:
        return StreamingResponse(_stream(state, model, gen, reply, head, n_prompt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _collect(state, model, gen, reply, head, n_prompt))


@middleware.api
async def input_tokens(request: Request) -> Response:
    """The prompt's token count for a Responses request (OpenAI's ``responses.input_tokens.count``)."""
    state, body = await middleware.request_body(request)
    req = responses_wire.parse(body, state.config.max_tokens, count_only=True)
    model = state.model(req.model, Task.causal_lm)
    (ids,) = await asyncio.to_thread(generation.all_prompt_ids, model, req)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(ids)})


ROUTES = [Route("/v1/responses", responses, methods=["POST"]),
          Route("/v1/responses/input_tokens", input_tokens, methods=["POST"])]

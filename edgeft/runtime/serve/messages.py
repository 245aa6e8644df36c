"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API.

The request is translated into the chat route's ``GenerationRequest`` (``parse``): the
``system`` prompt becomes the first message, content blocks become chat messages
(``tool_use`` blocks an assistant's tool calls, ``tool_result`` blocks tool messages,
``thinking`` blocks the turn's ``reasoning_content``), ``tools`` with their
``input_schema`` and ``tool_choice`` become the chat's tools, ``thinking`` the thinking
budget. From there it is the chat's path: ``generation`` tokenizes, admits and runs it on
the same engine under the same limits. The answer is shown as Anthropic's content blocks
(``replies``), whole or as its event stream (``message_start``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``).
Errors take Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``.
This module knows Anthropic's JSON and Starlette responses; nothing of slots or sampling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runtime.serve import chat_wire, generation, middleware, replies, wire
from edgeft.runtime.serve.generation import Generation
from edgeft.runtime.serve.replies import THINKING, Reply
from edgeft.runtime.serve.state import Model, ServerState
from edgeft.runtime.serve.wire import GenerationRequest, bad

log = logging.getLogger("edgeft.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


# ---------------------------------------------------------------- the request

def _text_of(where: str, content: Any) -> str:
    """A tool result's or system prompt's content: a string or text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        for b in content:
            if b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise bad(f"{where}: only text blocks are supported here, got {b.get('type')!r}")
        return "".join(b["text"] for b in content)
    raise bad(f"{where} must be a string or a list of text blocks")


def _blocks(i: int, content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad(f"messages.{i}.content must be a string or a list of content blocks")
    return content


def _user(i: int, blocks: list[dict]) -> list[dict]:
    """A user turn: each ``tool_result`` block a tool message, the text one user message after them."""
    out, text = [], []
    for j, b in enumerate(blocks):
        kind, where = b.get("type"), f"messages.{i}.content.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_result" and isinstance(b.get("tool_use_id"), str):
            result = _text_of(where, b.get("content", ""))
            out.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                        "content": f"Error: {result}" if b.get("is_error") else result})
        elif kind in ("image", "document"):
            raise bad(f"{where}: {kind} blocks are not supported: this server's models read text only")
        else:
            raise bad(f"{where}: a user turn takes text and tool_result blocks, got {kind!r}")
    return out + ([{"role": "user", "content": "".join(text)}] if text or not out else [])


def _assistant(i: int, blocks: list[dict]) -> dict:
    """An assistant turn: its text, its thinking (``reasoning_content``), its ``tool_use`` blocks as calls."""
    text, thought, calls = [], [], []
    for j, b in enumerate(blocks):
        kind, where = b.get("type"), f"messages.{i}.content.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            thought.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use" and isinstance(b.get("id"), str) and isinstance(b.get("name"), str):
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
        else:
            raise bad(f"{where}: an assistant turn takes text, thinking and tool_use blocks, got {kind!r}")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if thought:
        out["reasoning_content"] = "".join(thought)
    if calls:
        out["tool_calls"] = calls
    return out


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of("system", system)})
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise bad(f"messages.{i}.role must be 'user' or 'assistant'")
        blocks = _blocks(i, m.get("content"))
        out.extend(_user(i, blocks) if role == "user" else [_assistant(i, blocks)])
    return out


def _tools(body: dict) -> dict:
    """Anthropic's ``tools`` and ``tool_choice`` as the chat's (checked by ``wire``'s reader)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list")
    shaped = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise bad(f"tools: only custom tools (name, description, input_schema) are supported, got {kind!r}")
        if not chat_wire.tool_name_ok(t.get("name")):
            raise bad(f"tools.{i}.name must be 1 to 64 letters, digits, _ or -")
        if not isinstance(t.get("input_schema"), dict):
            raise bad(f"tools.{i}.input_schema: Field required (a JSON schema object)")
        shaped.append({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                                        "parameters": t.get("input_schema") or {}}})
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and isinstance(choice.get("type"), str)):
        raise bad("'tool_choice' must be an object such as {\"type\": \"auto\"}")
    kind = None if choice is None else choice["type"]
    mode: Any = {None: None, "auto": "auto", "any": "required", "none": "none"}.get(kind, kind)
    if mode == "tool":
        mode = {"type": "function", "function": {"name": choice.get("name")}}  # type: ignore[union-attr]
    elif mode not in (None, "auto", "required", "none"):
        raise bad("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'")
    parallel = not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True)
    tools_, choice_, parallel_ = chat_wire.tools({"tools": shaped, "tool_choice": mode, "parallel_tool_calls": parallel})
    return dict(tools=tools_, tool_choice=choice_, parallel_tool_calls=parallel_)


def _thinking(body: dict, has_tools: bool) -> dict:
    """``thinking``: enabled with ``budget_tokens`` (the thinking budget), or disabled (the template's
    ``enable_thinking`` switch, and a budget of 0 should the model open a thought anyway)."""
    v = body.get("thinking")
    if v is None:
        return {}
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "enabled":
        budget = v.get("budget_tokens")
        if budget is not None and (not wire.is_int(budget) or budget < 0):
            raise bad("'thinking.budget_tokens' must be a non-negative integer")
        return dict(max_reasoning_tokens=budget)
    if kind == "adaptive":
        return {}
    if kind == "disabled":
        return dict(max_reasoning_tokens=0, template_kwargs={} if has_tools else {"enable_thinking": False})
    raise bad("'thinking.type' must be 'enabled', 'adaptive' or 'disabled'")


def _stop_sequences(body: dict) -> tuple[str, ...]:
    v = body.get("stop_sequences")
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > wire.MAX_STOP:
        raise bad(f"'stop_sequences' must be a list of at most {wire.MAX_STOP} non-empty strings")
    return tuple(v)


def parse(body: dict, max_tokens_cap: int, count_only: bool = False) -> GenerationRequest:
    """An Anthropic messages request as the chat's ``GenerationRequest``."""
    max_tokens = body.get("max_tokens")
    if not count_only:
        if max_tokens is None:
            raise bad("max_tokens: Field required")
        if not wire.is_int(max_tokens) or max_tokens < 1:
            raise bad(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        if max_tokens > max_tokens_cap:
            raise bad(f"'max_tokens' must be at most {max_tokens_cap} on this server, got {max_tokens}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false")
    tools = _tools(body)
    sampling = {**wire._table(body), "stop": _stop_sequences(body)}
    return GenerationRequest(model=wire.model_name(body), messages=_messages(body), max_tokens=max_tokens,
                             sampling={k: v for k, v in sampling.items() if v}, stream=stream, **tools,
                             **_thinking(body, bool(tools["tools"])))


# ---------------------------------------------------------------- the answer

def stop_reason(reply: Reply) -> str:
    if reply.calls:
        return "tool_use"
    if reply.finish == "length":
        return "max_tokens"
    return "stop_sequence" if reply.stopped_by_string and reply.req.sampling.get("stop") else "end_turn"


def tool_use(call: dict) -> dict:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": fn["name"],
            "input": args if isinstance(args, dict) else {}}


def _block(kind: str, text: str = "") -> dict:
    if kind == THINKING:
        return {"type": "thinking", "thinking": text, "signature": ""}
    return {"type": "text", "text": text}


def _message(rid: str, model: Model, content: list[dict], reply: Reply | None, n_prompt: int, n: int) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": model.name, "content": content,
            "stop_reason": None if reply is None else stop_reason(reply),
            "stop_sequence": None if reply is None else reply.stop_sequence(model.front.decode),
            "usage": {"input_tokens": n_prompt, "output_tokens": n}}


async def _collect(state: ServerState, model: Model, gen: Generation, reply: Reply, rid: str, n_prompt: int) -> dict:
    parts, n = await replies.collect(state, model, gen, reply)
    parts += reply.end()
    content: list[dict] = []
    for kind, text in parts:  # consecutive parts of one kind make one block
        if content and content[-1]["type"] == kind:
            content[-1][kind] += text
        else:
            content.append(_block(kind, text))
    content += [tool_use(c) for c in reply.calls]
    return _message(rid, model, content, reply, n_prompt, n)


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


class Blocks:
    """The content blocks of a streamed message: a block opens when a part of another kind comes."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def part(self, kind: str, text: str) -> list[str]:
        out = self.close() if kind != self.kind else []
        if kind != self.kind:
            self.index, self.kind = self.index + 1, kind
            out.append(event("content_block_start", {"index": self.index, "content_block": _block(kind)}))
        delta = ({"type": "thinking_delta", "thinking": text} if kind == THINKING
                 else {"type": "text_delta", "text": text})
        return [*out, event("content_block_delta", {"index": self.index, "delta": delta})]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.index})]

    def tool(self, call: dict) -> list[str]:
        out = self.close()
        self.index += 1
        block = tool_use(call)
        out.append(event("content_block_start", {"index": self.index, "content_block": {**block, "input": {}}}))
        out.append(event("content_block_delta", {"index": self.index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
        return [*out, event("content_block_stop", {"index": self.index})]


async def _stream(state: ServerState, model: Model, gen: Generation, reply: Reply, rid: str,
                  n_prompt: int) -> AsyncIterator[str]:
    """Anthropic's event stream for one message."""
    n = 0
    blocks = Blocks()
    try:
        yield event("message_start", {"message": _message(rid, model, [], None, n_prompt, 0)})
        async for items in gen.events_until_done():
            out: list[str] = []
            for _, chunk in items:
                if isinstance(chunk, BaseException):
                    log.error("generation failed: %s", chunk, exc_info=chunk)
                    message = str(chunk) if isinstance(chunk, EdgeftError) else "generation failed"
                    yield "".join(out) + event("error", {"error": {"type": "api_error", "message": message}})
                    return
                n += chunk.token_id is not None
                for kind, text in reply.feed(chunk):
                    out += blocks.part(kind, text)
            if out:
                yield "".join(out)
        out = [e for kind, text in reply.end() for e in blocks.part(kind, text)] + blocks.close()
        out += [e for call in reply.calls for e in blocks.tool(call)]
        out.append(event("message_delta", {"delta": {"stop_reason": stop_reason(reply),
                                                     "stop_sequence": reply.stop_sequence(model.front.decode)},
                                           "usage": {"output_tokens": n}}))
        yield "".join(out) + event("message_stop", {})
    finally:
        if gen.running:
            state.metrics.cancelled.inc(model=model.name)
        generation.finish(state, model, gen, n)


# ---------------------------------------------------------------- the routes

def anthropic_errors(handler: Callable) -> Callable:
    """``middleware.api``'s error answers, in Anthropic's shape."""
    inner = middleware.api(handler)

    async def wrapped(request: Request) -> Response:
        response = await inner(request)
        if response.status_code < 400 or not isinstance(response, JSONResponse):
            return response
        message = json.loads(bytes(response.body)).get("error", {}).get("message", "error")
        body = {"type": "error", "error": {"type": ERROR_TYPES.get(response.status_code, "api_error"),
                                           "message": message}}
        headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        return JSONResponse(body, status_code=response.status_code, headers=headers)

    wrapped.__name__ = handler.__name__
    return wrapped


@anthropic_errors
async def messages(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    req = parse(body, state.config.max_tokens)
    model = state.model(req.model, Task.causal_lm)
    gen, prompt_ids = await generation.start(state, model, req)
    reply, rid, n_prompt = Reply(req, gen.phases[0]), f"msg_{uuid.uuid4().hex[:24]}", len(prompt_ids[0])
    if req.stream:
        return StreamingResponse(_stream(state, model, gen, reply, rid, n_prompt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _collect(state, model, gen, reply, rid, n_prompt))


@anthropic_errors
async def count_tokens(request: Request) -> Response:
    state, body = await middleware.request_body(request)
    req = parse(body, state.config.max_tokens, count_only=True)
    model = state.model(req.model, Task.causal_lm)
    (ids,) = await asyncio.to_thread(generation.all_prompt_ids, model, req)
    return JSONResponse({"input_tokens": len(ids)})


ROUTES = [Route("/v1/messages", messages, methods=["POST"]),
          Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]

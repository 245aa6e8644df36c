"""The Responses API's request side: ``parse`` turns a ``/v1/responses`` body into the chat's
``GenerationRequest`` (instructions and input items as messages, function tools, ``text.format``,
``max_output_tokens``, reasoning effort); a stateful field is a 400. It knows JSON shapes and
limits, nothing of HTTP, threads or models.
"""

from __future__ import annotations

from typing import Any

from edgeft.runtime.serve import chat_wire, wire
from edgeft.runtime.serve.wire import GenerationRequest, bad

STATEFUL = ("previous_response_id", "conversation")  # what a stateless server cannot honour


# ---------------------------------------------------------------- the request

def _content(where: str, content: Any) -> str:
    """A message's content: a string or text parts (``input_text``, ``output_text``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts", "input")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad(f"{where}.content[{j}]: {kind} is not supported: this server's models read text only", "input")
        else:
            raise bad(f"{where}.content[{j}]: expected an input_text part, got {kind!r}", "input")
    return "".join(out)


def _item(i: int, item: Any, out: list[dict]) -> None:
    """Append input item ``i`` to the chat messages ``out`` (consecutive calls join one assistant turn)."""
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad(f"{where} must be an object", "input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad(f"{where}.role must be user, assistant, system or developer", "input")
        out.append({"role": "system" if role == "developer" else role, "content": _content(where, item.get("content"))})
    elif kind == "function_call":
        if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            raise bad(f"{where}: a function_call needs call_id, name and arguments (a JSON string)", "input")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"] or "{}"}}
        if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
            out[-1]["tool_calls"].append(call)
        elif out and out[-1]["role"] == "assistant":
            out[-1]["tool_calls"] = [call]
        else:
            out.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str):
            raise bad(f"{where}: a function_call_output needs its call_id", "input")
        out.append({"role": "tool", "tool_call_id": item["call_id"],
                    "content": output if isinstance(output, str) else _content(where, output)})
    elif kind == "reasoning":
        return  # the model's earlier thinking: templates drop it from past turns
    elif kind == "item_reference":
        raise bad(f"{where}: item references need stored responses; this server stores none", "input")
    else:
        raise bad(f"{where}: items of type {kind!r} are not supported", "input")


def _input(body: dict) -> list[dict]:
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        for i, item in enumerate(given):
            _item(i, item, messages)
    else:
        raise bad("'input' must be a string or a non-empty list of input items", "input")
    return messages


def _tools(body: dict) -> dict:
    """Function tools (flat: name, description, parameters) and ``tool_choice``, as the chat's."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    shaped = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise bad(f"only function tools are supported, got {kind!r}", "tools")
        if not chat_wire.tool_name_ok(t.get("name")):
            raise bad(f"tools[{i}].name must be 1 to 64 letters, digits, _ or -", "tools")
        shaped.append({"type": "function", "function": {k: t.get(k) for k in ("name", "description", "parameters")
                                                        if t.get(k) is not None}})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    tools_, choice_, parallel = chat_wire.tools({"tools": shaped, "tool_choice": choice,
                                             "parallel_tool_calls": body.get("parallel_tool_calls", True)})
    return dict(tools=tools_, tool_choice=choice_, parallel_tool_calls=parallel)


def _text_format(body: dict) -> tuple[str, dict | None] | None:
    """``text.format``: text, json_object, or json_schema (flat: name, schema, strict)."""
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if text is not None and not isinstance(text, dict):
        raise bad("'text' must be an object", "text")
    if fmt is None:
        return None
    spec = {"type": fmt.get("type"), "json_schema": fmt} if isinstance(fmt, dict) else fmt
    try:
        return wire.response_format({"response_format": spec})
    except wire.ApiError as exc:
        raise bad(exc.message.replace("response_format.json_schema", "text.format").replace(
            "response_format", "text.format"), "text") from None


def parse(body: dict, max_tokens_cap: int, count_only: bool = False) -> GenerationRequest:
    """A Responses request as the chat's ``GenerationRequest``."""
    for name in STATEFUL:
        if body.get(name) is not None:
            raise bad(f"'{name}' is not supported: this server is stateless (it stores no responses); "
                      "send the whole conversation in 'input'", name)
    if isinstance(body.get("prompt"), dict):  # a stored prompt template, by id
        raise bad("'prompt' (a stored prompt template) is not supported: send 'instructions' and 'input'", "prompt")
    if body.get("background"):
        raise bad("'background' responses are not supported", "background")
    max_tokens = None if count_only else wire.opt_int(body, "max_output_tokens", 1)
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise bad(f"'max_output_tokens' must be at most {max_tokens_cap} on this server, got {max_tokens}",
                  "max_output_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    tools = _tools(body)
    return GenerationRequest(model=wire.model_name(body), messages=_input(body), max_tokens=max_tokens,
                             sampling=wire._table(body), stream=stream, response_format=_text_format(body),
                             **tools, **_reasoning(body, bool(tools["tools"])))


def _reasoning(body: dict, has_tools: bool) -> dict:
    """The chat's reasoning fields (``max_reasoning_tokens``...); ``reasoning.effort`` "none" turns thinking off."""
    given = body.get("reasoning")
    if given is not None and not isinstance(given, dict):
        raise bad("'reasoning' must be an object", "reasoning")
    try:
        return chat_wire.reasoning(body, (given or {}).get("effort"), has_tools)
    except wire.ApiError as exc:
        param = "reasoning" if exc.param == "reasoning_effort" else exc.param
        raise bad(exc.message.replace("'reasoning_effort'", "'reasoning.effort'"), param) from None


# ---------------------------------------------------------------- the answer


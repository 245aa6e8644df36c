"""The chat side of the wire format: messages, tools and tool choice, reasoning settings, ``parse_chat``.

``/v1/chat/completions`` is parsed here; ``/v1/messages`` and ``/v1/responses`` translate
their own shapes into the same ``GenerationRequest`` with these readers (``tools``,
``reasoning``). Like ``wire``, it knows JSON shapes and limits, nothing of HTTP, threads or
models.
"""

from __future__ import annotations

from typing import Any

from edgeft.runtime.serve.wire import GenerationRequest, _sampling, bad, opt_int, response_format

def _text_content(i: int, content: Any) -> str:
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return content


def _tool_calls(i: int, calls: Any) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise bad(f"messages[{i}].tool_calls must be a non-empty list", "messages")
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
            raise bad(f"messages[{i}].tool_calls: each needs function.name and function.arguments (a JSON string)",
                      "messages")
        out.append({"id": str(c.get("id") or ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments") or "{}"}})
    return out


def _message(i: int, m: Any) -> dict[str, Any]:
    """One chat message; an assistant turn may carry ``tool_calls`` (content null), a tool turn its ``tool_call_id``."""
    if not isinstance(m, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        raise bad(f"messages[{i}].role must be a non-empty string", "messages")
    if role == "assistant" and m.get("tool_calls") is not None:
        out: dict[str, Any] = {"role": role, "content": "" if content is None else _text_content(i, content),
                               "tool_calls": _tool_calls(i, m["tool_calls"])}
        return out
    out = {"role": role, "content": _text_content(i, content)}
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"messages[{i}]: a tool message needs its 'tool_call_id'", "messages")
        out["tool_call_id"] = m["tool_call_id"]
    return out


def tool_name_ok(name: Any) -> bool:
    """A function name as OpenAI allows it: 1 to 64 of a-z, A-Z, 0-9, _ and -."""
    return isinstance(name, str) and 0 < len(name) <= 64 and all(c.isalnum() or c in "_-" for c in name)


def tools(body: dict) -> tuple[tuple[dict, ...], tuple[str, str | None], bool]:
    """``tools``, ``tool_choice`` (mode, function name) and ``parallel_tool_calls``."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list of function tools", "tools")
    out, names = [], set()
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not tool_name_ok(name):
            raise bad("each tool must be {'type': 'function', 'function': {'name': a-z, 0-9, _ or -, ...}}", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad(f"tool '{name}': 'parameters' must be a JSON schema object", "tools")
        if name in names:
            raise bad(f"two tools are named '{name}'", "tools")
        names.add(name)
        out.append({"name": name, "description": str(fn.get("description") or ""), "parameters": params,
                    "strict": fn.get("strict") is True})
    choice = body.get("tool_choice")
    if choice is None:
        mode, fname = ("auto" if out else "none"), None
    elif choice in ("auto", "none", "required"):
        mode, fname = choice, None
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        mode, fname = "function", choice["function"]["name"]
    else:
        raise bad("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}",
                  "tool_choice")
    if choice is not None and not out:
        raise bad("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    if fname is not None and fname not in names:
        raise bad(f"'tool_choice' names '{fname}', which is not among the tools", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    return tuple(out), (mode, fname), parallel


RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token")


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def reasoning(body: dict, effort: Any = None, has_tools: bool = False) -> dict[str, Any]:
    """``reasoning_format`` (none, auto, deepseek), ``max_reasoning_tokens`` and ``chat_template_kwargs``;
    a reasoning ``effort`` of "none" turns thinking off (the template's ``enable_thinking`` when it can
    take variables, and a budget of 0), as llama-server does; the other efforts change nothing."""
    from edgeft.runtime.reasoning import ReasoningFormat

    fmt = body.get("reasoning_format")
    if fmt is not None and fmt not in [f.value for f in ReasoningFormat]:
        raise bad(f"'reasoning_format' must be one of {', '.join(f.value for f in ReasoningFormat)}, got {fmt!r}",
                  "reasoning_format")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    taken = [k for k in kwargs or {} if k in RESERVED_TEMPLATE_VARS]
    if taken:
        raise bad(f"'chat_template_kwargs' may not set '{taken[0]}'", "chat_template_kwargs")
    out = dict(reasoning_format=fmt or "auto", max_reasoning_tokens=opt_int(body, "max_reasoning_tokens", 0),
               template_kwargs=dict(kwargs or {}))
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}",
                  "reasoning_effort")
    if effort == "none":
        out["max_reasoning_tokens"] = 0
        if not has_tools:
            out["template_kwargs"] = {"enable_thinking": False, **out["template_kwargs"]}
    return out


def parse_chat(body: dict, max_tokens_cap: int) -> GenerationRequest:
    """``POST /v1/chat/completions``: a non-empty list of {role, content} messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    msgs = [_message(i, m) for i, m in enumerate(messages)]
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get("echo") not in (None, False):
        raise bad("'echo' is a /v1/completions field", "echo")
    tools_, choice, parallel = tools(body)
    return GenerationRequest(messages=msgs, tools=tools_, tool_choice=choice, parallel_tool_calls=parallel,
                             response_format=response_format(body),
                             **reasoning(body, body.get("reasoning_effort"), bool(tools_)),
                             **_sampling(body, max_tokens_cap, name, chat=True))

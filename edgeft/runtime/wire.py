"""The OpenAI-compatible wire format: request parsing, response shapes, error bodies.

Every request body is checked field by field here, so a wrong type or value becomes a
400 with an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``)
and never a 500. This module knows JSON shapes and limits; it knows nothing of HTTP
frameworks, threads or models (it does not tokenize or generate).
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from typing import Any

MAX_STOP = 16
MAX_SEED = 2**63 - 1  # a seed is a non-negative int64, as in most OpenAI-compatible servers
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per /v1/completions request
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered to the client as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    """A parsed /v1/completions or /v1/chat/completions request (model and prompt still unresolved)."""

    model: str | None
    prompt: str | list[int] | None = None  # completions: the first (often only) prompt
    messages: list[dict[str, Any]] | None = None  # chat
    max_tokens: int | None = None  # None: the artifact's default, clamped to the context
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices per prompt, decoded as a batch; choice i is seeded with seed + i
    logprobs: int | None = None  # top alternatives per token (0: the chosen token's only); None: off
    echo: bool = False  # completions: the prompt's text before the completion
    ignore_eos: bool = False
    speculate: str | None = None  # extension: prompt-lookup drafts "auto", "on" or "off" (None: the server's)
    prompts: tuple = ()  # completions: every prompt (one choice each, times n)
    response_format: tuple[str, dict | None] | None = None  # ("json_object", None) or ("json_schema", schema)
    tools: tuple[dict, ...] = ()  # chat: {"name", "description", "parameters"} per function
    tool_choice: tuple[str, str | None] = ("none", None)  # mode ("auto", "none", "required", "function"), name
    parallel_tool_calls: bool = True


@dataclass(frozen=True)
class ClassifyRequest:
    model: str | None
    texts: list[str]
    single: bool  # the input was one string, not a list


def check_unicode(body: Any) -> None:
    """Refuse a body holding a string UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``).

    JSON allows ``\\ud800`` escapes, Python decodes them into unencodable strings, and the
    tokenizers (and the response writer) would fail on them later: one 400 here instead.
    Walks the body without recursion, so any nesting the JSON parser accepted is fine.
    """
    todo = [("", body)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, dict):
            todo.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
            todo.extend((where, k) for k in v)
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                name = where.split(".")[0].split("[")[0] or None
                raise bad(f"'{where or 'body'}' holds a lone UTF-16 surrogate: not valid Unicode text",
                          name, "invalid_unicode") from None


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str | None
    inputs: list  # strings or token-id lists
    encoding_format: str  # "float" | "base64"
    dimensions: int | None


# ---------------------------------------------------------------- field readers

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be at least {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be at most {hi}, got {v}", name)
    return v


def _opt_number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v):
        raise bad(f"'{name}' must be a number, got {type(v).__name__}", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _opt_bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {type(v).__name__}", name)
    return v


def _model(body: dict) -> str | None:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise bad(f"'model' must be a string, got {type(v).__name__}", "model")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings", "stop")
    return tuple(items)


def _unsupported(body: dict) -> None:
    """Reject features edgeft does not implement rather than silently ignoring them."""
    for name in ("suffix", "functions"):
        if body.get(name) not in (None, False, 0):
            raise bad(f"'{name}' is not supported by this server", name)
    for name in ("function_call", "audio", "prediction",
                 "web_search_options", "reasoning_effort"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is not supported by this server", name)
    if body.get("modalities") not in (None, ["text"]):
        raise bad("'modalities' other than [\"text\"] are not supported", "modalities")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad("only 'best_of': 1 is supported", "best_of")


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit()) or not _is_number(b) or not -100 <= b <= 100:
            raise bad("'logit_bias' maps token ids (as strings) to numbers in [-100, 100]", "logit_bias")
        out[int(k)] = float(b)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: ``logprobs`` true plus ``top_logprobs`` 0..20. Completions: ``logprobs`` 0..20."""
    if chat:
        on = _opt_bool(body, "logprobs")
        top = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not on:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if on else None
    return _opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def _speculate(body: dict) -> str | None:
    """The ``speculate`` extension: "auto", "on" or "off" (true and false mean on and off)."""
    v = body.get("speculate")
    if v is None:
        return None
    if isinstance(v, bool):
        return "on" if v else "off"
    if v not in ("auto", "on", "off"):
        raise bad(f"'speculate' must be \"auto\", \"on\", \"off\", true or false, got {v!r}", "speculate")
    return v


def _sampling(body: dict, max_tokens_cap: int, max_tokens_name: str = "max_tokens",
              chat: bool = False) -> dict[str, Any]:
    _unsupported(body)
    max_tokens = _opt_int(body, max_tokens_name, 1, None)
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise bad(f"'{max_tokens_name}' must be at most {max_tokens_cap} on this server, got {max_tokens}",
                  max_tokens_name)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = (opts or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options")
    return dict(
        model=_model(body),
        max_tokens=max_tokens,
        temperature=_opt_number(body, "temperature", 0.0, 2.0),
        top_p=_opt_number(body, "top_p", 0.0, 1.0, lo_open=True),
        top_k=_opt_int(body, "top_k", 0, None),
        min_p=_opt_number(body, "min_p", 0.0, 1.0),
        repetition_penalty=_opt_number(body, "repetition_penalty", 0.0, 10.0, lo_open=True),
        presence_penalty=_opt_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_opt_number(body, "frequency_penalty", -2.0, 2.0),
        logit_bias=_logit_bias(body),
        seed=_opt_int(body, "seed", 0, MAX_SEED),
        stop=_stop(body),
        stream=_opt_bool(body, "stream"),
        include_usage=include_usage,
        n=_opt_int(body, "n", 1, MAX_N) or 1,
        logprobs=_logprobs(body, chat),
        ignore_eos=_opt_bool(body, "ignore_eos"),
        speculate=_speculate(body),
    )


# ---------------------------------------------------------------- requests

def _one_prompt(p: Any) -> str | list[int] | None:
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p):
        return p
    return None


def parse_completion(body: dict, max_tokens_cap: int) -> GenerationRequest:
    """``POST /v1/completions``: prompt is a string, a list of token ids, or a list of either (one choice each)."""
    prompt = body.get("prompt")
    one = _one_prompt(prompt)
    if one is not None:
        prompts = [one]
    elif isinstance(prompt, list) and prompt and all(_one_prompt(p) is not None for p in prompt):
        prompts = [_one_prompt(p) for p in prompt]
    else:
        raise bad("'prompt' must be a string, a list of token ids, or a list of those", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    for name in ("response_format", "tools", "tool_choice"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is a /v1/chat/completions field", name)
    return GenerationRequest(prompt=prompts[0], prompts=tuple(prompts), echo=_opt_bool(body, "echo"),
                             **_sampling(body, max_tokens_cap))


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


def _tools(body: dict) -> tuple[tuple[dict, ...], tuple[str, str | None], bool]:
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
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise bad("each tool must be {'type': 'function', 'function': {'name': a-z, 0-9, _ or -, ...}}", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad(f"tool '{name}': 'parameters' must be a JSON schema object", "tools")
        if name in names:
            raise bad(f"two tools are named '{name}'", "tools")
        names.add(name)
        out.append({"name": name, "description": str(fn.get("description") or ""), "parameters": params})
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


def _response_format(body: dict) -> tuple[str, dict | None] | None:
    """OpenAI's ``response_format``: text (no constraint), json_object, or json_schema with its schema."""
    v = body.get("response_format")
    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = v.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return ("json_schema", schema)
    raise bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")


def parse_chat(body: dict, max_tokens_cap: int) -> GenerationRequest:
    """``POST /v1/chat/completions``: a non-empty list of {role, content} messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    msgs = [_message(i, m) for i, m in enumerate(messages)]
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get("echo") not in (None, False):
        raise bad("'echo' is a /v1/completions field", "echo")
    tools, choice, parallel = _tools(body)
    return GenerationRequest(messages=msgs, tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
                             response_format=_response_format(body), **_sampling(body, max_tokens_cap, name, chat=True))


def parse_classify(body: dict, max_inputs: int) -> ClassifyRequest:
    """``POST /v1/classify``: ``{"model", "input": str | [str]}``."""
    value = body.get("input")
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a non-empty list of strings", "input")
    if len(texts) > max_inputs:
        raise bad(f"at most {max_inputs} inputs per request, got {len(texts)}", "input")
    return ClassifyRequest(model=_model(body), texts=texts, single=single)


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(t) and t >= 0 for t in v)


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
    return EmbeddingsRequest(model=_model(body), inputs=inputs, encoding_format=fmt,
                             dimensions=_opt_int(body, "dimensions", 1, None))


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, u: dict,
                    choices: list[dict] | None = None) -> dict[str, Any]:
    """A completions response: ``choices`` as made by ``completion_choice`` (else one from ``text``)."""
    choices = choices or [completion_choice(0, text, finish)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": u}


def chat_body(rid: str, model: str, text: str, finish: str, u: dict,
              choices: list[dict] | None = None) -> dict[str, Any]:
    """A chat response: ``choices`` as made by ``chat_choice`` (else one from ``text``)."""
    choices = choices or [chat_choice(0, text, finish)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": u}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def chat_choice(index: int, text: str | None, finish: str, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}


def tool_call_delta(calls: list[dict]) -> dict[str, Any]:
    """A streamed delta carrying whole tool calls, each with its index (as the openai client assembles them)."""
    return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}


def _lp(v: float) -> float:
    return max(float(v), -9999.0)  # JSON has no -Infinity; OpenAI reports masked tokens as -9999


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """``{"content": [...]}`` for (token text, logprob, [(alternative text, logprob)...]) per token."""
    def item(t: str, lp: float) -> dict[str, Any]:
        return {"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8"))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    offsets, pos = [], offset
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [_lp(lp) for _, lp, _ in entries],
            "top_logprobs": [{a: _lp(b) for a, b in top} for _, _, top in entries], "text_offset": offsets}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, index: int = 0,
                     logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [completion_choice(index, text, finish, logprobs)]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, index: int = 0,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, chat: bool, u: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": u}


def classify_body(model: str, results: list[dict]) -> dict[str, Any]:
    data = [{"object": "classification", "index": i, "label": r["label"],
             "score": float(r["scores"][r["label"]]), "scores": {k: float(v) for k, v in r["scores"].items()}}
            for i, r in enumerate(results)]
    return {"object": "list", "model": model, "data": data}


def embeddings_body(model: str, vectors: list, fmt: str, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's embeddings list; ``base64`` is the little-endian float32 bytes (as the openai client decodes)."""
    def enc(v: Any) -> Any:
        if fmt == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]

    data = [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "model": model, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

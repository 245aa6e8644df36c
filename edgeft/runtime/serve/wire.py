"""The OpenAI-compatible wire format of requests: parsing and error bodies (``responses``: the answers).

Every request body is checked field by field here, so a wrong type or value becomes a
400 with an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``)
and never a 500. The sampling fields are read from one table, ``SamplingParams``' fields
(``edgeft.runtime.params.wire_fields``: the name on the wire, the type, the declared
range), so a new sampling setting needs nothing here. This module knows JSON shapes and
limits; it knows nothing of HTTP frameworks, threads or models (it does not tokenize or
generate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeft.runtime.params import MAX_TOP_LOGPROBS, check, wire_fields

MAX_STOP = 16
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per /v1/completions request
MAX_TOKEN_ID = 2**31 - 1  # above every vocabulary; the model's own size is checked by ``check_token_ids``


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
    """A parsed /v1/completions or /v1/chat/completions request (model and prompt still unresolved);
    /v1/messages and /v1/responses requests are translated into the chat's."""

    model: str | None
    prompt: str | list[int] | None = None  # completions: the first (often only) prompt
    messages: list[dict[str, Any]] | None = None  # chat
    max_tokens: int | None = None  # None: the artifact's default, clamped to the context
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields given (not max_new_tokens)
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices per prompt, decoded as a batch; choice i is seeded with seed + i
    echo: bool = False  # completions: the prompt's text before the completion
    prompts: tuple = ()  # completions: every prompt (one choice each, times n)
    response_format: tuple[str, dict | None] | None = None  # ("json_object", None) or ("json_schema", schema)
    tools: tuple[dict, ...] = ()  # chat: {"name", "description", "parameters", "strict"} per function
    tool_choice: tuple[str, str | None] = ("none", None)  # mode ("auto", "none", "required", "function"), name
    parallel_tool_calls: bool = True
    reasoning_format: str = "auto"  # chat: "none" keeps a reasoning model's thinking in the content
    max_reasoning_tokens: int | None = None  # chat: the thinking budget (the thought is closed by force)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat: extra variables for the template

    @property
    def seed(self) -> int | None:
        return self.sampling.get("seed")

    @property
    def logprobs(self) -> int | None:
        """Top alternatives per token (0: the chosen token's only); None: off."""
        return self.sampling.get("logprobs")


# ---------------------------------------------------------------- field readers

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v):
        raise bad(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be at least {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be at most {hi}, got {v}", name)
    return v


_TYPES = {bool: ("true or false", lambda v: isinstance(v, bool)), int: ("an integer", is_int),
          float: ("a number", _is_number)}


def _table(body: dict) -> dict[str, Any]:
    """Every ``SamplingParams`` field the table puts on the wire that the body gives: type and range checked."""
    out: dict[str, Any] = {}
    for name, f, kind in wire_fields():
        v = body.get(name)
        if v is None:
            continue
        what, fits = _TYPES[kind]
        if not fits(v):
            raise bad(f"'{name}' must be {what}, got {type(v).__name__}", name)
        problem = check(f, v, f"'{name}'")
        if problem is not None:
            raise bad(problem, name)
        out[f.name] = float(v) if kind is float else v
    return out


def _opt_bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {type(v).__name__}", name)
    return v


def model_name(body: dict) -> str | None:
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
                 "web_search_options"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is not supported by this server", name)
    if body.get("modalities") not in (None, ["text"]):
        raise bad("'modalities' other than [\"text\"] are not supported", "modalities")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad("only 'best_of': 1 is supported", "best_of")


def token_id(v: Any) -> int | None:
    """A token id as the wire may give it, or None: a JSON integer, or (an object's key) a string of
    ASCII digits, either in 0..``MAX_TOKEN_ID``. The one reader of token ids: ``str.isdigit`` takes
    "²" and ``int`` takes 5,000 digits only to fail later, so neither is used alone."""
    if isinstance(v, str):
        if not (0 < len(v) <= len(str(MAX_TOKEN_ID)) and v.isascii() and v.isdigit()):
            return None
        v = int(v)
    return v if is_int(v) and 0 <= v <= MAX_TOKEN_ID else None


def check_token_ids(ids: Any, vocab: int, param: str) -> None:
    """Refuse a token id the model's vocabulary (``vocab`` ids) does not have: one 400 naming ``param``."""
    out = next((t for t in ids if t >= vocab), None)
    if out is not None:
        raise bad(f"token id {out} is outside the vocabulary: ids must be below {vocab}", param)


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, b in v.items():
        tid = token_id(k) if isinstance(k, str) else None
        if tid is None or not _is_number(b) or not -100 <= b <= 100:
            raise bad("'logit_bias' maps token ids (strings of digits) to numbers in [-100, 100]", "logit_bias")
        out[tid] = float(b)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: ``logprobs`` true plus ``top_logprobs`` 0..20. Completions: ``logprobs`` 0..20."""
    if chat:
        on = _opt_bool(body, "logprobs")
        top = opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not on:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if on else None
    return opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)


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
    max_tokens = opt_int(body, max_tokens_name, 1, None)
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise bad(f"'{max_tokens_name}' must be at most {max_tokens_cap} on this server, got {max_tokens}",
                  max_tokens_name)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = (opts or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options")
    given = {"stop": _stop(body), "logit_bias": _logit_bias(body), "logprobs": _logprobs(body, chat),
             "speculate": _speculate(body), **_table(body)}
    return dict(
        model=model_name(body),
        max_tokens=max_tokens,
        sampling={k: v for k, v in given.items() if v is not None},
        stream=_opt_bool(body, "stream"),
        include_usage=include_usage,
        n=opt_int(body, "n", 1, MAX_N) or 1,
    )


# ---------------------------------------------------------------- requests

def _one_prompt(p: Any) -> str | list[int] | None:
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(not isinstance(t, str) and token_id(t) is not None for t in p):
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
    for name in ("tools", "tool_choice"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is a /v1/chat/completions field", name)
    return GenerationRequest(prompt=prompts[0], prompts=tuple(prompts), echo=_opt_bool(body, "echo"),
                             response_format=response_format(body), **_sampling(body, max_tokens_cap))


def response_format(body: dict) -> tuple[str, dict | None] | None:
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

"""The OpenAI-compatible wire format of answers: response bodies, streamed chunks, logprobs, usage.

Plain dicts in OpenAI's shapes (``text_completion``, ``chat.completion``, their ``.chunk``
forms, classifications, embeddings); ``wire`` parses the requests. This module knows JSON
shapes only; nothing of HTTP frameworks, threads or models.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any


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

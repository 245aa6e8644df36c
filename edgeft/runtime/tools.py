"""Tool calls: functions rendered into the prompt, the answer parsed (or constrained) into calls.

Rendering. When the artifact's chat template reads a ``tools`` variable, the functions go
to it in the shape transformers' ``apply_chat_template(tools=...)`` gives templates.
Otherwise (SmolLM2's template knows no tools) the default format below is used: a system
message (the conversation's own system message, extended, or a new first one) lists each
function as ``{"name", "description", "parameters"}`` JSON and asks for calls written as

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

one per line (the Hermes / Qwen convention). Earlier assistant turns that called tools are
written back in that form, and ``role: "tool"`` messages keep their role with the result in
``<tool_response>...</tool_response>``.

Choosing. ``tool_choice`` "none" renders no tools and parses nothing; "auto" renders them
and parses whatever calls the model writes; "required" or a named function constrains the
output (``edgeft.runtime.constrain``, a Lark grammar embedding each function's parameter
schema) to calls of the allowed functions with schema-valid arguments: one call, or one or
more when ``parallel_tool_calls`` is on.

Parsing. Every ``<tool_call>`` block holding JSON that names a given function becomes an
OpenAI tool call (``id`` ``call_...``, ``arguments`` as a JSON string); the text around the
blocks is the content (None when there is none).

This module knows messages, JSON and the call format; nothing of tokens, HTTP or graphs.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.runtime.constrain import Constraint

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_RE = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)
DEFAULT_PROMPT = (
    "You can call functions. To call one, answer with only\n"
    '<tool_call>{{"name": "FUNCTION NAME", "arguments": {{ARGUMENTS AS JSON}}}}</tool_call>\n'
    "(one line per call). The functions:\n{functions}"
)


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolChoice:
    """"auto", "none", "required", or "function" with the one ``name`` to call."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def template_knows_tools(source: str | None) -> bool:
    """Whether a chat template reads a ``tools`` variable."""
    if not source:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE


def default_messages(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """The conversation in the default tool format: plain role/content messages any template renders."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            content = "\n".join(filter(None, [content, *(_call_text(c) for c in m["tool_calls"])]))
        elif m["role"] == "tool":
            content = f"<tool_response>{content}</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = DEFAULT_PROMPT.format(functions="\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """The conversation for a template that knows tools: calls' arguments as objects, as transformers passes them."""
    out = []
    for m in messages:
        m = dict(m, content=m.get("content") or "")
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                try:
                    fn["arguments"] = json.loads(fn.get("arguments") or "{}")
                except (ValueError, TypeError):
                    pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def render_tools(gen: Any, messages: list[dict], tools: list[Tool], choice: ToolChoice) -> str:
    """The prompt text for a conversation with tools (``gen``: a ``Generator``)."""
    from edgeft.runtime import chat

    if gen.chat_template is None:
        raise EdgeftError(f"{gen.folder.name} has no chat template: tool calls need one")
    shown = [] if choice.mode == "none" else [t for t in tools if choice.mode != "function" or t.name == choice.name]
    tok = gen.manifest.tokenizer
    extra = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    if template_knows_tools(gen.chat_template):
        specs = [{"type": "function", "function": t.spec()} for t in shown] or None
        return chat.render(gen.chat_template, template_messages(messages), add_generation_prompt=True,
                           tools=specs, **extra)
    return chat.render(gen.chat_template, default_messages(messages, shown), add_generation_prompt=True, **extra)


def call_constraint(tools: list[Tool], choice: ToolChoice, parallel: bool) -> Constraint:
    """A grammar for calls of the allowed functions, each with schema-valid arguments."""
    allowed = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    bodies = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
               "properties": {"name": {"const": t.name}, "arguments": t.parameters}} for t in allowed]
    schema = {"anyOf": bodies} if len(bodies) > 1 else bodies[0]
    repeat = ' ("\\n" call)*' if parallel else ""
    return Constraint.lark(f'start: call{repeat}\ncall: "{OPEN}" body "{CLOSE}"\n'
                           f"body: %json {json.dumps(schema)}\n")


def parse_calls(text: str, tools: list[Tool]) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool calls) from the model's text."""
    names = {t.name for t in tools}
    calls = []
    for m in CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    content = CALL_RE.sub("", text).strip() if calls else text
    return (content or None), calls

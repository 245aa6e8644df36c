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

Choosing. ``tool_choice`` "none" renders no tools and parses nothing. Otherwise a grammar
(``call_constraint``: Lark embedding each function's parameter schema, ``edgeft.runtime.constrain``)
holds every call to a function offered, with arguments that validate and keep to the declared
keys: "required" or a named function allows only calls (one, or one or more when
``parallel_tool_calls`` is on); "auto" leaves the text free until the model writes
``<tool_call>`` and holds it to a valid call from there, as llama.cpp's lazy grammars do.

Parsing. ``CallStream`` reads the text as it comes: content outside the calls, each call
announced once its name is read, then its arguments fragment by fragment (OpenAI's streamed
``tool_calls`` deltas); ``parse_calls`` is the same reading of a whole answer, so a streamed
call adds up to the one a whole answer gives. A call that does not parse, names no offered
function or is cut off by the budget is dropped, and markup never reaches the content (None
when there is none).

This module knows messages, JSON and the call format; nothing of tokens, HTTP or graphs.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.runtime.constrain import Constraint, ConstraintError, Kind, closed, escape, lark_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
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
    strict: bool = False  # OpenAI's strict: every object closed, every declared property required

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


def call_constraint(tools: list[Tool], choice: ToolChoice, parallel: bool, answer: Constraint | None = None
                    ) -> Constraint:
    """A grammar for calls of the allowed functions, each with schema-valid arguments and nothing else.

    "required" or a named function: the output is the calls alone. "auto": any text, or text then
    calls: free until ``<tool_call>`` is written, held to a valid call from there (llama.cpp's lazy
    grammar); with ``answer`` (a JSON constraint: ``response_format``) it is that JSON or calls.
    Arguments keep to the declared keys (``constrain.closed``) in fixed JSON layout, and the only
    whitespace outside strings is one optional newline inside the markup and one between calls,
    so a small model cannot pad or wander until its budget runs out."""
    allowed = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    bodies = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
               "properties": {"name": {"const": t.name}, "arguments": closed(t.parameters, t.strict)}}
              for t in allowed]
    schema = {"anyOf": bodies} if len(bodies) > 1 else bodies[0]
    more = ' ("\\n" call)*' if parallel else ""
    rules = [f'call: "{OPEN}" rest', f'rest: "\\n"? body "\\n"? "{CLOSE}"', f"body: {lark_json(schema)}"]
    if choice.forced:
        return Constraint.lark("\n".join([f"start: call{more}", *rules]))
    if answer is not None:  # the JSON answer, or calls (text before them would not be the JSON asked for)
        if answer.kind not in (Kind.json_schema, Kind.json_object):
            raise ConstraintError("tool calls combine only with a JSON answer format")
        return Constraint.lark("\n".join([f"start: answer | call{more}",
                                          f"answer: {lark_json(json.loads(answer.source))}", *rules]))
    return Constraint.lark("\n".join(["start: TEXT | text calls", "TEXT: /(.|\\n)*/",
                                      f"text[lazy]: /(.|\\n)*{escape(OPEN)}/", f"calls: rest{more}", *rules]))


# The start of a call in the layout the grammar writes, up to the arguments' opening brace.
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class Piece:
    """What a stretch of the model's text adds: ``content``, a ``call`` starting (``index``, ``id``,
    ``name``) or a fragment of call ``index``'s ``arguments`` (OpenAI's streamed tool-call deltas)."""

    kind: str  # "content", "call" or "arguments"
    text: str = ""  # content, or an arguments fragment
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass
class _Open:
    """A call being read: its text after ``<tool_call>``; once its head is known, its arguments."""

    body: str = ""
    index: int | None = None  # set once the head (a known name) has been read and the call announced
    id: str = ""
    name: str = ""
    args: list[str] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    tail: str | None = None  # after the arguments' closing brace, up to </tool_call>


class CallStream:
    """Tool calls read from text as it arrives, as ``Piece``s in order: content outside the calls,
    each call once its name is known, its arguments fragment by fragment as they are written.

    ``feed(text)`` gives the pieces ``text`` completes; ``finish(cut)`` the rest (``cut``: the
    budget ended the text). A call whose head is not in the grammar's layout is read whole and
    given at its ``</tool_call>``; a call that does not parse, names no given function, or is
    cut off is left out, and no markup ever reaches the content. Whitespace next to a call is
    not content (text held back may still turn out to open a call); ``calls`` are the complete
    calls, OpenAI-shaped, ``arguments`` being exactly the text streamed."""

    def __init__(self, tools: list[Tool]) -> None:
        self.names = {t.name for t in tools}
        self.pending = ""  # text held back: whitespace and what may still become <tool_call>
        self.open: _Open | None = None
        self.calls: list[dict] = []
        self.started = 0  # calls announced so far (their indexes)
        self.opened = 0  # <tool_call>s read so far, valid or not
        self.after_call = False  # whitespace right after a call is not content

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        while text:
            if self.open is None:
                text = self._text(text, out)
            else:
                text = self._call(text, out)
        return out

    def finish(self, cut: bool = False) -> list[Piece]:
        """What is still held: trailing text (unless a call came before it, or the budget cut a
        ``<tool_call>`` short); an unfinished call is dropped."""
        rest, self.pending, self.open = self.pending, "", None
        if not rest or self.opened:
            return []
        if cut and _partial_open(rest):
            rest = rest[:len(rest) - _partial_open(rest)].rstrip()
        return [Piece("content", rest)] if rest else []

    def _text(self, text: str, out: list[Piece]) -> str:
        """Content up to a ``<tool_call>`` (returns what follows it), holding back what may still open one."""
        text, self.pending = self.pending + text, ""
        k = text.find(OPEN)
        if k >= 0:
            self._content(text[:k].rstrip(), out)
            self.open, self.opened = _Open(), self.opened + 1
            return text[k + len(OPEN):]
        held = _partial_open(text)
        body = text[:len(text) - held].rstrip()
        self.pending = text[len(body):]
        self._content(body, out)
        return ""

    def _content(self, text: str, out: list[Piece]) -> None:
        if self.after_call:
            text = text.lstrip()
        if text:
            self.after_call = False
            out.append(Piece("content", text))

    def _call(self, text: str, out: list[Piece]) -> str:
        """Read call text; returns what follows its ``</tool_call>`` (nothing while it is still open)."""
        c = self.open
        assert c is not None
        if c.index is None:
            c.body += text
            head = HEAD.match(c.body)
            if head and head.group(1) in self.names:
                c.index, c.id, c.name = self.started, _new_id(), head.group(1)
                self.started += 1
                out.append(Piece("call", index=c.index, id=c.id, name=c.name))
                c.body, text = c.body[:head.end()], c.body[head.end():]
            elif CLOSE in c.body:
                k = c.body.index(CLOSE)
                self._whole(c.body[:k], out)
                return c.body[k + len(CLOSE):]
            else:
                return ""
        if c.tail is None:
            text = self._arguments(c, text, out)
            if c.tail is None:
                return ""
        c.tail += text
        k = c.tail.find(CLOSE)
        if k < 0:
            return ""
        rest, c.tail = c.tail[k + len(CLOSE):], c.tail[:k]
        self._streamed(c)
        return rest

    def _arguments(self, c: _Open, text: str, out: list[Piece]) -> str:
        """The arguments' JSON up to its closing brace, given out as a fragment; returns what follows it."""
        end = len(text)
        for n, ch in enumerate(text):
            if c.in_string:
                c.in_string = c.escaped or ch != '"'
                c.escaped = not c.escaped and ch == "\\"
            elif ch == '"':
                c.in_string = True
            elif ch in "{[":
                c.depth += 1
            elif ch in "}]":
                c.depth -= 1
                if c.depth == 0:
                    end, c.tail = n + 1, ""
                    break
        if text[:end]:
            c.args.append(text[:end])
            out.append(Piece("arguments", text[:end], index=c.index or 0))
        return text[end:]

    def _streamed(self, c: _Open) -> None:
        """A streamed call has reached ``</tool_call>``: kept when the whole of it parses."""
        self.open, self.after_call = None, True
        arguments = "".join(c.args)
        try:
            whole = json.loads(c.body + arguments + (c.tail or ""))
        except ValueError:
            return
        if isinstance(whole, dict) and isinstance(whole.get("arguments"), dict):
            self.calls.append(_openai_call(c.id, c.name, arguments))

    def _whole(self, body: str, out: list[Piece]) -> None:
        """A call not in the streamed layout, read whole: announced with all its arguments when it is valid."""
        self.open, self.after_call = None, True
        try:
            obj = json.loads(body)
        except ValueError:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return
        args = obj.get("arguments", {})
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = _openai_call(_new_id(), obj["name"], arguments)
        self.calls.append(call)
        out.append(Piece("call", index=self.started, id=call["id"], name=obj["name"]))
        out.append(Piece("arguments", arguments, index=self.started))
        self.started += 1


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _openai_call(id: str, name: str, arguments: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


def parse_calls(text: str, tools: list[Tool], cut: bool = False) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool calls) of a whole answer: what ``CallStream`` gives it in one piece."""
    stream = CallStream(tools)
    pieces = stream.feed(text) + stream.finish(cut)
    content = "".join(p.text for p in pieces if p.kind == "content")
    return (content or None), stream.calls

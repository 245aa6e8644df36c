"""One generated reply as parts (thinking, text, tool calls): what the Messages and Responses routes show.

Anthropic's messages and OpenAI's responses both answer a list of typed parts instead of
one string: a thinking block, text, tool calls. ``Reply`` follows one choice's engine
chunks: a reasoning model's thought goes out as thinking as it streams (the answer
alone as text), and when tools were offered the answer is held until it ends, then parsed
into its text and calls (``generation.tool_calls``, the same parsing as chat). It also
says why the reply ended: its length, an end of turn, a tool call, or which stop sequence.
This module knows the engine's chunks and the request; nothing of HTTP or JSON shapes.
"""

from __future__ import annotations

from typing import Any

from edgeft.runtime import reasoning
from edgeft.runtime.serve import generation
from edgeft.runtime.serve.wire import GenerationRequest

THINKING, TEXT = "thinking", "text"


class Reply:
    """The parts of one choice as its chunks arrive; ``end()`` gives the last parts and the tool calls."""

    def __init__(self, req: GenerationRequest, phase: Any) -> None:
        self.req = req
        self.splitter = None if phase is None else reasoning.Splitter(phase)
        self.holds = bool(req.tools) and req.tool_choice[0] != "none"  # calls are parsed from the whole answer
        self.held: list[str] = []
        self.tokens: list[int] = []
        self.finish = "length"
        self.stopped_by_string = False  # a stop sequence (not the end-of-sequence token) ended it
        self.calls: list[dict] = []

    def feed(self, chunk: Any) -> list[tuple[str, str]]:
        """The (kind, text) parts one engine chunk adds, in order (maybe none)."""
        if chunk.token_id is not None:
            self.tokens.append(chunk.token_id)
        if chunk.finish_reason is not None:
            self.finish = "length" if chunk.finish_reason == "cancelled" else chunk.finish_reason
            self.stopped_by_string = chunk.finish_reason == "stop" and chunk.token_id is not None
        thought, answer = ("", chunk.text) if self.splitter is None else self.splitter.feed(chunk.text)
        return self._parts(thought, answer)

    def _parts(self, thought: str, answer: str) -> list[tuple[str, str]]:
        if self.holds:
            self.held.append(answer)
            answer = ""
        return [(k, t) for k, t in ((THINKING, thought), (TEXT, answer)) if t]

    def end(self) -> list[tuple[str, str]]:
        """The parts still held at the end (the thought's tail, a held answer's text); sets ``calls``."""
        thought, answer = ("", "") if self.splitter is None else self.splitter.finish()
        parts = self._parts(thought, answer)
        if self.holds:
            content, self.calls = generation.tool_calls(self.req, "".join(self.held))
            if content:
                parts.append((TEXT, content))
        return parts

    def stop_sequence(self, decode: Any) -> str | None:
        """Which of the request's stop strings ended the reply (``decode``: token ids to text), if one did."""
        stops = self.req.sampling.get("stop") or ()
        if not self.stopped_by_string or not stops:
            return None
        text = decode(self.tokens)
        found = [(text.find(s), s) for s in stops if s in text]
        return min(found)[1] if found else stops[0]


async def collect(state: Any, model: Any, gen: Any, reply: Reply) -> tuple[list[tuple[str, str]], int]:
    """The parts ``reply`` makes of a whole (not streamed) generation, before its ``end()``, and the
    tokens generated; the generation is finished (slot, metrics) whatever happens."""
    parts: list[tuple[str, str]] = []
    n = 0
    try:
        async for items in gen.events_until_done():
            for _, chunk in items:
                if isinstance(chunk, BaseException):
                    raise chunk
                n += chunk.token_id is not None
                parts += reply.feed(chunk)
    finally:
        generation.finish(state, model, gen, n)
    return parts, n

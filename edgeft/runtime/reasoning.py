"""Reasoning models: the thought (``<think>...</think>``) split from the answer, and a budget for it.

A reasoning model (Qwen3, the DeepSeek-R1 distills) writes its thinking between
``<think>`` and ``</think>`` before the answer. Whether a template makes such a model is
read from the template itself (it mentions ``<think>``), and where a generation starts is
read from the end of the rendered prompt (``Phase``): inside an open thought (DeepSeek-R1's
templates end with ``<think>\\n``), after a closed one (Qwen3 with ``enable_thinking``
false ends with an empty ``<think></think>``), or at the start, where the model may open one.

``Splitter`` takes the answer's text piece by piece (as it streams) and hands back
(thinking, answer) pieces, holding back only what may still turn out to be a tag; the
whitespace around the thought is dropped, so ``split`` of the whole text and the pieces of a
stream join into the same two strings. ``ThoughtGate`` is a logit processor
(``edgeft.runtime.processors``) for one sequence: it counts the thinking tokens and, at
the budget (``max_reasoning_tokens``), forces the closing tag's tokens so the model goes
on with its answer; processors given to it (a grammar for constrained output or tool
calls) apply to the answer only, after the thought is closed (a constrained answer of a
model that may think first opens its thought by force, so the grammar never meets it).

This module knows text, token ids and numpy logits; nothing of graphs, tokenizers' files or HTTP.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

OPEN, CLOSE = "<think>", "</think>"


class ReasoningFormat(str, enum.Enum):
    """How a reply shows the thinking: ``none`` keeps the raw text; ``auto`` (and llama-server's
    ``deepseek``) put it in ``reasoning_content``, the answer alone in ``content``."""

    auto = "auto"
    deepseek = "deepseek"
    none = "none"


class Phase(str, enum.Enum):
    """Where a generation starts: where a thought may open, inside one, or in the answer."""

    start = "start"
    thought = "thought"
    answer = "answer"


def template_thinks(source: str | None) -> bool:
    """Whether a chat template is a reasoning model's (it writes or strips ``<think>`` blocks)."""
    return bool(source) and OPEN in source  # type: ignore[operator]


def prompt_phase(prompt_tail: str) -> Phase:
    """Where the generation after a prompt (its last few tokens as text) starts: only a tag at the
    very end counts (a ``<think>`` inside a user's message does not open a thought)."""
    opened = prompt_tail.rfind(OPEN)
    if opened < 0:
        return Phase.start
    closed = prompt_tail.find(CLOSE, opened)
    if closed < 0:
        return Phase.thought if not prompt_tail[opened + len(OPEN):].strip() else Phase.start
    return Phase.answer if not prompt_tail[closed + len(CLOSE):].strip() else Phase.start


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a start of ``tag`` (0: none)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class Splitter:
    """Text in, (thinking, answer) pieces out, for one generation starting at ``phase``."""

    def __init__(self, phase: Phase = Phase.start) -> None:
        self.phase = phase
        self.fresh = True  # no thinking text given out yet: whitespace after the open tag is dropped
        self.opened = phase is Phase.thought  # whether a thought was seen (else thinking is None)
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """The thinking and answer text that ``text`` completes (either may be empty)."""
        self.buf += text
        thinking, answer = [], []
        while self.buf:
            if self.phase is Phase.start:
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.phase, self.opened, self.buf = Phase.thought, True, head[len(OPEN):]
                    continue
                if OPEN.startswith(head):  # empty, or a tag that may still come
                    break
                self.phase = Phase.answer
            elif self.phase is Phase.thought:
                end = self.buf.find(CLOSE)
                if end >= 0:
                    thinking.append(self._thought(self.buf[:end].rstrip()))
                    self.phase, self.buf = Phase.answer, self.buf[end + len(CLOSE):].lstrip()
                    self.fresh = True  # the answer's leading whitespace goes too
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                body = self.buf[:len(self.buf) - keep]
                keep += len(body) - len(body.rstrip())  # whitespace may be the last before the tag
                thinking.append(self._thought(self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
                break
            else:
                if self.fresh and self.opened:
                    self.buf = self.buf.lstrip()
                    self.fresh = not self.buf
                answer.append(self.buf)
                self.buf = ""
        return "".join(thinking), "".join(answer)

    def _thought(self, text: str) -> str:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        return text

    def finish(self) -> tuple[str, str]:
        """What is still held at the end: an unclosed thought's tail is thinking, anything else answer."""
        rest, self.buf = self.buf, ""
        if self.phase is Phase.thought:
            return self._thought(rest.rstrip()), ""
        return "", rest

    @property
    def in_answer(self) -> bool:
        return self.phase is Phase.answer


def split(text: str, phase: Phase = Phase.start) -> tuple[str | None, str]:
    """(thinking, answer) of a whole reply; thinking is None when the reply has no thought."""
    s = Splitter(phase)
    t1, a1 = s.feed(text)
    t2, a2 = s.finish()
    return (t1 + t2 if s.opened else None), a1 + a2


class ThoughtGate:
    """A ``LogitProcessor`` for one sequence: the thinking budget, then ``inner`` on the answer only.

    ``text_of(token)`` gives each accepted token's text (an incremental detokenizer);
    ``open_ids``/``close_ids`` are the tags as token ids, forced when the thought must open
    (``force_open``: a constrained answer of a model that may think first) or close (the
    budget is spent). ``budget`` None: the thought is as long as the model makes it.
    """

    def __init__(self, phase: Phase, text_of: Callable[[int], str], open_ids: list[int], close_ids: list[int],
                 budget: int | None = None, inner: Iterable[Any] = (), force_open: bool = False) -> None:
        self.splitter = Splitter(phase)
        self.text_of, self.close_ids, self.budget = text_of, list(close_ids), budget
        self.inner = list(inner)
        self.forcing: list[int] = list(open_ids) if force_open and phase is Phase.start else []
        self.thought_tokens = 0
        self.closing = False

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if not self.forcing and self.splitter.in_answer:
            for p in self.inner:
                logits = p(logits)
            return logits
        if not self.forcing and not self.closing and self.splitter.phase is Phase.thought \
                and self.budget is not None and self.thought_tokens >= self.budget:
            self.forcing, self.closing = list(self.close_ids), True
        if self.forcing:
            keep = self.forcing[0]
            value = logits[keep]
            logits[:] = -np.inf
            logits[keep] = value if np.isfinite(value) else 0.0
        return logits

    def accept(self, token: int) -> None:
        if self.splitter.in_answer and not self.forcing:
            for p in self.inner:
                p.accept(token)
            return
        if self.forcing and token == self.forcing[0]:
            self.forcing.pop(0)
        if self.splitter.phase is Phase.thought:
            self.thought_tokens += 1
        self.splitter.feed(self.text_of(token))

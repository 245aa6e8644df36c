"""From a parsed generation request to sequences in a model's engine, and their chunks back.

What every generation route shares, whatever its JSON shape: the prompt's token ids (a
chat template, tools, or token ids given), the ``SamplingParams`` of each choice (the
request's fields over the artifact's defaults over the server's, with the context checked),
the grammar of a constrained answer, a reasoning model's side (``Thinking``: where each reply
starts, the thinking budget, the grammar held back until the thought is closed), admission
(429 when the slots and the waiting line are full) and ``Generation``: every choice
submitted together, its chunks handed from the engine's thread to the event loop. A route
module (``completions``, ``messages``, ``responses_api``) renders the chunks.
This module knows the engine's API and ``wire.GenerationRequest``; it knows nothing of
Starlette or of how a choice is shown to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.runtime.batching import Overloaded
from edgeft.runtime.params import MAX_SEED, SamplingParams
from edgeft.runtime.serve.state import Model, ServerState
from edgeft.runtime.serve.wire import GenerationRequest, bad, check_token_ids


def _prompt_ids(model: Model, req: GenerationRequest) -> list[int]:
    """Tokenize (after the chat template for chat); blocking, so called off the event loop."""
    if req.messages is not None:
        try:
            if req.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
                if req.template_kwargs:  # tools.render_tools passes no extra variables to the template (yet)
                    raise bad("'chat_template_kwargs' together with tools is not supported yet", "chat_template_kwargs")
                from edgeft.runtime.tools import Tool, ToolChoice, render_tools

                return model.front.encode(render_tools(model.front, req.messages, [Tool(**t) for t in req.tools],
                                                       ToolChoice(*req.tool_choice)))
            return model.front.encode(_render_chat(model, req))
        except EdgeftError:
            raise
        except Exception as exc:  # a template that refuses these messages (e.g. roles out of order)
            raise bad(f"the chat template refused these messages: {exc}", "messages") from None
    if isinstance(req.prompt, str):
        return model.front.encode(req.prompt)
    check_token_ids(req.prompt, model.manifest.decoder.vocab_size, "prompt")
    return list(req.prompt)


def _render_chat(model: Model, req: GenerationRequest) -> str:
    """The chat template over the messages, with the request's ``chat_template_kwargs``."""
    if not req.template_kwargs:
        return model.front.render_chat(req.messages)
    from edgeft.runtime import chat

    if model.front.chat_template is None:
        raise bad(f"model '{model.name}' has no chat template", "chat_template_kwargs")
    tok = model.manifest.tokenizer
    return chat.render(model.front.chat_template, req.messages or [], add_generation_prompt=True,
                       **{"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or "", **req.template_kwargs})


def all_prompt_ids(model: Model, req: GenerationRequest) -> list[list[int]]:
    """Token ids of every prompt of the request (a chat request has one)."""
    if req.messages is not None:
        return [_prompt_ids(model, req)]
    return [_prompt_ids(model, dataclasses.replace(req, prompt=p)) for p in (req.prompts or (req.prompt,))]


def _max_new(model: Model, req: GenerationRequest, n_prompt: int, cap: int) -> int:
    """The tokens this choice may generate: asked for, else the artifact's default clamped to the room left."""
    ctx = model.manifest.decoder.context_length
    param = "messages" if req.messages is not None else "prompt"
    if n_prompt >= ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} tokens.",
                  param, "context_length_exceeded")
    room = ctx - n_prompt
    if req.max_tokens is None:
        defaults = model.manifest.generation
        max_new = max(1, min(defaults.max_new_tokens if defaults else SamplingParams.max_new_tokens, cap, room,
                             model.engine.slot_len - n_prompt))
    elif req.max_tokens > room:
        raise bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                  f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, {req.max_tokens} for the "
                  "completion). Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
    else:
        max_new = req.max_tokens
    if n_prompt + max_new > model.engine.slot_len:
        raise bad(f"{n_prompt} prompt tokens and {max_new} new tokens exceed a slot of {model.engine.slot_len} "
                  f"tokens on this server ({model.engine.parallel} slots share --ctx-size). Please reduce the "
                  "prompt or max_tokens.", param if req.max_tokens is None else "max_tokens", "context_length_exceeded")
    return max_new


def params(model: Model, req: GenerationRequest, n_prompt: int, cap: int) -> SamplingParams:
    """The request's sampling fields over the artifact's defaults over the server's ``--speculate``."""
    check_token_ids(req.sampling.get("logit_bias") or (), model.manifest.decoder.vocab_size, "logit_bias")
    given = {"speculate": model.speculate, **req.sampling, "max_new_tokens": _max_new(model, req, n_prompt, cap)}
    try:
        return SamplingParams.over(model.manifest.generation, **given)
    except (ValueError, TypeError, EdgeftError) as exc:
        raise bad(getattr(exc, "message", None) or str(exc)) from None


def jobs(model: Model, req: GenerationRequest, prompt_ids: list[list[int]], cap: int) -> list[tuple[list[int], Any]]:
    """(ids, params) per choice: prompt by prompt, n choices each; choice j seeded with seed + j."""
    out = []
    for ids in prompt_ids:
        if not ids:
            raise bad("the prompt is empty: nothing to continue from", "prompt")
        p = params(model, req, len(ids), cap)
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % (MAX_SEED + 1)
            out.append((ids, dataclasses.replace(p, seed=seed) if j else p))
    return out


def grammar(model: Model, req: GenerationRequest) -> Any:
    """The request's constraint compiled for the model (tool calls, with response_format as the answer's), or None.

    Blocking (compiling takes milliseconds, the model's first one a second or two): call it off the loop.
    A schema the engine cannot compile is a 400 naming the problem."""
    from edgeft.runtime import compile_for
    from edgeft.runtime.constrain import Constraint, ConstraintError
    from edgeft.runtime.tools import Tool, ToolChoice, call_constraint

    choice = ToolChoice(*req.tool_choice)
    answer, param = None, "response_format"
    try:
        if req.response_format is not None:
            kind, schema = req.response_format
            answer = Constraint.json_object() if kind == "json_object" else Constraint.json_schema(schema)
        if req.tools and choice.mode != "none":
            if answer is not None:
                compile_for(model.front, answer)  # a bad schema is the response_format's fault, not the tools'
            param = "tools"
            answer = call_constraint([Tool(**t) for t in req.tools], choice, req.parallel_tool_calls, answer)
        if answer is None:
            return None
        return compile_for(model.front, answer)
    except ConstraintError as exc:
        raise bad(str(exc), param, "invalid_schema") from None


class Thinking:
    """A reasoning model's side of a chat request: where each choice starts, its budget, its gate."""

    def __init__(self, model: Model, req: GenerationRequest) -> None:
        from edgeft.runtime import reasoning

        self.model, self.req = model, req
        self.thinks = reasoning.template_thinks(model.front.chat_template)
        self.separate = req.reasoning_format != reasoning.ReasoningFormat.none.value
        tokenizer = model.front.tokenizer
        self.open_ids = tokenizer.encode(reasoning.OPEN, add_special_tokens=False).ids
        self.close_ids = tokenizer.encode(reasoning.CLOSE, add_special_tokens=False).ids

    def phase(self, ids: list[int]) -> Any:
        """Where the reply to ``ids`` starts (read from the prompt's last tokens)."""
        from edgeft.runtime.reasoning import prompt_phase

        return prompt_phase(self.model.front.tokenizer.decode(ids[-16:], skip_special_tokens=False))

    def processors(self, ids: list[int], inner: list[Any]) -> list[Any]:
        """The sequence's processors: ``inner`` (a grammar) behind a ``ThoughtGate`` when the model thinks."""
        if not self.thinks or (not inner and self.req.max_reasoning_tokens is None):
            return inner
        from edgeft.runtime.detok import IncrementalDetokenizer
        from edgeft.runtime.reasoning import ThoughtGate

        detok = IncrementalDetokenizer(self.model.front.tokenizer, skip_special_tokens=False, context=ids)
        return [ThoughtGate(self.phase(ids), detok.add, self.open_ids, self.close_ids,
                            self.req.max_reasoning_tokens, inner, force_open=bool(inner))]


def tool_calls(req: GenerationRequest, text: str, cut: bool = False) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a chat answer: calls only when the request offered tools (``cut``: by the budget)."""
    if not req.tools or req.tool_choice[0] == "none":
        return text, []
    from edgeft.runtime.tools import Tool, parse_calls

    return parse_calls(text, [Tool(**t) for t in req.tools], cut)


def call_stream(req: GenerationRequest) -> Any:
    """A ``tools.CallStream`` for one streamed choice of a request that offered tools, else None."""
    if not req.tools or req.tool_choice[0] == "none":
        return None
    from edgeft.runtime.tools import CallStream, Tool

    return CallStream([Tool(**t) for t in req.tools])


class Mailbox:
    """Items handed from engine threads to one event loop's queues, with one wake-up of the loop per burst.

    A decode step hands out a chunk per row, one after another: the first ``post`` of a burst
    schedules one ``drain`` on the loop (a self-pipe write and a loop wake-up), the rest of the
    burst join it. Every queue gets its items in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weak: the mailbox is the value of a weak dict keyed by the loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
        with self._lock:
            first = not self._items
            self._items.append((queue, item))
        loop = self._loop()
        if first and loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # the loop
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's one ``Mailbox`` (made on the loop's own thread, so there is no race to make it)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Choice:
    """One sequence of a request in the engine: its chunks arrive on the engine thread, are read on the loop."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        self.index, self.loop, self.events = index, loop, events
        self.box = mailbox(loop)
        self.seq: Any = None

    def on_chunk(self, chunk: Any) -> None:  # engine thread
        self.box.post(self.events, (self.index, chunk))


class Generation:
    """Every choice of one request (prompts x n), submitted together; ``set()`` cancels them all."""

    def __init__(self, model: Model, jobs: list[tuple[list[int], Any]], on_first: Callable[[], None],
                 grammar: Any = None, thinking: Thinking | None = None) -> None:
        self.model, self.on_first = model, on_first
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i, self.loop, self.events) for i in range(len(jobs))]
        self.first_seen = False
        # per choice, where a reasoning model's reply starts (None: the text is shown raw)
        self.phases = [thinking.phase(ids) if thinking is not None and thinking.separate else None
                       for ids, _ in jobs]
        try:
            for choice, (ids, params) in zip(self.choices, jobs):
                masks = [grammar.mask()] if grammar is not None else []  # one per sequence: it holds its state
                if thinking is not None:
                    masks = thinking.processors(ids, masks)
                choice.seq = model.engine.submit(ids, params, choice.on_chunk, processors=masks)
        except BaseException:
            self.set()
            raise

    def set(self) -> None:
        """Cancel every choice still running (client gone, shutdown)."""
        for c in self.choices:
            if c.seq is not None and not c.seq.done:
                self.model.engine.cancel(c.seq)

    @property
    def running(self) -> bool:
        return any(c.seq is not None and not c.seq.done for c in self.choices)

    async def events_until_done(self) -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of (choice index, Chunk) as they arrive, until every choice has finished."""
        left = len(self.choices)
        while left:
            items = [await self.events.get()]
            while not self.events.empty():
                items.append(self.events.get_nowait())
            for _, chunk in items:
                if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                    left -= 1
                if not self.first_seen and not isinstance(chunk, BaseException) and chunk.token_id is not None:
                    self.first_seen = True
                    self.on_first()
            yield items


def _check_room(state: ServerState, model: Model, req: GenerationRequest) -> None:
    """400 when the request asks more sequences than the model holds; 429 when they cannot wait now."""
    if req.echo and req.logprobs is not None:
        raise bad("'echo' with 'logprobs' (the prompt's logprobs) is not supported by this server", "echo")
    wanted = len(req.prompts or (None,)) * req.n
    most = model.engine.parallel + model.engine.queue_size
    if wanted > most:
        raise bad(f"{wanted} sequences (prompts x n) asked for; this server holds at most {most} per model "
                  "(--parallel + --queue-size)", "n")
    if model.engine.room() < wanted:  # refused before any tokenizing
        state.metrics.rejected.inc(model=model.name)
        raise Overloaded(f"all {model.engine.parallel} slots of '{model.name}' are busy and the waiting line is full")


async def start(state: ServerState, model: Model, req: GenerationRequest) -> tuple[Generation, list[list[int]]]:
    """Admit the request: tokenize, check, compile its grammar and submit every choice (off the loop where slow)."""
    _check_room(state, model, req)
    prompt_ids = await asyncio.to_thread(all_prompt_ids, model, req)
    todo = jobs(model, req, prompt_ids, state.config.max_tokens)
    constrained = req.response_format is not None or (req.tools and req.tool_choice[0] != "none")
    compiled = await asyncio.to_thread(grammar, model, req) if constrained else None
    t_admit = time.perf_counter()
    on_first = lambda: state.metrics.first_token.observe(time.perf_counter() - t_admit, model=model.name)  # noqa: E731
    try:
        gen = Generation(model, todo, on_first, compiled, Thinking(model, req) if req.messages is not None else None)
    except Overloaded:
        state.metrics.rejected.inc(model=model.name)
        raise
    state.cancels.add(gen)  # shutdown stops it even if the response never starts
    state.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompt_ids), model=model.name)
    return gen, prompt_ids


def finish(state: ServerState, model: Model, gen: Generation, generated: int) -> None:
    """Cancel what still runs (the client left, or we are done) and count the tokens."""
    gen.set()
    state.cancels.discard(gen)
    state.metrics.generated_tokens.inc(generated, model=model.name)

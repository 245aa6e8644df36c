"""Continuous batching: one engine per model advances every active sequence in one decode step.

Decoding a token reads every weight once whatever the batch, so several sequences decoded
together cost little more than one. The engine owns ``parallel`` KV slots (``ctx_size``
tokens shared between them, as llama.cpp's ``-np`` / ``-c``) and one thread that loops:

1. admit waiting requests into free slots (a request's prompt plus its ``max_new_tokens``
   must fit one slot, checked at submission);
2. prefill waiting prompts in chunks, at most ``prefill_budget`` prompt tokens per
   iteration, so running streams never stall for long behind a new prompt;
3. one batched decode step for every sequence that has a next token to compute; a
   sequence with a prompt-lookup draft (``edgeft.runtime.speculate``) verifies it in a
   multi-token call of its own instead, when that pays (alone, or with a high acceptance);
4. each sequence's own ``SequenceOutput`` (sampler, seed, stop strings, budget) turns its
   row of logits into a ``Chunk``; a finished or cancelled sequence frees its slot at once.

How a batch shares one graph call depends on the graph family (``edgeft.runtime.kvslots``: GQA
slots, a left-padded batch, or one sequence at a time).

A shared-prefix cache (``PrefixCache``) keeps the keys and values of recent prompts' first
tokens (by token ids) so a later prompt that starts the same way copies them into its slot
instead of computing them again. With ``batch_trunk``, the engines of split models that share a
trunk are driven by one thread that runs one trunk call for all their rows
(``edgeft.runtime.trunk_group``).

This module knows token ids, logits, slots and threads; it knows nothing of HTTP or of the
OpenAI wire format. Nothing here imports torch.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.runtime.batching import Overloaded
from edgeft.runtime.generate import Chunk, ContextLengthError, SequenceOutput
from edgeft.runtime.kvslots import SharedSlots, make_slots
from edgeft.runtime.processors import LogitProcessor
from edgeft.runtime.sampling import SamplingParams

DEFAULT_PREFILL_BUDGET = 256


class EngineEvent(enum.Enum):
    """What an engine reports to its ``observe`` callback, each with one number."""

    waiting = "waiting"  # sequences admitted and waiting for a slot (after a submit and every iteration)
    slots = "slots"  # slots in use (every iteration)
    tokens_per_second = "tokens_per_second"  # tokens generated per second over the last few seconds (0: idle)
    queue_wait = "queue_wait"  # seconds a sequence waited for its slot (when it gets one)
    batch = "batch"  # rows advanced by one batched decode step
    drafted = "drafted"  # prompt-lookup draft tokens one verification step checked
    accepted = "accepted"  # of those, the tokens the model agreed with


# --------------------------------------------------------------------------- sequences


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    ids: list[int]
    params: SamplingParams
    on_chunk: Callable[[Chunk], None]
    processors: tuple = ()
    slot: int = -1
    filled: int = 0  # prompt tokens whose keys and values are in the slot
    length: int = 0  # tokens in the slot (prompt and generated)
    next_token: int | None = None  # the token to feed at the next decode step
    out: SequenceOutput | None = None
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    reused: int = 0  # prompt tokens copied from the prefix cache

    def cancel(self) -> None:
        """Stop this sequence at the next step boundary; it gets no more chunks."""
        self.cancelled = True


class PrefixCache:
    """Keys and values of recent prompts' first tokens, by token ids (least recently used out first)."""

    def __init__(self, entries: int, min_tokens: int = 16) -> None:
        self.entries, self.min_tokens = entries, min_tokens
        self.items: collections.OrderedDict[tuple[int, ...], list[np.ndarray]] = collections.OrderedDict()
        self.hits = 0

    def longest(self, ids: list[int]) -> list[np.ndarray] | None:
        """The cached keys and values of the longest prefix ``ids`` shares with a stored prompt.

        Any leading part of a stored entry is valid for a prompt that agrees on it, so the
        match is the longest common prefix (leaving at least one prompt token to compute).
        """
        best, best_n = None, 0
        for key in self.items:
            n = _common_prefix(key, ids, len(ids) - 1)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            return None
        self.items.move_to_end(best)
        self.hits += 1
        return [kv[:, :best_n] for kv in self.items[best]]

    def put(self, key: tuple[int, ...], kv: list[np.ndarray]) -> None:
        if self.entries <= 0 or len(key) < self.min_tokens:
            return
        self.items[key] = kv
        self.items.move_to_end(key)
        while len(self.items) > self.entries:
            self.items.popitem(last=False)


@dataclass
class EngineStats:
    """What ``/metrics`` reports about an engine (read without locking: a snapshot of counters)."""

    steps: int = 0
    batched_rows: int = 0
    generated: int = 0
    prefilled: int = 0
    reused: int = 0
    last_batch: int = 0
    busy_s: float = 0.0
    drafted: int = 0  # prompt-lookup draft tokens verified (speculative steps)
    accepted: int = 0  # of those, the ones the model agreed with


class Engine:
    """Continuous batching over one ``Generator``'s graph: ``submit`` sequences, get chunks back.

    ``on_chunk`` is called on the engine's thread with each ``Chunk``; the last one has a
    ``finish_reason`` ("stop", "length", or "cancelled" when the engine stops). If a graph
    call fails, the sequences in flight get the exception instead of a last chunk. It must
    not block. ``observe`` (optional) receives ``(EngineEvent, value)`` pairs for metrics, on
    the engine's thread (and ``waiting`` on the submitting one); it must not block either.
    With ``batch_trunk``, a split model's engine has no thread of its own: its trunk's group
    (``edgeft.runtime.trunk_group``) drives it beside the other models on that trunk.
    """

    def __init__(self, gen, parallel: int = 4, ctx_size: int = 0, queue_size: int = 16,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, prefix_cache: int = 4, batching: str | None = None,
                 observe: Callable[[EngineEvent, float], None] | None = None, batch_trunk: bool = False) -> None:
        if parallel < 1:
            raise EdgeftError(f"parallel must be at least 1, got {parallel}")
        if queue_size < 0 or prefill_budget < 1:
            raise EdgeftError("queue-size cannot be negative and the prefill budget must be at least 1")
        self.gen = gen
        ctx = gen.decoder.context_length
        total = ctx_size or parallel * ctx  # zeroed pages: memory is committed only as slots fill
        self.slot_len = min(total // parallel, ctx)
        if self.slot_len < 2:
            raise EdgeftError(f"ctx-size {total} leaves {total // parallel} tokens per slot for {parallel} slots")
        self.parallel, self.queue_size, self.prefill_budget = parallel, queue_size, prefill_budget
        self.kv = make_slots(gen.engine, parallel, self.slot_len, batching)
        self.prefixes = PrefixCache(prefix_cache if self.kv.kind == "slots" else 0)
        self.observe = observe or (lambda event, value: None)
        self.stats = EngineStats()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: dict[int, Sequence] = {}
        self._free = list(range(parallel))
        self.group = None  # the TrunkGroup whose thread drives this engine (a split model with batch_trunk)
        if batch_trunk and gen.engine.trunk is not None:
            from edgeft.runtime.trunk_group import group_for

            self.group = group_for(self)
        self._cond = self.group.cond if self.group is not None else threading.Condition()
        self._closed = False
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        if self.group is not None:
            self.group.join(self)
        else:
            self._thread = threading.Thread(target=self._loop, name="edgeft-engine", daemon=True)
            self._thread.start()

    @property
    def kind(self) -> str:
        return self.kv.kind

    @property
    def slots_in_use(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- the caller's side

    def room(self) -> int:
        """Sequences that could be admitted now (free slots plus free places in the waiting line)."""
        return self.parallel + self.queue_size - len(self._active) - len(self._waiting)

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ``ContextLengthError`` when a request cannot fit one slot."""
        if prompt_tokens + max_new_tokens > self.slot_len:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                f"{prompt_tokens + max_new_tokens} exceeds a slot of {self.slot_len} tokens "
                f"({self.parallel} slots share the context)")

    def submit(self, ids: list[int], params: SamplingParams, on_chunk: Callable[[Chunk], None],
               processors: Iterable[LogitProcessor] = ()) -> Sequence:
        """Queue one sequence (``Overloaded`` when every slot and the waiting line are taken)."""
        if not ids:
            raise EdgeftError("the prompt is empty: nothing to continue from")
        self.check(len(ids), params.max_new_tokens)
        seq = Sequence(list(ids), params, on_chunk, tuple(processors))
        with self._cond:
            if self._closed:
                raise EdgeftError("the engine is closed")
            if len(self._active) + len(self._waiting) >= self.parallel + self.queue_size:
                raise Overloaded(f"all {self.parallel} slots are busy and {len(self._waiting)} requests wait")
            self._waiting.append(seq)
            self._cond.notify()
        self.observe(EngineEvent.waiting, len(self._waiting))
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (or leave the trunk group); sequences still running get a final "cancelled" chunk."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self.group is not None:
            self.group.leave(self)
        else:
            self._thread.join()

    # ---- the engine's thread (or its trunk group's)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
            t0 = time.perf_counter()
            self._prepare()
            try:
                self._decode_step()
            except Exception as exc:  # a broken graph call: every sequence in flight gets the error
                self._fail_all(exc)
            self.stats.busy_s += time.perf_counter() - t0
            self._report()
        self._cancel_all()

    def _prepare(self) -> None:
        """An iteration up to its decode step: admit, drop the cancelled, prefill some prompt tokens."""
        with self._cond:
            self._admit()
        try:
            self._drop_cancelled()
            self._prefill_some()
        except Exception as exc:  # a broken graph call: every sequence in flight gets the error
            self._fail_all(exc)

    def _cancel_all(self) -> None:
        for seq in [*self._active.values(), *self._waiting]:
            self._finish(seq, Chunk("", None, "cancelled"))

    def _report(self) -> None:
        now = time.perf_counter()
        self._rate.append((now, self.stats.generated))
        while len(self._rate) > 2 and now - self._rate[0][0] > 5.0:
            self._rate.popleft()
        t0, n0 = self._rate[0]
        self.observe(EngineEvent.slots, len(self._active))
        self.observe(EngineEvent.waiting, len(self._waiting))
        if now - t0 > 0.2:
            self.observe(EngineEvent.tokens_per_second, (self.stats.generated - n0) / (now - t0))
        if not self._active and not self._waiting:
            self._rate.clear()
            self.observe(EngineEvent.tokens_per_second, 0.0)

    def _admit(self) -> None:
        while self._admit_one():
            pass

    def _admit_one(self) -> bool:
        """The first waiting sequence into the lowest free slot; False when none waits, no slot is free, or
        the slots cannot take it yet (a trunk group's pool has no free row: it waits, in order)."""
        while self._waiting and self._free and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting or not self._free or not self.kv.take(self._free[0]):
            return False
        seq = self._waiting.popleft()
        seq.slot = self._free.pop(0)
        seq.admitted = time.perf_counter()
        self.observe(EngineEvent.queue_wait, seq.admitted - seq.submitted)
        self._active[seq.slot] = seq
        seq.out = SequenceOutput(self.gen, seq.ids, seq.params, seq.processors)
        self._reuse_prefix(seq)
        return True

    def _reuse_prefix(self, seq: Sequence) -> None:
        kv = self.prefixes.longest(seq.ids)
        if kv is None:
            return
        self.kv.load(seq.slot, kv)
        n = kv[0].shape[1]
        seq.filled = seq.length = seq.reused = n
        self.stats.reused += n

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active.values() if s.cancelled]:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        seq.done = True
        self._active.pop(seq.slot, None)
        self.kv.release(seq.slot)
        with self._cond:
            self._free.append(seq.slot)
            self._free.sort()

    def _finish(self, seq: Sequence, chunk: Chunk) -> None:
        try:
            seq.on_chunk(chunk)
        finally:
            if seq.slot >= 0 and not seq.done:
                self._release(seq)
            seq.done = True

    def _emit(self, seq: Sequence, logits: np.ndarray) -> None:
        chunk = seq.out.advance(logits)
        if chunk.token_id is not None:
            self.stats.generated += 1
        if chunk.finish_reason is not None:
            self._finish(seq, chunk)
            return
        seq.next_token = chunk.token_id
        seq.on_chunk(chunk)

    def _prefill_some(self) -> None:
        budget = self.prefill_budget
        for seq in sorted(self._active.values(), key=lambda s: s.admitted):
            if budget <= 0:
                break
            if seq.filled >= len(seq.ids):
                continue
            n = min(budget, len(seq.ids) - seq.filled)
            chunk = np.asarray(seq.ids[seq.filled:seq.filled + n])
            self._set_idle(seq)
            logits = self.kv.prefill(seq.slot, chunk, seq.filled)
            seq.filled += n
            seq.length = seq.filled
            budget -= n
            self.stats.prefilled += n
            if seq.filled == len(seq.ids):
                self._remember_prefix(seq)
                self._emit(seq, logits)

    def _remember_prefix(self, seq: Sequence) -> None:
        if self.prefixes.entries <= 0:
            return
        n = len(seq.ids) - 1  # the last prompt token's keys are written by the first decode step's input
        key = tuple(seq.ids[:n])
        if n >= self.prefixes.min_tokens and not any(k[:n] == key for k in self.prefixes.items):
            self.prefixes.put(key, self.kv.export(seq.slot, n))

    def _set_idle(self, seq: Sequence) -> None:
        if isinstance(self.kv, SharedSlots):
            self.kv.idle_lengths = {s.slot: s.length for s in self._active.values()}

    def _decode_step(self) -> None:
        rows = self._decodable()
        if rows:
            drafts, plain = self._plan(rows, len(rows))
            # plain rows first: their idle rows write where the drafted slots' verification writes next
            self._advance(rows, drafts, plain, self.kv.decode(self.decode_rows(plain)) if plain else None)

    def _decodable(self) -> list[Sequence]:
        """The sequences with a token to feed, by slot."""
        rows = [s for s in self._active.values() if s.next_token is not None and not s.done and not s.cancelled]
        return sorted(rows, key=lambda s: s.slot)

    @staticmethod
    def decode_rows(plain: list[Sequence]) -> list[tuple[int, int, int]]:
        return [(s.slot, s.next_token, s.length) for s in plain]

    def _plan(self, rows: list[Sequence], batch: int) -> tuple[dict[int, list[int]], list[Sequence]]:
        """The drafts to verify (``batch``: the rows the step decodes in all) and the rows decoded plainly."""
        if isinstance(self.kv, SharedSlots):
            self.kv.idle_lengths = {s.slot: s.length for s in self._active.values()}
        drafts = self._drafts(rows, batch)
        return drafts, [s for s in rows if s.slot not in drafts]

    def _advance(self, rows: list[Sequence], drafts: dict[int, list[int]], plain: list[Sequence],
                 logits: np.ndarray | None) -> None:
        """After the plain rows' decode call (``logits``): verify the drafts, hand out every row's tokens."""
        self.stats.steps += 1
        self.stats.batched_rows += len(rows)
        self.stats.last_batch = len(rows)
        self.observe(EngineEvent.batch, len(rows))
        verified = [(s, self.kv.verify(s.slot, [s.next_token, *drafts[s.slot]], s.length)) for s in rows
                    if s.slot in drafts]
        for seq, row in zip(plain, logits if logits is not None else ()):
            seq.length += 1
            seq.next_token = None
            self._emit(seq, row)
        for seq, rows_ in verified:
            self._verified(seq, rows_, drafts[seq.slot])

    def _drafts(self, rows: list[Sequence], batch: int) -> dict[int, list[int]]:
        """Prompt-lookup drafts of the rows that have one and for which one pays, by slot.

        A drafted row is verified in a call of its own (onnxruntime's attention takes several
        new tokens with a past for one sequence only), which reads every weight once more:
        alone, that pays from a small acceptance; beside other rows, only when the row's
        recent drafts gained more tokens than those extra calls cost (``Speculator.pays``).
        The left-padded GPT-2 batch does not verify drafts: it decodes plainly.
        """
        if not hasattr(self.kv, "verify"):
            return {}
        out = {}
        for s in rows:
            if s.out.spec.pays(batch) and (d := s.out.draft(self.slot_len - s.length - 1)):
                out[s.slot] = d
        return out

    def _verified(self, seq: Sequence, rows: np.ndarray, draft: list[int]) -> None:
        """Hand out the tokens one verification step gave ``seq``; forget its rejected drafts."""
        start = seq.length
        chunks, accepted = seq.out.verify(rows[:len(draft) + 1], draft)
        seq.length, seq.next_token = start + 1 + accepted, None
        self.kv.trim(seq.slot, seq.length)
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        self.observe(EngineEvent.drafted, len(draft))
        self.observe(EngineEvent.accepted, accepted)
        for chunk in chunks:
            if chunk.token_id is not None:
                self.stats.generated += 1
            if chunk.finish_reason is not None:
                self._finish(seq, chunk)
                return
            if seq.cancelled:
                return
            seq.on_chunk(chunk)
        seq.next_token = chunks[-1].token_id

    def _fail_all(self, exc: Exception) -> None:
        for seq in list(self._active.values()):
            self._finish(seq, exc)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --------------------------------------------------------------------------- offline batches


def generate_batch(gen, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   parallel: int = 8, on_done: Callable[[int], None] | None = None,
                   processors: Callable[[int], Iterable[LogitProcessor]] | None = None) -> list:
    """Every prompt (token ids) to the end, ``parallel`` at a time in one engine; ``Completion``s in order.

    ``params`` is one ``SamplingParams`` for all or one per prompt; ``on_done(i)`` is called
    as prompt ``i`` finishes (a progress bar); ``processors(i)`` gives prompt ``i``'s own logit
    processors (fresh ones: a grammar mask holds its sequence's state). The slots are sized to
    the longest request.
    """
    from edgeft.runtime.generate import collect

    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise EdgeftError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
    if not prompts:
        return []
    need = max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, plist))
    for ids, p in zip(prompts, plist):
        gen.check_context(len(ids), p.max_new_tokens)
    parallel = max(1, min(parallel, len(prompts)))
    engine = Engine(gen, parallel=parallel, ctx_size=parallel * need, queue_size=len(prompts), prefix_cache=0)
    chunks: list[list[Chunk]] = [[] for _ in prompts]
    errors: list[BaseException | None] = [None] * len(prompts)
    left = threading.Semaphore(0)

    def receiver(i: int) -> Callable:
        def on_chunk(chunk) -> None:
            if isinstance(chunk, BaseException):
                errors[i] = chunk
            else:
                chunks[i].append(chunk)
                if chunk.finish_reason is None:
                    return
            if on_done is not None:
                on_done(i)
            left.release()
        return on_chunk

    try:
        for i, (ids, p) in enumerate(zip(prompts, plist)):
            engine.submit(ids, p, receiver(i), processors=processors(i) if processors is not None else ())
        for _ in prompts:
            left.acquire()
    finally:
        engine.close()
    for err in errors:
        if err is not None:
            raise err
    return [collect(c, len(ids), p) for c, ids, p in zip(chunks, prompts, plist)]

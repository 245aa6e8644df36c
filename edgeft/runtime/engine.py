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

How a batch shares one graph call depends on the graph family (``KVSlots``):

- the onnxruntime-genai builder's GroupQueryAttention graph: the cache is one buffer per
  layer of ``[slots, kv_heads, slot_len, head_dim]``, bound as past and present; a row's
  ``attention_mask`` holds as many ones as that row has tokens, so each row attends to and
  writes at its own length (GQA's per-row ``seqlens_k``). A prompt is prefilled into its
  slot through a view of that slot alone.
- the torch.onnx graph (GPT-2), whose presents are past + new: the batch is left-padded to
  the longest row, with the padding masked out and explicit position ids; it is rebuilt
  only when a sequence joins or leaves.
- any other graph: one sequence per decode step (``batching = "none"``).

A shared-prefix cache (``PrefixCache``) keeps the keys and values of recent prompts' first
tokens (by token ids) so a later prompt that starts the same way copies them into its slot
instead of computing them again.

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

from edgeft.artifact import Batching
from edgeft.errors import EdgeftError
from edgeft.runtime.batching import Overloaded
from edgeft.runtime.generate import Chunk, ContextLengthError, DecodeState, KVDecoder, SequenceOutput
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




# --------------------------------------------------------------------------- KV slots per graph family


def batching_kind(eng: KVDecoder) -> str:
    """How this graph batches: the manifest's ``decoder.batching``, else inferred from the graph."""
    if eng.decoder.batching:
        return Batching(eng.decoder.batching).value
    if eng.share_buffer:
        return "slots"
    if "attention_mask" in eng.inputs and eng.uses_positions:
        return "padded"
    return "none"


class SharedSlots:
    """GQA graphs: one ``[slots, kv_heads, slot_len, head_dim]`` buffer per layer, past = present."""

    kind = "slots"

    def __init__(self, eng: KVDecoder, slots: int, slot_len: int) -> None:
        self.eng, self.slots, self.slot_len = eng, slots, slot_len
        d = eng.decoder
        shape = (slots, d.num_kv_heads, slot_len, d.head_dim)
        self.cache = [np.zeros(shape, dtype=eng.kv_dtype) for _ in range(2 * d.num_layers)]
        self.row_items = d.num_kv_heads * slot_len * d.head_dim  # elements per slot in one buffer
        self.ids = np.zeros((slots, 1), dtype=eng.ids_dtype)
        self.logits = np.empty((slots, 1, eng.vocab), dtype=eng.logits_dtype)
        self.io = eng.io_binding()
        self.idle_lengths: dict[int, int] = {}  # slot -> tokens it holds, for slots in a call's span
        self._bound_span = 0

    def _bind_cache(self, io, first: int, rows: int) -> None:
        for (pk, pv, ok, ov), k, v in zip(self.eng.layers, self.cache[0::2], self.cache[1::2]):
            for name_in, name_out, buf in ((pk, ok, k), (pv, ov, v)):
                ptr = buf.ctypes.data + first * self.row_items * buf.itemsize
                shape = [rows, *buf.shape[1:]]
                io.bind_input(name_in, "cpu", 0, buf.dtype, shape, ptr)
                io.bind_output(name_out, "cpu", 0, buf.dtype, shape, ptr)

    def _bind_array(self, io, name: str, arr: np.ndarray) -> None:
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def prefill(self, slot: int, ids: np.ndarray, start: int) -> np.ndarray:
        """Write ``ids`` at positions ``start..`` of ``slot``; the last position's logits [vocab]."""
        eng, n = self.eng, ids.size
        io = eng.io_binding()
        self._bind_cache(io, slot, 1)
        chunk = np.ascontiguousarray(ids.reshape(1, n).astype(eng.ids_dtype, copy=False))
        mask = np.ones((1, start + n), dtype=eng.mask_dtype)
        self._bind_array(io, "input_ids", chunk)
        if "attention_mask" in eng.inputs:
            self._bind_array(io, "attention_mask", mask)
        pos = np.arange(start, start + n, dtype=eng.pos_dtype)[None, :]  # bound by address: kept alive
        if eng.uses_positions:
            self._bind_array(io, "position_ids", pos)
        eng.bind_keep(io, last_only=True)
        io.bind_output("logits", "cpu")
        eng.run(io)
        out = io.get_outputs()[-1].numpy()  # logits are bound last
        return out[0, -1].astype(np.float32)

    def decode(self, rows: list[tuple[int, int, int]]) -> np.ndarray:
        """One token for each ``(slot, token, length)``; their next logits [len(rows), vocab].

        The call covers slots ``0..max(slot)``: a slot in that range that is not decoding
        gets a one-token row whose key/value lands where its own next write goes anyway.
        """
        eng = self.eng
        span = max(s for s, _, _ in rows) + 1
        lengths = np.zeros(span, dtype=np.int64)
        for s in range(span):
            lengths[s] = self._idle_length(s)
        self.ids[:span] = 0
        for s, tok, length in rows:
            self.ids[s, 0], lengths[s] = tok, length
        total = int(lengths.max()) + 1
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(eng.mask_dtype)
        io = self.io
        if span != self._bound_span:  # the cache views stay bound while the span is unchanged
            self._bind_cache(io, 0, span)
            io.bind_input("input_ids", "cpu", 0, self.ids.dtype, [span, 1], self.ids.ctypes.data)
            io.bind_output("logits", "cpu", 0, self.logits.dtype, [span, 1, eng.vocab], self.logits.ctypes.data)
            self._bound_span = span
        if "attention_mask" in eng.inputs:
            self._bind_array(io, "attention_mask", mask)
        pos = lengths.astype(eng.pos_dtype).reshape(span, 1)  # bound by address: kept alive for the run
        if eng.uses_positions:
            self._bind_array(io, "position_ids", pos)
        eng.run(io)
        return self.logits[[s for s, _, _ in rows], 0].astype(np.float32)

    def verify(self, slot: int, ids: list[int], start: int) -> np.ndarray:
        """Write ``ids`` at positions ``start..`` of ``slot`` alone; every position's logits [len(ids), vocab].

        One slot per call: onnxruntime's GroupQueryAttention takes several new tokens with a
        past only for a batch of one.
        """
        eng, n = self.eng, len(ids)
        io = eng.io_binding()
        self._bind_cache(io, slot, 1)
        # bound by address: the arrays must live until the run is over
        chunk = np.asarray(ids, dtype=eng.ids_dtype).reshape(1, n)
        mask = np.ones((1, start + n), dtype=eng.mask_dtype)
        pos = np.arange(start, start + n, dtype=eng.pos_dtype)[None, :]
        self._bind_array(io, "input_ids", chunk)
        if "attention_mask" in eng.inputs:
            self._bind_array(io, "attention_mask", mask)
        if eng.uses_positions:
            self._bind_array(io, "position_ids", pos)
        eng.bind_keep(io, last_only=False)
        io.bind_output("logits", "cpu")
        eng.run(io)
        return io.get_outputs()[-1].numpy()[0].astype(np.float32)  # logits are bound last

    def trim(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (the rest is overwritten by later writes)."""

    def _idle_length(self, slot: int) -> int:
        return min(self.idle_lengths.get(slot, 0), self.slot_len - 1)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` cached positions of slot ``src`` into slot ``dst``."""
        for buf in self.cache:
            buf[dst, :, :n] = buf[src, :, :n]

    def export(self, slot: int, n: int) -> list[np.ndarray]:
        return [buf[slot, :, :n].copy() for buf in self.cache]

    def load(self, slot: int, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        for buf, part in zip(self.cache, kv):
            buf[slot, :, :n] = part

    def release(self, slot: int) -> None:
        pass


class PaddedBatch:
    """torch.onnx graphs: per-sequence caches for prefill, one left-padded batch for decode steps."""

    kind = "padded"

    def __init__(self, eng: KVDecoder, slots: int, slot_len: int) -> None:
        self.eng, self.slots, self.slot_len = eng, slots, slot_len
        self.states: dict[int, DecodeState] = {}  # slot -> its own cache (until it joins a batch)
        self.members: list[int] = []  # slots in the batch, in row order
        self.lengths: dict[int, int] = {}
        self.past: list = []  # per layer k, v: [rows, heads, width, head_dim]
        self.width = 0
        self.io = eng.session.io_binding()

    def prefill(self, slot: int, ids: np.ndarray, start: int) -> np.ndarray:
        if start == 0 or slot not in self.states:
            self._leave(slot)
            self.states[slot] = self.eng.start(self.slot_len)
        state = self.states[slot]
        state.rewind(start)
        logits = state.prefill(ids)
        self.lengths[slot] = state.length
        return logits

    def _kv_of(self, slot: int) -> list[np.ndarray]:
        """Slot's cache as arrays [1, heads, length, head_dim], wherever it lives now."""
        n = self.lengths[slot]
        if slot in self.states:
            st = self.states[slot]
            return [v.numpy()[:, :, :n] if hasattr(v, "numpy") else v[:, :, :n] for v in st.pasts]
        row = self.members.index(slot)
        return [p[row:row + 1, :, self.width - n:] for p in self._past_arrays()]

    def _past_arrays(self) -> list[np.ndarray]:
        self.past = [p.numpy() if hasattr(p, "numpy") else p for p in self.past]
        return self.past

    def _rebuild(self, slots: list[int]) -> None:
        kvs = {s: self._kv_of(s) for s in slots}
        width = max(self.lengths[s] for s in slots)
        d = self.eng.decoder
        past = []
        for j in range(2 * d.num_layers):
            arr = np.zeros((len(slots), d.num_kv_heads, width, d.head_dim), dtype=self.eng.kv_dtype)
            for r, s in enumerate(slots):
                n = self.lengths[s]
                arr[r, :, width - n:] = kvs[s][j][0]
            past.append(arr)
        for s in slots:
            self.states.pop(s, None)
        self.members, self.past, self.width = list(slots), past, width

    def _leave(self, slot: int) -> None:
        if slot in self.members:
            keep = [s for s in self.members if s != slot]
            if keep:
                self._rebuild(keep)
            else:
                self.members, self.past, self.width = [], [], 0
        self.states.pop(slot, None)

    def decode(self, rows: list[tuple[int, int, int]]) -> np.ndarray:
        eng = self.eng
        slots = [s for s, _, _ in rows]
        if slots != self.members:
            self._rebuild(slots)
        n, width = len(slots), self.width
        ids = np.array([[t] for _, t, _ in rows], dtype=eng.ids_dtype)
        lengths = np.array([self.lengths[s] for s in slots])
        mask = (np.arange(width + 1)[None, :] >= (width - lengths)[:, None]).astype(eng.mask_dtype)
        pos = lengths.astype(eng.pos_dtype).reshape(n, 1)
        io = self.io
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            io.bind_cpu_input(name, arr)
        for (pk, pv, ok, ov), k, v in zip(eng.layers, self.past[0::2], self.past[1::2]):
            for name, val in ((pk, k), (pv, v)):
                if isinstance(val, np.ndarray):
                    io.bind_cpu_input(name, val)
                else:
                    io.bind_ortvalue_input(name, val)
            io.bind_output(ok, "cpu")
            io.bind_output(ov, "cpu")
        io.bind_output("logits", "cpu")
        eng.session.run_with_iobinding(io)
        outs = io.get_outputs()
        names = [nm for _, _, ok, ov in eng.layers for nm in (ok, ov)] + ["logits"]
        by = dict(zip(names, outs))
        self.past = [by[nm] for _, _, ok, ov in eng.layers for nm in (ok, ov)]
        self.width = width + 1
        for s in slots:
            self.lengths[s] += 1
        return by["logits"].numpy()[:, -1].astype(np.float32)

    def copy(self, src: int, dst: int, n: int) -> None:
        raise NotImplementedError

    def release(self, slot: int) -> None:
        self._leave(slot)
        self.lengths.pop(slot, None)


class SingleSlots(PaddedBatch):
    """A graph that cannot batch: each sequence decoded alone, one after another."""

    kind = "none"

    def decode(self, rows: list[tuple[int, int, int]]) -> np.ndarray:
        out = []
        for s, tok, _ in rows:
            state = self.states[s]
            out.append(state.step(tok))
            self.lengths[s] = state.length
        return np.stack(out)

    def verify(self, slot: int, ids: list[int], start: int) -> np.ndarray:
        """``ids`` through the slot's own cache; every position's logits [len(ids), vocab]."""
        out = self.states[slot].prefill(ids, all_logits=True)
        self.lengths[slot] = self.states[slot].length
        return out

    def trim(self, slot: int, length: int) -> None:
        self.states[slot].rewind(length)
        self.lengths[slot] = length

    def _leave(self, slot: int) -> None:
        self.states.pop(slot, None)


def make_slots(eng: KVDecoder, slots: int, slot_len: int, kind: str | None = None):
    kind = kind or batching_kind(eng)
    if eng.trunk is not None and kind != "slots":
        raise EdgeftError(f"a split decoder (a shared trunk and a top) batches in slots, not {kind!r}")
    cls = {"slots": SharedSlots, "padded": PaddedBatch, "none": SingleSlots}.get(kind)
    if cls is None:
        raise EdgeftError(f"unknown batching kind {kind!r}: slots, padded or none")
    if kind == "slots" and not eng.share_buffer:
        raise EdgeftError("slot batching needs a graph whose past and present share one buffer")
    return cls(eng, slots, slot_len)


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
    """

    def __init__(self, gen, parallel: int = 4, ctx_size: int = 0, queue_size: int = 16,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, prefix_cache: int = 4, batching: str | None = None,
                 observe: Callable[[EngineEvent, float], None] | None = None) -> None:
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
        self._cond = threading.Condition()
        self._closed = False
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
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
        """Stop the thread; sequences still running get a final "cancelled" chunk."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- the engine's thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            t0 = time.perf_counter()
            try:
                self._drop_cancelled()
                self._prefill_some()
                self._decode_step()
            except Exception as exc:  # a broken graph call: every sequence in flight gets the error
                self._fail_all(exc)
            self.stats.busy_s += time.perf_counter() - t0
            self._report()
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
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            seq.slot = self._free.pop(0)
            seq.admitted = time.perf_counter()
            self.observe(EngineEvent.queue_wait, seq.admitted - seq.submitted)
            self._active[seq.slot] = seq
            seq.out = SequenceOutput(self.gen, seq.ids, seq.params, seq.processors)
            self._reuse_prefix(seq)

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
        rows = [s for s in self._active.values() if s.next_token is not None and not s.done and not s.cancelled]
        if not rows:
            return
        rows.sort(key=lambda s: s.slot)
        if isinstance(self.kv, SharedSlots):
            self.kv.idle_lengths = {s.slot: s.length for s in self._active.values()}
        drafts = self._drafts(rows)
        plain = [s for s in rows if s.slot not in drafts]
        if plain:  # first: its idle rows write where the drafted slots' verification writes next
            logits = self.kv.decode([(s.slot, s.next_token, s.length) for s in plain])
        self.stats.steps += 1
        self.stats.batched_rows += len(rows)
        self.stats.last_batch = len(rows)
        self.observe(EngineEvent.batch, len(rows))
        verified = [(s, self.kv.verify(s.slot, [s.next_token, *drafts[s.slot]], s.length)) for s in rows
                    if s.slot in drafts]
        for seq, row in zip(plain, logits if plain else ()):
            seq.length += 1
            seq.next_token = None
            self._emit(seq, row)
        for seq, rows_ in verified:
            self._verified(seq, rows_, drafts[seq.slot])

    def _drafts(self, rows: list[Sequence]) -> dict[int, list[int]]:
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
            if s.out.spec.pays(len(rows)) and (d := s.out.draft(self.slot_len - s.length - 1)):
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

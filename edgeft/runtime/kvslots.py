"""KV slots per graph family: how the batching engine's sequences share one decoder graph call.

- the onnxruntime-genai builder's GroupQueryAttention graph (``SharedSlots``): the cache is one
  buffer per layer of ``[slots, kv_heads, slot_len, head_dim]`` (a zeroed mapping of its own: pages
  are committed as slots fill, ``zeroed``), bound as past and present; a
  row's ``attention_mask`` holds as many ones as that row has tokens, so each row attends to and
  writes at its own length (GQA's per-row ``seqlens_k``). A prompt is prefilled into its slot
  through a view of that slot alone.
- the torch.onnx graph (GPT-2, ``PaddedBatch``), whose presents are past + new: the batch is
  left-padded to the longest row, with the padding masked out and explicit position ids; it is
  rebuilt only when a sequence joins or leaves.
- any other graph (``SingleSlots``): one sequence per decode step (``batching = "none"``).

This module knows graph bindings, caches and slot numbers; which sequence holds a slot, and
when, is the engine's (``edgeft.runtime.engine``). Nothing here imports torch.
"""

from __future__ import annotations

import mmap

import numpy as np

from edgeft.artifact import Batching
from edgeft.errors import EdgeftError
from edgeft.runtime.generate import DecodeState, KVDecoder


def batching_kind(eng: KVDecoder) -> str:
    """How this graph batches: the manifest's ``decoder.batching``, else inferred from the graph."""
    if eng.decoder.batching:
        return Batching(eng.decoder.batching).value
    if eng.share_buffer:
        return "slots"
    if "attention_mask" in eng.inputs and eng.uses_positions:
        return "padded"
    return "none"


def zeroed(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in an anonymous mapping of their own: memory is committed only where written, and given back
    to the system when the array goes (``np.zeros`` may reuse freed heap memory, clearing, so committing,
    every page of it at once)."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize)), dtype=dtype,
                         count=count).reshape(shape)


class SharedSlots:
    """GQA graphs: one ``[slots, kv_heads, slot_len, head_dim]`` buffer per layer, past = present.

    ``cache``: the buffers to use (a key, a value per layer), e.g. another ``SharedSlots``'s; fresh by default."""

    kind = "slots"

    def __init__(self, eng: KVDecoder, slots: int, slot_len: int, cache: list[np.ndarray] | None = None) -> None:
        self.eng, self.slots, self.slot_len = eng, slots, slot_len
        d = eng.decoder
        shape = (slots, d.num_kv_heads, slot_len, d.head_dim)
        self.cache = cache if cache is not None else [zeroed(shape, eng.kv_dtype) for _ in range(2 * d.num_layers)]
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
        return self.logits[[s for s, _, _ in rows], 0].astype(np.float32, copy=False)  # the row pick is a copy already

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

    def take(self, slot: int) -> bool:
        """Claim what ``slot`` needs to hold a sequence (False: nothing free, the sequence waits): here, the slot."""
        return True

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

    def take(self, slot: int) -> bool:
        return True

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

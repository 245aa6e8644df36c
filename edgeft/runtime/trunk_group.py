"""One trunk call per decode step for every model tuned from one base: the engines of a trunk group.

Models tuned from one base carry byte-identical trunks, loaded as one onnxruntime session
(``edgeft.runtime.trunks``). A ``TrunkGroup`` also batches them: one thread drives the
continuous-batching engines (``edgeft.runtime.engine.Engine``, made with ``batch_trunk``) of
every model on that trunk with the same slot length. Each iteration admits and prefills each
engine's sequences as the engine's own loop would; then one trunk call takes the next token of
every row of every model, its boundary tensors are split by model, and each model's top runs on
its own rows with its own KV slots; models whose head is the base's (a shared head file) stop
their tops at the head's input, and one head call takes the stacked rows of all of them. Drafted
rows are verified afterwards, each in a call of its own, as an engine alone does them.

While the group has several members, their trunk KV caches are one pool: per trunk layer one
``[rows, kv_heads, slot_len, head_dim]`` buffer of one ``parallel`` of rows (the largest member's; in a
server every model's ``--parallel``), not a row per member slot: the models on a trunk share one batch
budget, as one model's sequences share its slots. A sequence takes the lowest free row when it is
admitted (``PooledSlots.take``), so the rows in use stay packed at the start of the pool whichever
models they belong to, and one trunk call spans them; with no row free it waits in its engine's line
(a freed row goes to the member whose first waiting sequence is the oldest), never refused for it: each engine's
line and its limit stay as they are. An engine in the group holds no trunk caches of its own, only its
top's, in its own ``parallel`` slots, so one more model on a trunk costs its top. A row of a call that
is not decoding (a free one, one still prefilling or one whose draft is verified next) writes one key
where that row's own next write goes anyway, as in one engine. Every cache buffer is a zeroed mapping
of its own (``kvslots.zeroed``): memory is committed as rows fill and given back when a layout drops it.

Per request nothing changes: a row's trunk and top read the same token, position and cache as
alone (a batched matrix product may round differently, within float tolerance); prefix reuse,
speculation, constraints and sampling stay each engine's. A group of one engine keeps its trunk
caches in its own slots and runs exactly the engine's own steps (and admits as the engine alone does).

Engines join and leave (a model loaded or unloaded while serving) between iterations, on the
group's thread: from one member to two the pool is made and the cached tokens of the sequences in
flight are copied into it, from two to one they are copied back into the last member's own slots, and
between several the pool stays as it is (a leaving member's rows are freed), so a request running across
a load or an unload goes on unchanged.

This module knows engines, slots and graph bindings; it knows nothing of HTTP, text or sampling.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.runtime.kvslots import SharedSlots, zeroed


def _bind(io, name: str, arr: np.ndarray) -> None:
    io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


def _bind_cache(io, layers: list[tuple[str, str, str, str]], bufs: list[np.ndarray], rows: int) -> None:
    """Rows ``0..rows`` of each layer's buffers, bound as that layer's past and present (one buffer)."""
    for (pk, pv, ok, ov), k, v in zip(layers, bufs[0::2], bufs[1::2]):
        for name_in, name_out, buf in ((pk, ok, k), (pv, ov, v)):
            shape = [rows, *buf.shape[1:]]
            io.bind_input(name_in, "cpu", 0, buf.dtype, shape, buf.ctypes.data)
            io.bind_output(name_out, "cpu", 0, buf.dtype, shape, buf.ctypes.data)


def _feeds(eng, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The attention mask and positions of one decode call whose rows hold ``lengths`` tokens."""
    total = int(lengths.max()) + 1
    return {"attention_mask": (np.arange(total)[None, :] <= lengths[:, None]).astype(eng.mask_dtype),
            "position_ids": lengths.astype(eng.pos_dtype).reshape(-1, 1)}


class PooledSlots(SharedSlots):
    """A group member's slots: the top's caches are its own; the trunk's, while the group has several
    members, are the group's pool, at the row the group lent each slot when it took a sequence (``rows``,
    None while alone: then the trunk's caches are its own slots too)."""

    def __init__(self, eng, slots: int, slot_len: int, group: "TrunkGroup", cache: list[np.ndarray]) -> None:
        super().__init__(eng, slots, slot_len, cache)
        self.group = group
        self.entries = 2 * eng.trunk.blocks  # the trunk's buffers come first in ``cache``: a key, a value per layer
        self.rows: dict[int, int] | None = None

    def take(self, slot: int) -> bool:
        """Lend ``slot`` the pool's lowest free row (False when none is free: its sequence waits)."""
        if self.rows is None:
            return True
        if not self.group.free:
            return False
        self.rows[slot] = heapq.heappop(self.group.free)
        return True

    def at(self, j: int, slot: int) -> int:
        """Where ``slot`` lives in cache buffer ``j``."""
        return slot if self.rows is None or j >= self.entries else self.rows[slot]

    def _bind_cache(self, io, first: int, rows: int) -> None:
        if self.rows is None:
            return super()._bind_cache(io, first, rows)
        assert rows == 1, "pooled slots are bound one at a time; the group decodes them together"
        for i, ((pk, pv, ok, ov), k, v) in enumerate(zip(self.eng.layers, self.cache[0::2], self.cache[1::2])):
            for name_in, name_out, buf in ((pk, ok, k), (pv, ov, v)):
                ptr = buf.ctypes.data + self.at(2 * i, first) * self.row_items * buf.itemsize
                shape = [1, *buf.shape[1:]]
                io.bind_input(name_in, "cpu", 0, buf.dtype, shape, ptr)
                io.bind_output(name_out, "cpu", 0, buf.dtype, shape, ptr)

    def copy(self, src: int, dst: int, n: int) -> None:
        for j, buf in enumerate(self.cache):
            buf[self.at(j, dst), :, :n] = buf[self.at(j, src), :, :n]

    def export(self, slot: int, n: int) -> list[np.ndarray]:
        return [buf[self.at(j, slot), :, :n].copy() for j, buf in enumerate(self.cache)]

    def load(self, slot: int, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        for j, (buf, part) in enumerate(zip(self.cache, kv)):
            buf[self.at(j, slot), :, :n] = part

    def release(self, slot: int) -> None:
        if self.rows is not None and slot in self.rows:
            heapq.heappush(self.group.free, self.rows.pop(slot))


class TrunkGroup:
    """The engines of the split models that share one trunk and one slot length, driven by one thread."""

    def __init__(self, sha256: str, slot_len: int) -> None:
        self.sha256, self.slot_len = sha256, slot_len
        self.cond = threading.Condition()  # every member engine's own condition
        self.members: list[Any] = []
        self.pool: list[np.ndarray] = []  # the trunk layers' caches (key, value per layer) while pooled
        self.free: list[int] = []  # the pool's rows no sequence holds (a heap)
        self.steps = 0  # trunk calls made for the members together
        self._changes: collections.deque[tuple[Callable[[], None], threading.Event, list]] = collections.deque()
        self._thread: threading.Thread | None = None

    # ---- joining and leaving (any thread)

    def join(self, engine) -> None:
        """Drive ``engine`` (a new split model's, in slots of this group's length) from the next iteration on."""
        kv = engine.kv
        if kv.kind != "slots" or kv.slot_len != self.slot_len or kv.eng.trunk.sha256 != self.sha256:
            raise EdgeftError("an engine joins the trunk group of its own trunk and slot length only")

        def go() -> None:
            engine.kv = PooledSlots(kv.eng, engine.parallel, self.slot_len, self, kv.cache)
            self._layout([*self.members, engine])
        self._change(go)

    def leave(self, engine) -> None:
        """Stop driving ``engine``: its sequences still running get a final "cancelled" chunk."""
        def go() -> None:
            if engine in self.members:
                engine._cancel_all()
                self._layout([m for m in self.members if m is not engine])
        self._change(go)

    def _change(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the group's thread between two iterations (here, when no thread runs)."""
        done, error = threading.Event(), []
        if threading.current_thread() is self._thread:
            raise EdgeftError("an engine of a trunk group cannot join or leave from its own callbacks")
        with self.cond:
            if self._thread is None:
                fn()
                if self.members:
                    self._thread = threading.Thread(target=self._loop, name=f"edgeft-trunk-{self.sha256[:8]}",
                                                    daemon=True)
                    self._thread.start()
                return
            self._changes.append((fn, done, error))
            self.cond.notify_all()
        done.wait()
        if error:
            raise error[0]

    def _layout(self, members: list) -> None:
        """Put the members' trunk caches in one pool (several members) or each in its own slots (one),
        copying the cached tokens of every sequence in flight; a pool of the size wanted stays as it is."""
        pool = self._pool_for(members)
        kept = bool(pool) and pool is self.pool
        free = list(self.free) if kept else list(range(len(pool[0]) if pool else 0))
        heapq.heapify(free)
        for m in members:
            kv = m.kv
            trunk = kv.cache[:kv.entries]
            if pool:
                bufs = pool
            elif kv.rows is None:
                continue  # alone in its own slots already: unchanged
            else:
                bufs = [zeroed((m.parallel, *b.shape[1:]), b.dtype) for b in trunk]
            if bufs[0] is trunk[0]:
                continue  # in this pool already: its rows stay where they are
            lent: dict[int, int] | None = {} if pool else None
            for slot, seq in sorted(m._active.items()):
                at = heapq.heappop(free) if lent is not None else slot
                if lent is not None:
                    lent[slot] = at
                for j, new in enumerate(bufs):
                    new[at, :, :seq.length] = trunk[j][kv.at(j, slot), :, :seq.length]
            kv.cache[:kv.entries], kv.rows = bufs, lent
            kv._bound_span = 0  # its decode binding points at the old buffers
        self.pool, self.free, self.members = pool, free, members

    def _pool_for(self, members: list) -> list[np.ndarray]:
        """The trunk caches of several ``members``: one ``--parallel`` of rows (the largest member's), or as many
        as they have sequences in flight if more (the pool held now, when its size is that); none for one member."""
        if len(members) < 2:
            return []
        rows = max(max(m.parallel for m in members), sum(len(m._active) for m in members))
        if self.pool and len(self.pool[0]) == rows:
            return self.pool
        first = members[0].kv
        return [zeroed((rows, *b.shape[1:]), b.dtype) for b in first.cache[:first.entries]]

    def _admit(self, members: list) -> None:
        """While the pool has a free row, the member whose first waiting sequence is the oldest admits it; the
        others wait in their engines' lines (each member's own admission then finds no row left)."""
        with self.cond:
            while self.free:
                ready = [m for m in members if m._waiting and m._free]
                if not ready:
                    return
                oldest = min(ready, key=lambda m: m._waiting[0].submitted)
                if not oldest._admit_one() and oldest._waiting:
                    return

    # ---- the group's thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._changes and not any(m._waiting or m._active for m in self.members):
                    self.cond.wait()
                changes = list(self._changes)
                self._changes.clear()
            for fn, done, error in changes:
                try:
                    fn()
                except Exception as exc:  # handed to the caller of join or leave
                    error.append(exc)
                done.set()
            with self.cond:
                if not self.members and not self._changes:
                    self._thread = None
                    return
            if any(m._waiting or m._active for m in self.members):
                self._iterate()

    def _iterate(self) -> None:
        members = list(self.members)
        t0 = time.perf_counter()
        if len(members) > 1:
            self._admit(members)
        for m in members:
            m._prepare()
        try:
            self._decode_step(members)
        except Exception as exc:  # a broken graph call: every sequence in flight gets the error
            for m in members:
                m._fail_all(exc)
        busy = time.perf_counter() - t0
        for m in members:
            m.stats.busy_s += busy
            m._report()

    def _decode_step(self, members: list) -> None:
        rows = {m: r for m in members if (r := m._decodable())}
        batch = sum(len(r) for r in rows.values())
        plans = {m: m._plan(r, batch) for m, r in rows.items()}
        plain = {m: p for m, (_, p) in plans.items() if p}
        if len(members) > 1 and plain:
            logits = self._decode_together(plain)
        else:  # alone: the engine's own call
            logits = {m: m.kv.decode(m.decode_rows(p)) for m, p in plain.items()}
        for m, (drafts, p) in plans.items():
            m._advance(rows[m], drafts, p, logits.get(m))

    def _decode_together(self, plain: dict) -> dict:
        """One trunk call over the pool's rows up to the last decoding one, then each model's top on its slots."""
        span = max(m.kv.rows[s.slot] for m, p in plain.items() for s in p) + 1
        lengths = np.zeros(span, dtype=np.int64)  # a free row writes at 0, a lent one where it writes next anyway
        for m in self.members:
            for slot, row in m.kv.rows.items():
                if row < span and (seq := m._active.get(slot)) is not None:
                    lengths[row] = min(seq.length, self.slot_len - 1)
        first = next(iter(plain))
        ids = np.zeros((span, 1), dtype=first.kv.eng.ids_dtype)
        for m, p in plain.items():
            for s in p:
                ids[m.kv.rows[s.slot], 0], lengths[m.kv.rows[s.slot]] = s.next_token, s.length
        sends = self._run_trunk(first.kv.eng, ids, lengths)
        out, hidden = {}, {}
        for m, p in plain.items():
            top_sends, top_lengths = self._top_rows(m, p, sends)
            slots = [s.slot for s in p]
            if m.kv.eng.head is None:
                out[m] = self._run_top(m.kv, top_sends, top_lengths, slots)
            else:  # the top up to its head's input; the head runs below, once for every model sharing it
                hidden[m] = self._run_top(m.kv, top_sends, top_lengths, slots, hidden=True)
        out.update(self._run_heads(hidden))
        self.steps += 1
        return out

    @staticmethod
    def _run_heads(hidden: dict) -> dict:
        """One call of each shared head over the stacked rows of every model that has it (a head is the base's,
        so the models tuned from one base share one session): each model's rows of logits."""
        by_head: dict[Any, list] = {}
        for m in hidden:
            by_head.setdefault(m.kv.eng.head, []).append(m)
        out = {}
        for head, models in by_head.items():
            logits = head.run(np.concatenate([hidden[m] for m in models]))
            at = 0
            for m in models:
                n = len(hidden[m])
                out[m] = logits[at:at + n, 0].astype(np.float32)
                at += n
        return out

    def _top_rows(self, m, plain: list, sends: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The inputs and lengths of ``m``'s top call over its slots up to its last decoding one: a decoding
        slot's rows of the trunk's output; an idle slot's (zeros) only write where its next write goes anyway."""
        n = plain[-1].slot + 1
        lengths = np.array([min(seq.length, self.slot_len - 1) if (seq := m._active.get(s)) is not None else 0
                            for s in range(n)], dtype=np.int64)
        slots, rows = [s.slot for s in plain], [m.kv.rows[s.slot] for s in plain]
        lengths[slots] = [s.length for s in plain]
        picked = {}
        for name, arr in sends.items():
            picked[name] = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            picked[name][slots] = arr[rows]
        return picked, lengths

    def _run_trunk(self, eng, ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        part = eng.parts[0]
        io = part.session.io_binding()
        feeds = {"input_ids": ids, **_feeds(eng, lengths)}  # bound by address: alive until the run is over
        for name, arr in feeds.items():
            if name in part.inputs:
                _bind(io, name, arr)
        _bind_cache(io, part.layers, self.pool, len(ids))
        for name in part.sends:
            io.bind_output(name, "cpu")
        part.session.run_with_iobinding(io)
        outs = io.get_outputs()[-len(part.sends):]  # bound after the caches
        return {name: out.numpy() for name, out in zip(part.sends, outs)}

    def _run_top(self, kv, sends: dict[str, np.ndarray], lengths: np.ndarray, slots: list[int],
                 hidden: bool = False) -> np.ndarray:
        """The logits of ``slots`` (or, with ``hidden``, the top's output for the model's shared head)."""
        eng = kv.eng
        part = eng.parts[1]
        io = part.session.io_binding()
        feeds = {**sends, **_feeds(eng, lengths)}  # bound by address: alive until the run is over
        for name, arr in feeds.items():
            if name in part.inputs:
                _bind(io, name, arr)
        _bind_cache(io, part.layers, kv.cache[kv.entries:], len(lengths))
        if hidden:
            return eng.top_hidden(io).numpy()[slots]
        logits = eng.top_logits(io, len(lengths))  # the top, then the model's shared head where it has one
        return logits[slots, 0].astype(np.float32)


_GROUPS: weakref.WeakValueDictionary[tuple[str, int], TrunkGroup] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def batches_rows(trunk) -> bool:
    """Whether every tensor ``trunk`` sends up has one row per sequence (so a step's rows split by model)."""
    batch = next(i.shape[0] for i in trunk.session.get_inputs() if i.name == "input_ids")
    outs = {o.name: o.shape for o in trunk.session.get_outputs()}
    return isinstance(batch, str) and all(outs[n] and outs[n][0] == batch for n in trunk.outputs)


def group_for(engine) -> TrunkGroup | None:
    """The process's group for ``engine``'s trunk and slot length (made when none is held); None for an
    engine that batches otherwise than in slots, or a trunk whose boundary tensors are not one row per sequence."""
    trunk = engine.kv.eng.trunk
    if engine.kv.kind != "slots" or not batches_rows(trunk):
        return None
    key = (trunk.sha256, engine.slot_len)
    with _LOCK:
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = TrunkGroup(*key)
        return group

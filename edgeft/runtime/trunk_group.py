"""One trunk call per decode step for every model tuned from one base: the engines of a trunk group.

Models tuned from one base carry byte-identical trunks, loaded as one onnxruntime session
(``edgeft.runtime.trunks``). A ``TrunkGroup`` also batches them: one thread drives the
continuous-batching engines (``edgeft.runtime.engine.Engine``, made with ``batch_trunk``) of
every model on that trunk with the same slot length. Each iteration admits and prefills each
engine's sequences as the engine's own loop would; then one trunk call takes the next token of
every row of every model, its boundary tensors are split by model, and each model's top runs on
its own rows with its own KV slots. Drafted rows are verified afterwards, each in a call of its
own, as an engine alone does them.

The trunk's KV caches of every member are one pool: per trunk layer one
``[rows, kv_heads, slot_len, head_dim]`` buffer, each engine a contiguous block of rows (its
slots, seen by its ``SharedSlots`` as views); each top's caches stay its engine's own. A row of
the trunk call that is not decoding (a free slot, a slot still prefilling or one whose draft is
verified next) writes one key where that slot's own next write goes anyway, as in one engine.

Per request nothing changes: a row's trunk and top read the same token, position and cache as
alone (a batched matrix product may round differently, within float tolerance); prefix reuse,
speculation, constraints and sampling stay each engine's. A step with rows of one model runs that
engine's own decode call, and a group of one engine runs exactly the engine's own steps.

Engines join and leave (a model loaded or unloaded while serving) between iterations, on the
group's thread: the pool is laid out afresh and the cached tokens of the sequences in flight are
copied, so a request running across a load or an unload goes on unchanged.

This module knows engines, slots and graph bindings; it knows nothing of HTTP, text or sampling.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeft.errors import EdgeftError


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


class TrunkGroup:
    """The engines of the split models that share one trunk and one slot length, driven by one thread."""

    def __init__(self, sha256: str, slot_len: int) -> None:
        self.sha256, self.slot_len = sha256, slot_len
        self.cond = threading.Condition()  # every member engine's own condition
        self.members: list[Any] = []  # engines, in pool order
        self.base: dict[Any, int] = {}  # engine -> its first row in the pool
        self.pool: list[np.ndarray] = []  # the trunk layers' caches (key, value per layer), every member's slots
        self.steps = 0  # trunk calls that carried the rows of several models
        self._changes: collections.deque[tuple[Callable[[], None], threading.Event, list]] = collections.deque()
        self._thread: threading.Thread | None = None

    # ---- joining and leaving (any thread)

    def join(self, engine) -> None:
        """Drive ``engine`` (a split model's, in slots of this group's length) from the next iteration on."""
        kv = engine.kv
        if kv.kind != "slots" or kv.slot_len != self.slot_len or kv.eng.trunk.sha256 != self.sha256:
            raise EdgeftError("an engine joins the trunk group of its own trunk and slot length only")
        self._change(lambda: self._layout([*self.members, engine]))

    def leave(self, engine) -> None:
        """Stop driving ``engine``: its sequences still running get a final "cancelled" chunk."""
        def go() -> None:
            if engine in self.base:
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
        """Lay the pool out for ``members``, copying the cached tokens of every sequence in flight."""
        rows = sum(m.parallel for m in members)
        kv = members[0].kv if members else None
        pool = [np.zeros((rows, *buf.shape[1:]), dtype=buf.dtype) for buf in kv.cache[:self._entries(kv)]] \
            if kv is not None else []
        base, bases = 0, {}
        for m in members:
            views = [buf[base:base + m.parallel] for buf in pool]
            for slot, seq in m._active.items():
                for old, new in zip(m.kv.cache, views):
                    new[slot, :, :seq.length] = old[slot, :, :seq.length]
            m.kv.cache[:len(views)] = views
            m.kv._bound_span = 0  # its decode binding points at the old buffers
            bases[m] = base
            base += m.parallel
        self.pool, self.members, self.base = pool, members, bases

    @staticmethod
    def _entries(kv) -> int:
        """How many of an engine's cache buffers are the trunk's (a key and a value per trunk layer)."""
        return 2 * kv.eng.trunk.blocks

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
        if len(plain) > 1:
            logits = self._decode_together(plain)
        else:  # one model's rows: its engine's own call
            logits = {m: m.kv.decode(m.decode_rows(p)) for m, p in plain.items()}
        for m, (drafts, p) in plans.items():
            m._advance(rows[m], drafts, p, logits.get(m))

    def _decode_together(self, plain: dict) -> dict:
        """One trunk call over the pool's rows up to the last decoding one, then each model's top on its rows."""
        span = max(self.base[m] + p[-1].slot for m, p in plain.items()) + 1
        lengths = np.zeros(span, dtype=np.int64)
        for m in self.members:  # idle rows write where their slot's next write goes anyway
            for slot, seq in m._active.items():
                if self.base[m] + slot < span:
                    lengths[self.base[m] + slot] = min(seq.length, self.slot_len - 1)
        first = next(iter(plain))
        ids = np.zeros((span, 1), dtype=first.kv.eng.ids_dtype)
        for m, p in plain.items():
            for s in p:
                ids[self.base[m] + s.slot, 0], lengths[self.base[m] + s.slot] = s.next_token, s.length
        sends = self._run_trunk(first.kv.eng, ids, lengths)
        out = {}
        for m, p in plain.items():
            lo, n = self.base[m], p[-1].slot + 1
            out[m] = self._run_top(m.kv, {k: v[lo:lo + n] for k, v in sends.items()}, lengths[lo:lo + n],
                                   [s.slot for s in p])
        self.steps += 1
        return out

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

    def _run_top(self, kv, sends: dict[str, np.ndarray], lengths: np.ndarray, slots: list[int]) -> np.ndarray:
        eng = kv.eng
        part = eng.parts[1]
        io = part.session.io_binding()
        feeds = {**{k: np.ascontiguousarray(v) for k, v in sends.items()}, **_feeds(eng, lengths)}
        for name, arr in feeds.items():
            if name in part.inputs:
                _bind(io, name, arr)
        _bind_cache(io, part.layers, kv.cache[self._entries(kv):], len(lengths))
        logits = np.empty((len(lengths), 1, eng.vocab), dtype=eng.logits_dtype)
        io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        part.session.run_with_iobinding(io)
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

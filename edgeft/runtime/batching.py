"""Worker pools between the event loop and the engines, with bounded queues.

``GenerationPool`` runs generations on a few worker threads (onnxruntime releases the
GIL), each owning its own ``Generator`` so no engine state is ever shared between two
requests; a bounded waiting line in front of the workers refuses work past its size
(``Overloaded``, answered 429). ``ClassifyBatcher`` gathers concurrent classification
requests into one classifier run (micro-batching) and hands each request its own rows.

This module knows threads, asyncio and the engines' agreed methods (``stream``,
``classify``); it knows nothing of HTTP or of the OpenAI wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgeft.runtime.metrics import Registry


class Overloaded(Exception):
    """The waiting line is full: try again later (HTTP 429)."""


class GenerationPool:
    """``len(generators)`` worker threads, each with its own engine, and a waiting line of ``queue_size``."""

    def __init__(self, name: str, generators: list[Any], queue_size: int, metrics: Registry) -> None:
        self.name, self.metrics = name, metrics
        self.capacity = len(generators) + queue_size
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for g in generators:
            self._free.put(g)
        self._executor = ThreadPoolExecutor(max_workers=len(generators), thread_name_prefix=f"edgeft-gen-{name}")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.capacity:
                self.metrics.rejected.inc(model=self.name)
                raise Overloaded(f"model '{self.name}' is busy: {self._admitted} requests running or waiting")
            self._admitted += 1
        self.metrics.queue_depth.inc(model=self.name)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _work(self, fn: Callable[[Any], Any]) -> Any:
        self.metrics.queue_depth.dec(model=self.name)
        self.metrics.in_flight.inc(model=self.name)
        engine = self._free.get()
        try:
            return fn(engine)
        finally:
            self._free.put(engine)
            self.metrics.in_flight.dec(model=self.name)
            self._release()

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        """Admit (or raise ``Overloaded``), then run ``fn(engine)`` on a worker thread."""
        self._admit()
        try:
            fut = self._executor.submit(self._work, fn)
        except BaseException:
            self.metrics.queue_depth.dec(model=self.name)
            self._release()
            raise
        return await asyncio.wrap_future(fut)

    def submit_stream(self, fn: Callable[[Any], Iterator[Any]], cancel: threading.Event,
                      loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Admit, then run the iterator ``fn(engine)`` on a worker, feeding its items into an asyncio queue.

        The queue ends with ``StopAsyncIteration()`` (or the exception the worker raised).
        Setting ``cancel`` stops the worker between two items (client gone, shutdown).
        """
        self._admit()
        out: asyncio.Queue = asyncio.Queue()

        def pump(engine: Any) -> None:
            end: BaseException = StopAsyncIteration()
            try:
                if not cancel.is_set():
                    it = fn(engine)
                    try:
                        for item in it:
                            loop.call_soon_threadsafe(out.put_nowait, item)
                            if cancel.is_set():
                                self.metrics.cancelled.inc(model=self.name)
                                break
                    finally:
                        close = getattr(it, "close", None)
                        if close is not None:
                            close()
            except BaseException as exc:  # handed to the request, which answers it
                end = exc
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                loop.call_soon_threadsafe(out.put_nowait, end)

        try:
            self._executor.submit(self._work, pump)
        except BaseException:
            self.metrics.queue_depth.dec(model=self.name)
            self._release()
            raise
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


class ClassifyBatcher:
    """Gathers concurrent ``classify`` requests for up to ``wait_s`` (or ``max_batch`` texts) into one run."""

    def __init__(self, name: str, classifier: Any, max_batch: int, wait_s: float, queue_size: int,
                 metrics: Registry, method: str = "classify") -> None:
        self.name, self.classifier, self.metrics = name, classifier, metrics
        self.method = method  # the engine's batch call: "classify", or "embed_rows" for an embedder
        self.max_batch, self.wait_s, self.queue_size = max_batch, wait_s, queue_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edgeft-cls-{name}")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._waiting = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"edgeft-batcher-{self.name}")

    async def classify(self, texts: list[str]) -> list[dict]:
        """Classify ``texts`` within the next micro-batch; raise ``Overloaded`` past the queue size."""
        assert self._queue is not None, "batcher not started"
        if self._waiting >= self.queue_size + 1:
            self.metrics.rejected.inc(model=self.name)
            raise Overloaded(f"model '{self.name}' is busy: {self._waiting} requests waiting")
        fut = asyncio.get_running_loop().create_future()
        self._waiting += 1
        self.metrics.queue_depth.inc(model=self.name)
        self._queue.put_nowait((texts, fut))
        return await fut

    async def _gather(self) -> list[tuple[list[str], asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        n, deadline = len(batch[0][0]), loop.time() + self.wait_s
        while n < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            batch.append(item)
            n += len(item[0])
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self._waiting -= len(batch)
            self.metrics.queue_depth.dec(len(batch), model=self.name)
            batch = [(texts, fut) for texts, fut in batch if not fut.cancelled()]
            texts = [t for ts, _ in batch for t in ts]
            if not texts:
                continue
            self.metrics.in_flight.inc(model=self.name)
            try:
                results = await loop.run_in_executor(self._executor, self._run, texts)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.metrics.in_flight.dec(model=self.name)
            i = 0
            for ts, fut in batch:
                if not fut.done():
                    fut.set_result(results[i:i + len(ts)])
                i += len(ts)

    def _run(self, texts: list[str]) -> list[dict]:
        results = getattr(self.classifier, self.method)(texts, batch_size=self.max_batch)
        if len(results) != len(texts):
            raise RuntimeError(f"classifier returned {len(results)} results for {len(texts)} texts")
        self.metrics.batch_size.observe(len(texts), model=self.name)
        self.metrics.classified.inc(len(texts), model=self.name)
        return results

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

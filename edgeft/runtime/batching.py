"""Micro-batching between the event loop and the classifier, with a bounded queue.

``ClassifyBatcher`` gathers concurrent classification requests into one classifier run
and hands each request its own rows; past its queue size it refuses work (``Overloaded``,
answered 429, as the generation engine in ``edgeft.runtime.engine`` does when its slots
and waiting line are full).

This module knows threads, asyncio and the classifier's ``classify``; it knows nothing of
HTTP or of the OpenAI wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgeft.runtime.serve.metrics import Registry


class Overloaded(Exception):
    """Every slot is busy and the waiting line is full: try again later (HTTP 429)."""


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

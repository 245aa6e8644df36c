"""Chunks handed from an engine thread to the event loop: one wake-up per burst, every item in order."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

from edgeft.runtime.serve import generation
from edgeft.runtime.serve.generation import Choice, mailbox


def _counting(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Count the loop's cross-thread wake-ups (``call_soon_threadsafe``) from now on."""
    calls = [0]
    original = loop.call_soon_threadsafe

    def counted(*args, **kw):
        calls[0] += 1
        return original(*args, **kw)
    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return calls


async def _drain(queue: asyncio.Queue, n: int) -> list:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(n)]


def test_a_burst_from_another_thread_wakes_the_loop_once_and_keeps_each_queue_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = _counting(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        choices = [Choice(i, loop, q) for i, q in enumerate(queues)]
        assert all(c.box is mailbox(loop) for c in choices)  # one mailbox per loop, shared by requests

        def step(k: int) -> None:  # an engine step: one chunk per row, the loop blocked meanwhile
            for c in choices:
                c.on_chunk(f"chunk {k}")
        t = threading.Thread(target=lambda: [step(k) for k in range(4)])
        t.start()
        t.join()  # the loop cannot run until the whole burst is posted
        assert wakeups[0] == 1
        got = [await _drain(q, 4) for q in queues]
        assert got == [[(i, f"chunk {k}") for k in range(4)] for i in range(3)]
        assert all(q.empty() for q in queues)

        t = threading.Thread(target=step, args=(9,))  # after the drain, the next burst wakes it again
        t.start()
        t.join()
        assert wakeups[0] == 2
        assert [await _drain(q, 1) for q in queues] == [[(i, "chunk 9")] for i in range(3)]
    asyncio.run(main())


def test_posting_to_a_closed_loop_is_ignored():
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue = asyncio.Queue()
    choice = Choice(0, loop, queue)
    loop.close()
    choice.on_chunk("late")  # the client is gone: nothing raises on the engine thread
    choice.on_chunk("later")
    assert queue.empty()


def test_a_closed_loop_and_its_mailbox_are_not_kept_alive():
    loop = asyncio.new_event_loop()
    Choice(0, loop, asyncio.Queue())
    assert loop in generation._MAILBOXES
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None  # nothing of the mailbox holds the loop (its entry went with it)

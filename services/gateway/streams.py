"""Many requests on one bidirectional stream: a bounded number in flight, each answered as it finishes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


async def answer_concurrently(
    items: AsyncIterator[Item], answer: Callable[[Item], Awaitable[Answer]], *, in_flight: int
) -> AsyncIterator[Answer]:
    """Yield ``answer(item)`` for every item, at most ``in_flight`` running at once, in finishing order.

    ``answer`` turns its own failures into an answer (a per-item error), so one bad item never ends
    the stream. Reading stops taking items while ``in_flight`` are running: the client's flow
    control, not our memory, holds the rest.
    """
    results: asyncio.Queue[Answer | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max(1, in_flight))
    running: set[asyncio.Task[None]] = set()

    async def run_one(item: Item) -> None:
        try:
            await results.put(await answer(item))
        finally:
            slots.release()

    async def read_all() -> None:
        try:
            async for item in items:
                await slots.acquire()
                task = asyncio.create_task(run_one(item))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.gather(*list(running), return_exceptions=True)
        finally:
            await results.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while (result := await results.get()) is not None:
            yield result
        await reader
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader

"""Many requests on one bidirectional stream: a bounded number in flight, each answered as it finishes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from medgate.v1.inference_pb2 import ItemError
from services.metrics import REQUESTS
from services.rpc.interceptors.validation import check_request
from services.rpc.status import status_for

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


AnswerT = TypeVar("AnswerT")


async def answer_item(answer: AnswerT, item: Any, work: Callable[[Any], Awaitable[Any]], *, rpc: str) -> AnswerT:
    """One item of a batch stream: ``answer.response`` from ``work(item)``, or ``answer.error`` with its code.

    The item is validated as a unary request would be, and its failure is mapped by the same status
    table, but it becomes an answer and the stream goes on.
    """
    try:
        check_request(item)
        answer.response.CopyFrom(await work(item))  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        code, message = status_for(exc)
        answer.error.CopyFrom(  # type: ignore[attr-defined]
            ItemError(code=code.value[0], code_name=code.name, message=message)
        )
    REQUESTS.labels(rpc=f"{rpc}.item", code=answer.error.code_name or "OK").inc()  # type: ignore[attr-defined]
    return answer


async def answer_each(
    items: AsyncIterator[Any],
    answer_type: Callable[..., AnswerT],
    work: Callable[[Any], Awaitable[Any]],
    *,
    rpc: str,
    in_flight: int,
) -> AsyncIterator[AnswerT]:
    """A batch stream: ``answer_type(request_id=...)`` for every item, each filled by :func:`answer_item`."""

    async def one(item: Any) -> AnswerT:
        return await answer_item(answer_type(request_id=getattr(item, "request_id", "")), item, work, rpc=rpc)

    async for answer in answer_concurrently(items, one, in_flight=in_flight):
        yield answer

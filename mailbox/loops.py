"""State kept per event loop: group-commit writers, made on first use.

Tests run each case on an event loop of its own, and a future or task of
one loop cannot be awaited on another; the state goes with its loop.
"""

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One T for each running event loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        # A server has one loop: its T is found without the weak dict's
        # lookup, which every action and ack would otherwise pay, twice.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None

    def get(self) -> T:
        """Return the running loop's T, making it the first time."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        found = self._made.get(loop)
        if found is None:
            found = self._made[loop] = self._factory()
        self._last = (weakref.ref(loop), found)
        return found


R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Writes of one event loop, gathered into group commits.

    One batch is written at a time, and whatever queues meanwhile goes in the
    next: under load many writes share one thread hop and one transaction,
    and an idle process still writes each at once.
    """

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._write = write
        self._queued: list[tuple[T, asyncio.Future[R] | None]] = []
        self.flusher: asyncio.Task[None] | None = None

    def put(self, item: T) -> "asyncio.Future[R]":
        """Queue an item; the future gets its result, or its batch's error."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue(item, future)
        return future

    def put_nowait(self, item: T) -> None:
        """Queue an item nobody waits for: the write reports its failures itself."""
        self._queue(item, None)

    def _queue(self, item: T, future: "asyncio.Future[R] | None") -> None:
        self._queued.append((item, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future is not None and not future.done():
                    future.set_result(result)

"""State kept per event loop: group-commit writers and shared hops, made on first use.

Tests run each case on an event loop of its own, and a future or task of
one loop cannot be awaited on another; the state goes with its loop.
"""

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast

from channels.db import database_sync_to_async

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

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]], linger: float = 0) -> None:
        self._write = write
        # Seconds a writer that wrote less than this long ago waits for more
        # before it writes again: under a steady flow, writes that start at
        # once hold an item or two each; after a quiet spell, it writes at once.
        self._linger = linger
        self._wrote_at = -linger
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
            # A context of its own: the writes belong to no caller. In a copy of
            # a site request's, asgiref would send them to that request's own
            # thread, which goes away with the request.
            self.flusher = asyncio.get_running_loop().create_task(
                self._flush(), context=contextvars.Context()
            )

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._wrote_at < self._linger:
            await asyncio.sleep(self._linger)
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
        self._wrote_at = loop.time()


P = ParamSpec("P")


class _Failed:
    """What a call raised, carried back to its caller."""

    def __init__(self, error: Exception) -> None:
        self.error = error


_Call = tuple[contextvars.Context, Callable[[], Any]]


@database_sync_to_async
def _run_calls(batch: list[_Call]) -> list[Any]:
    """Run calls on the database thread, each in its own context; return each outcome."""
    outcomes: list[Any] = []
    for context, fn in batch:
        try:
            outcomes.append(context.run(fn))
        except Exception as exc:
            outcomes.append(_Failed(exc))
    return outcomes


_hops = PerLoop(lambda: GroupCommit(_run_calls))
_twins: dict[Callable[..., Any], Callable[..., Awaitable[Any]]] = {}


def shared_hop(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Make an async twin of a sync database function; calls made meanwhile share a hop.

    database_sync_to_async hops to the database thread for every call, and
    the hop (a handoff each way between the loop and the thread) costs more
    CPU than the small transactions most calls run. Calls queued while a
    batch runs go together in the next hop, in order, each in its caller's
    context (its span, its log fields) and with its own result or error.
    They ran one after another on the one database thread before, too; now
    a call's caller also waits for the calls after it in its batch, so
    this is for the mailbox's short calls, not for code of unknown length.
    A function has one twin, so calling shared_hop(fn)(...) in place is cheap.
    """
    known = _twins.get(fn)
    if known is not None:
        return cast(Callable[P, Awaitable[R]], known)

    @functools.wraps(fn)
    async def twin(*args: P.args, **kwargs: P.kwargs) -> R:
        call = (contextvars.copy_context(), functools.partial(fn, *args, **kwargs))
        outcome = await _hops.get().put(call)
        if isinstance(outcome, _Failed):
            raise outcome.error
        result: R = outcome
        return result

    _twins[fn] = twin
    return twin

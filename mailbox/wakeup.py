"""Wake the connections waiting on a session when its mailbox gets a message.

A waiting connection (an open WebSocket or a parked long-poll) subscribes
here. A deliver() in this process wakes it directly. Deliveries in other
processes reach it in one of two ways:

- with a shared channel layer (Redis), each process listens on one channel
  of its own, added to the group of every session it has waiters for; a
  sweep every TRANSPORT_WAKEUP_SWEEP seconds rejoins those groups (a Redis
  restart empties them) and wakes whoever missed a wake-up meanwhile;
- on the in-memory layer, a watcher reads the sessions' `last_seq` from the
  database every TRANSPORT_CROSS_PROCESS_POLL seconds, in one query.
"""

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings

from mailbox.loops import PerLoop

logger = logging.getLogger(__name__)


def group_name(session_id: str) -> str:
    """Return the channel-layer group of a session (letters allowed by Channels)."""
    return "mbx." + session_id


@dataclass(frozen=True, slots=True)
class Arrival:
    """A message a deliver() of this process has just committed, as it stored it."""

    seq: int
    message_type: str
    payload_json: str
    sent_at: datetime


# Arrivals a waiter keeps between two pushes; past this its connection reads
# the mailbox instead, as it does for a wake-up from another process.
MAX_ARRIVALS = 100


# After an inbox's wake-up finds calls, the loop looks again this long
# later, and calls posted meanwhile wait for that look instead of waking
# the loop themselves. Each wake-up from another thread costs both threads
# system calls and a handoff of the interpreter lock: at a thousand
# deliveries a second from a site's thread, looking every 2 ms instead took
# a fifth off the server's CPU per message, and the rate was met where it
# fell short. A delivery after a quiet spell still wakes the loop at once;
# one in a steady flow waits this long at most.
LINGER = 0.002


class _Inbox:
    """Calls handed to one event loop from other threads, taken together.

    call_soon_threadsafe writes to the loop's self-pipe every time, for
    each message a deliver() of another thread commits. Calls posted while
    a wake-up is on its way, or within LINGER of the last one that found
    any, go with the next one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: PerLoop keeps the inboxes by loop in a weak dict.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[Any], None], Any]] = []
        # True while a wake-up is asked for or a later look is scheduled.
        self._coming = False

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Have the loop call fn(arg) soon, from any thread."""
        loop = self._loop()
        # _get_running_loop: None off the loop, where most posts come from,
        # without the exception get_running_loop() raises there.
        if loop is not None and asyncio._get_running_loop() is loop:
            # From the loop itself (the channel layer's listener, the
            # database watch): no other thread to hand over to, no wait.
            loop.call_soon(fn, arg)
            return
        with self._lock:
            self._calls.append((fn, arg))
            if self._coming:
                return
            self._coming = True
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._take)
                return
        except RuntimeError:
            pass
        # The loop is closed, and its waiters with it: nothing will take
        # these calls, and the waiters of other loops still get theirs.
        with self._lock:
            self._calls.clear()
            self._coming = False

    def _take(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            # Nothing came since the last look: the flow has stopped, and the
            # next post wakes the loop itself.
            self._coming = bool(calls)
        if calls:
            asyncio.get_running_loop().call_later(LINGER, self._take)
        for fn, arg in calls:
            try:
                fn(arg)
            except Exception:
                # One waiter's failure must not cost the others their wake-up.
                logger.exception("wake-up failed")


_inboxes = PerLoop(lambda: _Inbox(asyncio.get_running_loop()))


class Waiter:
    """One connection's interest in a session's new messages.

    A flag, and a future only while someone waits on it: an asyncio.Event
    would keep a deque for every idle connection. A waiter given a method
    by `call_on_wake` calls it on each wake-up instead, so that its
    connection needs no task of its own while nothing is due. The method is
    held weakly: the hub is process-wide, and a connection that died without
    removing its waiter must still be collected.
    """

    __slots__ = (
        "session_id",
        "known_seq",
        "loop",
        "inbox",
        "woken",
        "on_wake",
        "arrivals",
        "_future",
    )

    def __init__(self, session_id: str, known_seq: int) -> None:
        self.session_id = session_id
        self.known_seq = known_seq
        self.loop = asyncio.get_running_loop()
        self.inbox = _inboxes.get()
        self.woken = False
        self.on_wake: weakref.WeakMethod[Callable[[], None]] | None = None
        # None until collect_arrivals(): a long-poll reads what it returns.
        self.arrivals: list[Arrival] | None = None
        self._future: asyncio.Future[None] | None = None

    def wake(self, arrival: Arrival | None = None) -> None:
        """Wake from any thread, with the message that caused it when it is known."""
        self.inbox.post(self._arrive, arrival)

    def _arrive(self, arrival: Arrival | None) -> None:
        arrivals = self.arrivals
        if arrival is not None and arrivals is not None and len(arrivals) < MAX_ARRIVALS:
            arrivals.append(arrival)
        self.set()

    def collect_arrivals(self) -> None:
        """Keep the messages that wake-ups of this process carry, for take_arrivals()."""
        self.arrivals = []

    def take_arrivals(self) -> list[Arrival]:
        """Return the messages that arrived since the last call, oldest first."""
        taken = self.arrivals or []
        if taken:
            self.arrivals = []
        return taken

    def set(self) -> None:
        """Wake from the waiter's own event loop."""
        self.woken = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        if self.on_wake is not None and (method := self.on_wake()) is not None:
            method()

    def call_on_wake(self, method: Callable[[], None] | None) -> None:
        """Call a bound method on every wake-up from now on (None stops it)."""
        self.on_wake = weakref.WeakMethod(method) if method is not None else None

    async def wait(self, timeout: float) -> bool:
        """Wait until woken or `timeout` passes; tell whether it was woken."""
        if self.woken:
            return True
        self._future = self.loop.create_future()
        try:
            await asyncio.wait_for(self._future, timeout)
        except TimeoutError:
            return False
        finally:
            self._future = None
        return True

    def clear(self) -> None:
        self.woken = False


class Hub:
    """The waiters of this process, by session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A session's one waiter, or a set when it has several: most have one,
        # and a set per idle connection would cost more than the waiter.
        self._waiters: dict[str, Waiter | set[Waiter]] = {}
        self._tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self._channel: str | None = None

    def notify(self, session_id: str, seq: int, arrival: Arrival | None = None) -> None:
        """Wake this process's waiters of a session, and the other processes'."""
        self.wake_local(session_id, seq, arrival)
        if self.shared_layer():
            layer = get_channel_layer()
            assert layer is not None
            message = {"type": "mailbox.wake", "session_id": session_id, "seq": seq}
            try:
                async_to_sync(layer.group_send)(group_name(session_id), message)
            except Exception:
                # The message is stored; waiters on other servers still find it
                # at their next fetch. Losing the wake-up must not fail deliver().
                logger.warning("wake-up not published", extra={"session_id": session_id})

    def wake_local(self, session_id: str, seq: int, arrival: Arrival | None = None) -> None:
        with self._lock:
            waiters = _as_list(self._waiters.get(session_id))
        for waiter in waiters:
            if seq > waiter.known_seq:
                waiter.wake(arrival)

    @staticmethod
    def shared_layer() -> bool:
        layer = get_channel_layer()
        return layer is not None and not isinstance(layer, InMemoryChannelLayer)

    @contextlib.asynccontextmanager
    async def subscribe(self, session_id: str, known_seq: int) -> AsyncIterator[Waiter]:
        """Register a waiter for a session for the duration of the block."""
        waiter = Waiter(session_id, known_seq)
        await self.add(waiter)
        try:
            yield waiter
        finally:
            await self.remove(waiter)

    async def add(self, waiter: Waiter) -> None:
        """Wake `waiter` when its session gets a message, until remove()."""
        session_id = waiter.session_id
        with self._lock:
            peers = self._waiters.get(session_id)
            first = peers is None
            if peers is None:
                self._waiters[session_id] = waiter
            elif isinstance(peers, Waiter):
                self._waiters[session_id] = {peers, waiter}
            else:
                peers.add(waiter)
        self._ensure_listener(waiter.loop)
        if first and self.shared_layer():
            try:
                await self._group_add(session_id)
            except Exception:
                # Redis is away: the waiter still times out and fetches, and
                # the listener's sweep joins the group once Redis is back.
                logger.warning("wake-up group not joined", extra={"session_id": session_id})

    async def remove(self, waiter: Waiter) -> None:
        """Stop waking `waiter`."""
        session_id = waiter.session_id
        with self._lock:
            peers = self._waiters.get(session_id)
            if isinstance(peers, set):
                peers.discard(waiter)
                last = not peers
            else:
                last = peers is None or peers is waiter
            if last:
                self._waiters.pop(session_id, None)
            idle = not self._waiters
        if last and self.shared_layer():
            await self._group_discard(session_id)
        if idle:
            self._stop_listener(waiter.loop)

    async def _group_add(self, session_id: str) -> None:
        layer = get_channel_layer()
        assert layer is not None
        await layer.group_add(group_name(session_id), await self._own_channel())

    async def _own_channel(self) -> str:
        """Return this process's wake-up channel, naming it on first use.

        The default prefix matters: channels-redis reads every process-local
        channel of a layer through one shared Redis key, named by the prefix.
        """
        if self._channel is None:
            layer = get_channel_layer()
            assert layer is not None
            name = await layer.new_channel()
            # Two coroutines may race here across the await; keep the first.
            if self._channel is None:
                self._channel = name
        return self._channel

    async def _group_discard(self, session_id: str) -> None:
        layer = get_channel_layer()
        if layer is not None and self._channel is not None:
            with contextlib.suppress(Exception):
                await layer.group_discard(group_name(session_id), self._channel)

    def _ensure_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._tasks.get(loop)
        if task is None or task.done():
            self._tasks[loop] = loop.create_task(self._listen(), name="mailbox-wakeup")

    def _stop_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop listening while nobody waits; the next subscriber starts it again."""
        task = self._tasks.pop(loop, None)
        if task is not None:
            task.cancel()

    async def _listen(self) -> None:
        """Carry wake-ups from other processes to this process's waiters."""
        failed = False
        while True:
            try:
                if self.shared_layer():
                    await self._listen_layer(sweep_now=failed)
                else:
                    await self._watch_database()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A database or Redis outage: waiters still time out and
                # fetch; retry the listener after a pause.
                logger.warning("wake-up listener failed; retrying", exc_info=True)
                failed = True
                await asyncio.sleep(1)

    async def _listen_layer(self, sweep_now: bool) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._receive_layer())
            tasks.create_task(self._sweep(sweep_now))

    async def _receive_layer(self) -> None:
        layer = get_channel_layer()
        assert layer is not None
        channel = await self._own_channel()
        while True:
            message: dict[str, Any] = await layer.receive(channel)
            if message.get("type") == "mailbox.wake":
                self.wake_local(str(message["session_id"]), int(message["seq"]))

    async def _sweep(self, now: bool) -> None:
        """Rejoin this process's groups and catch up on missed wake-ups, now and then.

        Groups live in Redis: a Redis restart loses them, and channels-redis
        expires them after a day, so a long-lived connection would stop
        hearing other processes' deliveries. A wake-up published while a
        group was missing is found by comparing last_seq, in one query.
        """
        if not now:
            await asyncio.sleep(settings.TRANSPORT_WAKEUP_SWEEP)
        while True:
            with self._lock:
                sessions = list(self._waiters)
            for session_id in sessions:
                await self._group_add(session_id)
            await self._catch_up(sessions)
            await asyncio.sleep(settings.TRANSPORT_WAKEUP_SWEEP)

    async def _watch_database(self) -> None:
        while True:
            await asyncio.sleep(settings.TRANSPORT_CROSS_PROCESS_POLL)
            with self._lock:
                sessions = list(self._waiters)
            await self._catch_up(sessions)

    async def _catch_up(self, sessions: list[str]) -> None:
        """Wake the waiters of sessions whose last_seq moved past what they know."""
        from mailbox import store

        if not sessions:
            return
        seqs = await database_sync_to_async(store.last_seqs)(sessions)
        for session_id, seq in seqs.items():
            self.wake_local(session_id, seq)


def _as_list(peers: Waiter | set[Waiter] | None) -> list[Waiter]:
    if peers is None:
        return []
    return [peers] if isinstance(peers, Waiter) else list(peers)


hub = Hub()


def notify(session_id: str, seq: int, arrival: Arrival | None = None) -> None:
    """Wake every connection waiting on `session_id` (called after commit).

    `arrival`, the message of a deliver() of this process, lets a WebSocket
    of this process push it without reading it back from the database.
    """
    hub.notify(session_id, seq, arrival)

"""The WebSocket transport: one consumer per client connection.

Lifecycle: CONNECTED (waiting for `hello`, closed with 4408 at the hello
timeout) → WELCOMED (actions, acks, pings; mailbox messages pushed within
the flow-control window) → CLOSED.
"""

import asyncio
import bisect
import contextvars
import enum
import json
import logging
import math
from collections.abc import Coroutine
from typing import Any

import structlog
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import Error as DatabaseError

from mailbox import store
from mailbox.errors import MailboxNotFound
from mailbox.loops import shared_hop
from mailbox.wakeup import Arrival, Waiter, hub
from transport import acks, clients, signals, spans, tokens
from transport.admission import open_connections
from transport.errors import BadRequest, InvalidToken, RateLimited, TransportError
from transport.frames import (
    Ack,
    Action,
    Hello,
    Ping,
    decode_frame,
    encode,
    error_frame,
    message_frame,
)
from transport.leases import leases
from transport.ratelimit import get_limiter
from transport.router import Pending, get_router
from transport.worker import error_reply

logger = logging.getLogger(__name__)

TRANSPORT = "ws"

CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_BAD_HELLO = 4400
CLOSE_BAD_TOKEN = 4401
CLOSE_HELLO_TIMEOUT = 4408
CLOSE_RATE_LIMITED = 4429


class State(enum.Enum):
    CONNECTED = "connected"
    WELCOMED = "welcomed"
    CLOSED = "closed"


class TransportConsumer(AsyncWebsocketConsumer):
    """Serve the protocol's WebSocket at /ws/transport/."""

    # No channel of its own: wake-ups come through mailbox.wakeup's one
    # channel per process, and a consumer receiving on Redis would die with
    # its connection whenever Redis restarts.
    channel_layer_alias = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve one connection: take its events one by one, in this task.

        Channels' own loop waits on a fresh task for every event, made to
        race the receive against a channel layer's; with no channel layer
        there is nothing to race, and that task and its wait cost each frame
        more than decoding it.
        """
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Route one ASGI event to its handler.

        Channels' own dispatch first runs close_old_connections in a thread
        for every event, one thread hop per frame. Every database call here
        goes through database_sync_to_async (mailbox.loops.shared_hop uses
        it), which does that check in the thread it already uses, so the
        extra hop is skipped.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']!r}")
        await handler(message)

    async def connect(self) -> None:
        """Called on the handshake: accept it and start the hello clock."""
        self.span, self.span_token = spans.open_connection(self.scope)
        structlog.contextvars.bind_contextvars(transport=TRANSPORT)
        self.state = State.CONNECTED
        self.session_id: str | None = None
        self.bad_frames = 0
        self.client = clients.of_scope(self.scope)
        self.network = clients.network_of(self.client)
        # Seqs pushed and not yet acknowledged, ascending.
        self.inflight: list[int] = []
        self.pushed = 0
        self.acked = 0
        self.acked_stored = 0
        self.ack_writer: asyncio.Task[None] | None = None
        self.leased = False
        self.waiter: Waiter | None = None
        self.pusher: asyncio.Task[None] | None = None
        self.push_context: contextvars.Context | None = None
        # Made on first use: most connections sit idle, with neither.
        self.tasks: set[asyncio.Task[Any]] | None = None
        self.actions: set[asyncio.Task[Any]] | None = None
        # A timer, not a sleeping task: thousands of connections may be
        # waiting for their hello at once.
        self.hello_timer: asyncio.TimerHandle | None = None

        await self.accept()
        try:
            await get_limiter().hit(TRANSPORT, self.client)
            self._admit()
        except RateLimited as exc:
            await self._close(CLOSE_RATE_LIMITED, str(exc.retry_after))
            return
        self.hello_timer = asyncio.get_running_loop().call_later(
            settings.TRANSPORT_HELLO_TIMEOUT, self._hello_expired
        )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called for each frame from the client; each gets a span of its own."""
        with spans.frame(getattr(self, "span", None), text_data, self.session_id):
            await self._receive(text_data, bytes_data)

    async def _receive(self, text_data: str | None, bytes_data: bytes | None) -> None:
        if self.state is State.CLOSED:
            return
        data: str | bytes = text_data if text_data is not None else (bytes_data or b"")
        if _size(data) > settings.TRANSPORT_MAX_FRAME_BYTES:
            await self._close(CLOSE_TOO_BIG, "frame too large")
            return
        try:
            await get_limiter().hit(TRANSPORT, self.client)
        except RateLimited as exc:
            await self._close(CLOSE_RATE_LIMITED, str(exc.retry_after))
            return

        try:
            if bytes_data is not None:
                raise BadRequest("binary frames are not part of the protocol")
            frame = decode_frame(data)
        except BadRequest as exc:
            await self._bad_frame(exc.code, exc.message)
            return

        try:
            if self.state is State.CONNECTED:
                await self._on_first(frame)
            else:
                await self._on_frame(frame)
        except DatabaseError:
            logger.exception("database error on a frame", extra={"session_id": self.session_id})
            if self.state is State.CONNECTED:
                await self._close(CLOSE_SERVER_ERROR, "database unavailable")
            else:
                await self.send_frame(error_frame("unavailable", "database unavailable"))

    async def disconnect(self, code: int) -> None:
        """Called when the connection closes, from either side."""
        try:
            await self._disconnect(code)
        finally:
            if hasattr(self, "span"):
                spans.close_connection(self.span, self.span_token, code)

    async def _disconnect(self, code: int) -> None:
        self.state = State.CLOSED
        open_connections.release(getattr(self, "network", clients.UNKNOWN), self)
        # Before anything that awaits: a close cut short must not leave the
        # session renewed on `ws` for as long as this process runs.
        if self.leased:
            self.leased = False
            leases.release(self.session_id or "")
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        for task in self.tasks or ():
            task.cancel()
        if self.waiter is not None:
            self.waiter.call_on_wake(None)
            await hub.remove(self.waiter)
        if self.session_id is None:
            return
        if self.ack_writer is not None:
            # Acks first: an acknowledged ephemeral message is no drop.
            await self.ack_writer
        now = await shared_hop(store.ws_closed)(self.session_id)
        await shared_hop(store.drop_ephemeral)(self.session_id)
        signals.session_closed.send_robust(
            sender=TransportConsumer, session_id=self.session_id, transport=TRANSPORT
        )
        if now != TRANSPORT:
            signals.session_opened.send_robust(
                sender=TransportConsumer, session_id=self.session_id, transport=now
            )
        logger.info(
            "websocket closed",
            extra={"session_id": self.session_id, "transport": TRANSPORT, "code": code},
        )

    # --- frames -------------------------------------------------------------

    async def _on_first(self, frame: Any) -> None:
        """Handle the first frame, which must be `hello`."""
        if not isinstance(frame, Hello):
            await self._close(CLOSE_BAD_HELLO, "the first frame must be hello")
            return
        if frame.token is None:
            box = await shared_hop(store.create_session)()
            await self._welcome(box.session_id, after=0, resumed=False)
            return
        try:
            session_id = tokens.session_of(frame.token)
            box = await shared_hop(store.get_live)(session_id)
        except (InvalidToken, MailboxNotFound):
            await self._close(CLOSE_BAD_TOKEN, "token invalid or expired")
            return
        after = frame.after if frame.after is not None else box.acked_seq
        await self._welcome(session_id, after=after, resumed=True)

    async def _on_frame(self, frame: Any) -> None:
        """Handle a valid frame after `welcome`."""
        if isinstance(frame, Action):
            self._start_action(frame)
        elif isinstance(frame, Ack):
            await self._ack(frame.seq)
        elif isinstance(frame, Ping):
            await self.send_frame({"type": "pong"})
        else:
            await self._bad_frame("unexpected_hello", "this connection is already welcomed")

    async def _welcome(self, session_id: str, after: int, resumed: bool) -> None:
        """Answer `hello`, then push what is queued after the client's cursor."""
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.session_id = session_id
        structlog.contextvars.bind_contextvars(session_id=session_id)
        self.waiter = Waiter(session_id, known_seq=after)
        await hub.add(self.waiter)
        before = await shared_hop(store.ws_opened)(session_id)
        leases.hold(session_id)
        self.leased = True
        batch = await shared_hop(store.fetch)(
            session_id, after, settings.TRANSPORT_WS_WINDOW, TRANSPORT
        )
        self.state = State.WELCOMED

        welcome: dict[str, Any] = {
            "type": "welcome",
            "session_id": session_id,
            "token": tokens.issue(session_id),
            "resumed": resumed,
            "next_seq": batch.last_seq + 1,
        }
        if resumed:
            welcome["gap"] = batch.gap
        await self.send_frame(welcome)
        for message in batch.messages:
            await self._push(message)
        self.pushed = batch.next_after
        self.waiter.known_seq = batch.last_seq
        if len(batch.messages) == settings.TRANSPORT_WS_WINDOW:
            self.waiter.woken = True

        if resumed and before != TRANSPORT:
            signals.session_closed.send_robust(
                sender=TransportConsumer, session_id=session_id, transport=before
            )
        signals.session_opened.send_robust(
            sender=TransportConsumer, session_id=session_id, transport=TRANSPORT
        )
        logger.info(
            "websocket welcomed",
            extra={"session_id": session_id, "transport": TRANSPORT, "resumed": resumed},
        )
        # Pushes run under the connection's span and log fields, whatever
        # woke them.
        with spans.in_connection(self.span):
            self.push_context = contextvars.copy_context()
        self.waiter.call_on_wake(self._wake_pusher)
        self.waiter.collect_arrivals()
        if self.waiter.woken:
            self._wake_pusher()

    async def _ack(self, seq: int) -> None:
        assert self.session_id is not None and self.waiter is not None
        del self.inflight[: bisect.bisect_right(self.inflight, seq)]
        # The store clamps an ack to the last allocated seq; so must the push
        # cursor, or messages delivered later would never be pushed. The ack
        # itself is clamped now too: it is written a little later
        # (acks.LINGER), and past messages delivered meanwhile, it would
        # acknowledge what the client never had.
        seq = min(seq, self.waiter.known_seq)
        self.pushed = max(self.pushed, seq)
        # Room in the window matters only to messages a full window held
        # back, and those left the wake-up flag set; otherwise everything
        # known is pushed, and a read per ack would find nothing.
        if self.waiter.woken:
            self._wake_pusher()

        self.acked = max(self.acked, seq)
        if self.ack_writer is None or self.ack_writer.done():
            self.ack_writer = self._spawn(self._write_acks(), cancel_on_close=False)

    async def _write_acks(self) -> None:
        """Store acknowledgements, folding those that arrive during a write into one.

        The writer batches them with other connections' acks. An ack still
        unwritten when a server dies only means the message comes again,
        which at-least-once delivery allows.
        """
        assert self.session_id is not None
        while self.acked > self.acked_stored:
            target = self.acked
            try:
                await acks.store(self.session_id, target)
            except DatabaseError:
                logger.warning("ack not stored", extra={"session_id": self.session_id})
                return
            self.acked_stored = target

    def _start_action(self, frame: Action) -> None:
        if len(self.actions or ()) >= settings.TRANSPORT_WS_MAX_RUNNING_ACTIONS:
            reply = error_reply(frame.id, "too_many_actions", "wait for earlier replies first")
            self._spawn(self.send_frame(reply))
            return
        task = self._spawn(self._run_action(frame), cancel_on_close=False)
        if self.actions is None:
            self.actions = set()
        self.actions.add(task)
        task.add_done_callback(self.actions.discard)

    async def _run_action(self, frame: Action) -> None:
        assert self.session_id is not None

        def timed_out() -> None:
            if self.state is not State.CLOSED:
                reply = error_reply(
                    frame.id,
                    "timeout",
                    "no reply yet; it will be delivered as a message of type reply",
                )
                self._spawn(self.send_frame(reply))

        try:
            result = await get_router().handle_action(
                self.session_id, frame, TRANSPORT, on_timeout=timed_out
            )
        except TransportError as exc:
            result = error_reply(frame.id, exc.code, exc.message)
        except Exception:
            logger.exception("action failed", extra={"session_id": self.session_id})
            result = error_reply(frame.id, "internal_error", "the action could not be run")
        # Pending: the timeout was answered, and the reply went to the mailbox.
        if not isinstance(result, Pending) and self.state is not State.CLOSED:
            await self.send_frame(result)

    async def _bad_frame(self, code: str, message: str) -> None:
        """Answer a malformed frame, closing once too many have come."""
        signals.bad_input.send_robust(
            sender=TransportConsumer, session_id=self.session_id, transport=TRANSPORT, code=code
        )
        if self.state is State.CONNECTED:
            await self._close(CLOSE_BAD_HELLO, "the first frame must be a valid hello")
            return
        self.bad_frames += 1
        if self.bad_frames > settings.TRANSPORT_MAX_BAD_FRAMES:
            await self._close(CLOSE_BAD_HELLO, "too many malformed frames")
            return
        await self.send_frame(error_frame(code, message))

    # --- background tasks ---------------------------------------------------

    def _wake_pusher(self) -> None:
        """Start pushing what is due, unless a push is under way (it sees the flag)."""
        if self.state is State.CLOSED or (self.pusher is not None and not self.pusher.done()):
            return
        if len(self.inflight) >= settings.TRANSPORT_WS_WINDOW:
            return  # the flag stays set; the next ack wakes this again
        loop = asyncio.get_running_loop()
        self.pusher = self._keep(loop.create_task(self._push_due(), context=self.push_context))

    async def _push_due(self) -> None:
        """Push queued messages while woken and the window has room, then end.

        Only one push runs at a time; a wake-up during one sets the flag it
        reads again before it ends, and the event loop runs nothing between
        that check and the end. A full window keeps the flag set for the
        next ack.
        """
        assert self.session_id is not None and self.waiter is not None
        window = settings.TRANSPORT_WS_WINDOW
        while self.waiter.woken and len(self.inflight) < window:
            self.waiter.clear()
            room = window - len(self.inflight)
            arrived = self.waiter.take_arrivals()
            if len(arrived) <= room and _follows(arrived, self.pushed):
                await self._push_arrived(arrived)
                continue
            try:
                batch = await shared_hop(store.read)(self.session_id, self.pushed, room, TRANSPORT)
            except DatabaseError:
                # The messages stay queued; the next wake-up or ack reads again.
                logger.warning("push not read", extra={"session_id": self.session_id})
                self.waiter.woken = True
                return
            await self._push_all(batch.messages, batch.last_seq, batch.next_after)
            if len(batch.messages) == room:
                self.waiter.woken = True

    async def _push_arrived(self, arrived: list[Arrival]) -> None:
        """Push messages that deliveries of this process handed over: no read needed.

        They are committed, and follow the last pushed seq without a hole,
        so a read would return exactly them.
        """
        assert self.session_id is not None and self.waiter is not None
        messages = [
            store.StoredMessage(a.seq, a.message_type, json.loads(a.payload_json), a.sent_at)
            for a in arrived
        ]
        store.count_delivered(self.session_id, TRANSPORT, messages)
        await self._push_all(messages, arrived[-1].seq, arrived[-1].seq)

    async def _push_all(
        self, messages: list[store.StoredMessage], last_seq: int, next_after: int
    ) -> None:
        """Push messages, then move the cursor and what is known past them."""
        assert self.waiter is not None
        self.waiter.known_seq = max(self.waiter.known_seq, last_seq)
        for message in messages:
            await self._push(message)
        self.pushed = max(self.pushed, next_after)

    async def _push(self, message: store.StoredMessage) -> None:
        self.inflight.append(message.seq)
        frame = message_frame(message.seq, message.message_type, message.payload, message.sent_at)
        await self._send_bytes(frame)

    def _admit(self) -> None:
        """Take a slot of the client network's connections, or raise RateLimited."""
        if open_connections.admit(self.network, self):
            return
        # Slots free as connections close; those that never said hello are
        # gone within the hello timeout.
        retry_after = max(1, math.ceil(settings.TRANSPORT_HELLO_TIMEOUT))
        signals.rate_limited.send_robust(
            sender=TransportConsumer,
            transport=TRANSPORT,
            network=self.network,
            retry_after=retry_after,
        )
        raise RateLimited(retry_after)

    def _hello_expired(self) -> None:
        if self.state is State.CONNECTED:
            self._spawn(self._close(CLOSE_HELLO_TIMEOUT, "no hello in time"))

    # --- sending ------------------------------------------------------------

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self._send_bytes(encode(frame))

    async def _send_bytes(self, data: bytes) -> None:
        await self.send(text_data=data.decode())
        signals.payload_sent.send_robust(
            sender=TransportConsumer, transport=TRANSPORT, size=len(data)
        )

    async def _close(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        await self.close(code=code, reason=reason)

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], cancel_on_close: bool = True
    ) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        return self._keep(task) if cancel_on_close else task

    def _keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Hold a task until it ends, and cancel it if the connection closes first."""
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def _follows(arrived: list[Arrival], pushed: int) -> bool:
    """Tell whether `arrived` are the seqs right after `pushed`, with no hole."""
    return bool(arrived) and all(a.seq == pushed + 1 + i for i, a in enumerate(arrived))


def _size(data: str | bytes) -> int:
    """Return a frame's size in bytes, encoding only when it could matter."""
    if isinstance(data, bytes):
        return len(data)
    if len(data) * 4 <= settings.TRANSPORT_MAX_FRAME_BYTES:
        return len(data)
    return len(data.encode())

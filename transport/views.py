"""The REST transport: sessions, actions, long-poll, mailbox pull and ack.

Every view is async; a parked long-poll holds no thread, only a waiter.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import structlog
from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.db import Error as DatabaseError
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from mailbox import store
from mailbox.errors import MailboxNotFound
from mailbox.loops import shared_hop
from mailbox.store import Batch
from mailbox.wakeup import hub
from transport import clients, signals, tokens
from transport.errors import NoSuchSession, TooLarge, TransportError, Unavailable
from transport.frames import (
    DEFAULT_BATCH,
    MailboxQuery,
    PollQuery,
    decode_ack,
    decode_action,
    decode_query,
    encode,
)
from transport.parking import parked_polls
from transport.ratelimit import get_limiter
from transport.router import Pending, get_router

logger = logging.getLogger(__name__)

TRANSPORT = "rest"

View = Callable[..., Awaitable[HttpResponse]]


def respond(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    """Return a JSON response, counting its bytes."""
    data = encode(body) if body is not None else b""
    signals.payload_sent.send_robust(sender=respond, transport=TRANSPORT, size=len(data))
    return HttpResponse(
        data,
        status=status,
        content_type="application/json" if body is not None else None,
        headers=headers,
    )


def error(exc: TransportError) -> HttpResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return respond({"error": {"code": exc.code, "message": exc.message}}, exc.status, headers)


def endpoint(view: View) -> Callable[..., Any]:
    """Wrap a view: rate limit, body size, and errors as the protocol's bodies."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        structlog.contextvars.bind_contextvars(transport=TRANSPORT)
        try:
            await get_limiter().hit(TRANSPORT, clients.of_request(request))
            _check_size(request)
            return await view(request, *args, **kwargs)
        except TransportError as exc:
            if exc.status >= 400 and exc.status != 429:
                signals.bad_input.send_robust(
                    sender=endpoint, session_id=None, transport=TRANSPORT, code=exc.code
                )
            return error(exc)
        except MailboxNotFound as exc:
            return error(NoSuchSession(str(exc)))
        except DatabaseError:
            logger.exception("database unavailable", extra={"transport": TRANSPORT})
            return error(Unavailable("database unavailable"))

    return csrf_exempt(wrapper)


def _check_size(request: HttpRequest) -> None:
    limit = settings.TRANSPORT_MAX_FRAME_BYTES
    declared = request.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(int(declared), limit)
    if request.method == "POST" and len(request.body) > limit:
        raise TooLarge(len(request.body), limit)


def _session(request: HttpRequest) -> str:
    """Return the session a request's bearer token names.

    Whether it is live is for the request's one database call to find out
    (each raises MailboxNotFound, a 404): a call of its own to check first
    would cost a thread hop.
    """
    session_id = tokens.from_header(request.headers.get("Authorization"))
    structlog.contextvars.bind_contextvars(session_id=session_id)
    return session_id


def _poll_timeout(query: PollQuery) -> float:
    """Return the poll timeout: default 25 s, capped by TRANSPORT_POLL_TIMEOUT_MAX."""
    if query.timeout is None:
        return min(settings.TRANSPORT_POLL_TIMEOUT_DEFAULT, settings.TRANSPORT_POLL_TIMEOUT_MAX)
    return min(query.timeout, settings.TRANSPORT_POLL_TIMEOUT_MAX)


def _batch_body(batch: Batch) -> dict[str, Any]:
    return {
        "messages": [
            {
                "seq": m.seq,
                "message_type": m.message_type,
                "payload": m.payload,
                "sent_at": _stamp(m.sent_at),
            }
            for m in batch.messages
        ],
        "next_after": batch.next_after,
        "gap": batch.gap,
    }


def _stamp(when: Any) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@require_POST
@endpoint
async def create_session(request: HttpRequest) -> HttpResponse:
    """Called by a client without a session: create one and return its token."""
    box = await shared_hop(store.create_session)()
    logger.info("session created", extra={"session_id": box.session_id, "transport": TRANSPORT})
    body = {"session_id": box.session_id, "token": tokens.issue(box.session_id), "next_seq": 1}
    return respond(body, status=201)


@require_POST
@endpoint
async def actions(request: HttpRequest) -> HttpResponse:
    """Called with one action: answer its reply, or 202 when the worker is late."""
    session_id = _session(request)
    body = decode_action(request.body)
    result = await get_router().handle_action(session_id, body, TRANSPORT, check_live=True)
    if isinstance(result, Pending):
        return respond({"id": result.id, "status": "pending"}, status=202)
    return respond(result)


@require_GET
@endpoint
async def poll(request: HttpRequest) -> HttpResponse:
    """Called by a long-polling client: answer at once, or when a message comes."""
    started = time.perf_counter()
    session_id = _session(request)
    query = decode_query(PollQuery, request.GET)
    after, timeout = query.after, _poll_timeout(query)
    outcome: str | None = "error"
    try:
        batch = await _park(session_id, after, timeout)
        outcome = "messages" if batch.messages else "timeout"
        return respond(_batch_body(batch))
    except asyncio.CancelledError:
        # Django cancels the view when its client disconnects: a closed tab
        # is no failed poll, and must not count against the success rate.
        outcome = None
        raise
    finally:
        if outcome is not None:
            signals.poll_completed.send_robust(
                sender=poll,
                session_id=session_id,
                outcome=outcome,
                duration_ms=(time.perf_counter() - started) * 1000,
            )


# A woken poll's fetch reads, and rarely writes: rest_fetch acknowledged
# the cursor and touched the session. Many polls wake at once when a site
# notifies many sessions, so these fetches run on the event loop's pool of
# threads, each with a database connection of its own, instead of queueing
# on the one database thread that takes the writes.
_fetch_in_parallel = DatabaseSyncToAsync(store.fetch, thread_sensitive=False)


async def _park(session_id: str, after: int, timeout: float) -> Batch:
    """Fetch past `after`; if nothing is queued, wait for a wake-up or the timeout."""
    until = timezone.now() + timedelta(seconds=timeout + settings.TRANSPORT_REST_IDLE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Subscribed before the first fetch, so a delivery between the fetch and
    # the wait still wakes this poll.
    async with hub.subscribe(session_id, known_seq=after) as waiter:
        before, batch = await shared_hop(store.rest_fetch)(session_id, until, after, DEFAULT_BATCH)
        if before != TRANSPORT:
            signals.session_closed.send_robust(
                sender=poll, session_id=session_id, transport=before
            )
            signals.session_opened.send_robust(
                sender=poll, session_id=session_id, transport=TRANSPORT
            )
        with parked_polls.park(session_id, waiter) as parked:
            while True:
                remaining = deadline - loop.time()
                if batch.messages or batch.gap or remaining <= 0 or parked.superseded:
                    return batch
                waiter.known_seq = batch.last_seq
                await waiter.wait(remaining)
                waiter.clear()
                batch = await _fetch_in_parallel(session_id, after, DEFAULT_BATCH, TRANSPORT)


@require_GET
@endpoint
async def mailbox(request: HttpRequest) -> HttpResponse:
    """Called by a pull-only client: answer what is queued, never wait."""
    structlog.contextvars.bind_contextvars(transport="mailbox")
    session_id = _session(request)
    query = decode_query(MailboxQuery, request.GET)
    batch = await shared_hop(store.fetch)(session_id, query.after, query.limit, "mailbox")
    return respond(_batch_body(batch))


@require_POST
@endpoint
async def ack(request: HttpRequest) -> HttpResponse:
    """Called to acknowledge every message up to a seq."""
    session_id = _session(request)
    body = decode_ack(request.body)
    await shared_hop(store.ack)(session_id, body.seq)
    return respond(None, status=204)

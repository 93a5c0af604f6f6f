"""The router: from a client's action to its reply, through the worker step.

1. Look the action up in the registry (unknown names answer at once).
2. Claim the action id, so a retry never runs the handler twice.
3. Hand the job, with the trace context, to the worker pipeline.
4. Wait up to TRANSPORT_ACTION_TIMEOUT. A later reply is not lost: it is
   stored for retries and delivered to the mailbox as a `reply` message.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from opentelemetry import propagate, trace

from mailbox.api import adeliver
from mailbox.errors import MailboxNotFound
from mailbox.loops import shared_hop
from mailbox.store import get_live
from transport import idempotency, registry, signals, spans
from transport.errors import Unavailable
from transport.frames import Action, ActionBody
from transport.idempotency import Claim
from transport.worker import Job, Pipeline, Reply, default_pipeline, error_reply

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("transport.router")


@dataclass(frozen=True)
class Pending:
    """No reply within the action timeout; it will come as a `reply` message."""

    id: Any


class Router:
    """Send each client action to the worker pipeline and return its reply."""

    def __init__(self, pipeline: Pipeline | None = None) -> None:
        self.pipeline = pipeline or default_pipeline()
        self._late: set[asyncio.Task[None]] = set()

    async def handle_action(
        self,
        session_id: str,
        frame: Action | ActionBody,
        transport: str,
        on_timeout: Callable[[], None] | None = None,
        check_live: bool = False,
    ) -> Reply | Pending:
        """Answer one action of a session, arriving on `transport`.

        Without `on_timeout`, a job that outlives the action timeout is left
        running and Pending is returned at once. With it, the caller hears
        of the timeout from the callback, and this returns when the job is
        done: Pending if the reply went to the mailbox. With `check_live`,
        raise MailboxNotFound unless the session is live (a caller that
        holds no lease on it, like a REST request).
        """
        started = time.perf_counter()
        known = registry.get(frame.action) is not None
        name = frame.action if known else "unknown"
        signals.action_received.send_robust(
            sender=Router,
            session_id=session_id,
            transport=transport,
            action=name,
            payload=frame.payload,
        )

        parent = (
            propagate.extract({"traceparent": frame.traceparent}) if frame.traceparent else None
        )
        with spans.child(tracer, "Transport.Router.handle_action/3", parent) as span:
            span.set_attribute("transport.session_id", session_id)
            span.set_attribute("transport.action", name)
            span.set_attribute("transport.transport", transport)
            if known:
                result = await self._dispatch(
                    session_id, frame, transport, started, on_timeout, check_live
                )
            else:
                if check_live:
                    await shared_hop(get_live)(session_id)
                result = error_reply(frame.id, "unknown_action", f"no action {frame.action!r}")

        if isinstance(result, dict):
            self._answered(session_id, transport, name, result, started)
        return result

    async def _dispatch(
        self,
        session_id: str,
        frame: Action | ActionBody,
        transport: str,
        started: float,
        on_timeout: Callable[[], None] | None,
        check_live: bool,
    ) -> Reply | Pending:
        key = str(frame.id)
        timeout = settings.TRANSPORT_ACTION_TIMEOUT
        claimed = await idempotency.aclaim(session_id, key, frame.action, live=check_live)
        if claimed.state is Claim.NO_SESSION:
            raise MailboxNotFound(session_id)
        # `5` and `"5"` share a key; a repeated reply carries the id as the
        # retry spelled it, so a client matching replies by id finds it.
        if claimed.state is Claim.DONE:
            assert claimed.reply is not None
            return {**claimed.reply, "id": frame.id}
        if claimed.state is Claim.RUNNING:
            reply = await idempotency.wait_for_reply(session_id, key, timeout)
            return {**reply, "id": frame.id} if reply is not None else Pending(frame.id)

        job: Job = {
            "session_id": session_id,
            "key": key,
            "id": frame.id,
            "action": frame.action,
            "payload": frame.payload,
            "transport": transport,
        }
        if on_timeout is not None:
            return await self._run_in_caller(
                session_id, frame, transport, job, started, on_timeout
            )

        task = asyncio.ensure_future(self.pipeline.submit(job))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            late = asyncio.ensure_future(
                self._deliver_late(session_id, transport, frame, task, started)
            )
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return Pending(frame.id)
        except Exception as exc:
            raise await self._refused(session_id, key) from exc

    async def _run_in_caller(
        self,
        session_id: str,
        frame: Action | ActionBody,
        transport: str,
        job: Job,
        started: float,
        on_timeout: Callable[[], None],
    ) -> Reply | Pending:
        """Run a job in the caller's own task, telling it when the timeout passes.

        A caller that has a task per action anyway (a WebSocket) saves the
        second task, the shield and the timeout wrapper of the other way:
        about 17 us an action. The job keeps its caller's slot until done.
        """
        late = False

        def expire() -> None:
            nonlocal late
            late = True
            on_timeout()

        timer = asyncio.get_running_loop().call_later(settings.TRANSPORT_ACTION_TIMEOUT, expire)
        try:
            reply = await self.pipeline.submit(job)
        except Exception as exc:
            timer.cancel()
            if not late:
                raise await self._refused(session_id, job["key"]) from exc
            reply = _late_failure(session_id, frame)
        timer.cancel()
        if not late:
            return reply

        await self._reply_late(session_id, transport, frame, reply, started)
        return Pending(frame.id)

    async def _refused(self, session_id: str, key: str) -> Unavailable:
        """Free the id of a job the pipeline refused; return the error to raise.

        The channel layer is down, so no worker runs it: the client's retry may.
        """
        logger.warning("action not dispatched", extra={"session_id": session_id})
        await idempotency.arelease(session_id, key)
        return Unavailable("the worker pipeline is unavailable")

    async def _deliver_late(
        self,
        session_id: str,
        transport: str,
        frame: Action | ActionBody,
        task: "asyncio.Future[Reply]",
        started: float,
    ) -> None:
        """Wait for a job that missed the action timeout, and deliver its reply."""
        try:
            reply = await task
        except Exception:
            reply = _late_failure(session_id, frame)
        await self._reply_late(session_id, transport, frame, reply, started)

    async def _reply_late(
        self,
        session_id: str,
        transport: str,
        frame: Action | ActionBody,
        reply: Reply,
        started: float,
    ) -> None:
        """Deliver a reply that missed the action timeout as a `reply` message."""
        await adeliver(session_id, "reply", reply, source="router")
        self._answered(session_id, transport, frame.action, reply, started)

    def _answered(
        self, session_id: str, transport: str, action: str, reply: Reply, started: float
    ) -> None:
        signals.action_answered.send_robust(
            sender=Router,
            session_id=session_id,
            transport=transport,
            action=action,
            ok=bool(reply.get("ok")),
            duration_ms=(time.perf_counter() - started) * 1000,
        )


def _late_failure(session_id: str, frame: Action | ActionBody) -> Reply:
    """Log the failure of a job past its timeout (from its except block); return its reply."""
    logger.exception("late action failed", extra={"session_id": session_id})
    return error_reply(frame.id, "worker_error", "the worker did not answer")


_router: Router | None = None


def get_router() -> Router:
    global _router
    if _router is None:
        _router = Router()
    return _router

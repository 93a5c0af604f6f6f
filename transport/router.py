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
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from opentelemetry import propagate, trace

from mailbox.api import adeliver
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
        self, session_id: str, frame: Action | ActionBody, transport: str
    ) -> Reply | Pending:
        """Answer one action of a session, arriving on `transport`."""
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
                result = await self._dispatch(session_id, frame, transport, started)
            else:
                result = error_reply(frame.id, "unknown_action", f"no action {frame.action!r}")

        if isinstance(result, dict):
            self._answered(session_id, transport, name, result, started)
        return result

    async def _dispatch(
        self, session_id: str, frame: Action | ActionBody, transport: str, started: float
    ) -> Reply | Pending:
        key = str(frame.id)
        timeout = settings.TRANSPORT_ACTION_TIMEOUT
        claimed = await idempotency.aclaim(session_id, key, frame.action)
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
        task = asyncio.ensure_future(self.pipeline.submit(job))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            late = asyncio.ensure_future(self._deliver_late(session_id, transport, frame, task))
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return Pending(frame.id)
        except Exception as exc:
            # The pipeline refused the job (the channel layer is down), so
            # no worker runs it: free the id for the client's retry.
            logger.warning("action not dispatched", extra={"session_id": session_id})
            await idempotency.arelease(session_id, key)
            raise Unavailable("the worker pipeline is unavailable") from exc

    async def _deliver_late(
        self,
        session_id: str,
        transport: str,
        frame: Action | ActionBody,
        task: "asyncio.Future[Reply]",
    ) -> None:
        """Deliver a reply that missed the action timeout as a `reply` message."""
        started = time.perf_counter() - settings.TRANSPORT_ACTION_TIMEOUT
        try:
            reply = await task
        except Exception:
            logger.exception("late action failed", extra={"session_id": session_id})
            reply = error_reply(frame.id, "worker_error", "the worker did not answer")
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


_router: Router | None = None


def get_router() -> Router:
    global _router
    if _router is None:
        _router = Router()
    return _router

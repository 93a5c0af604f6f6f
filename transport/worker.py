"""The worker step: run an action's handler and store its reply.

The router hands each action to a pipeline as a job (a dict that crosses
process boundaries unchanged). The in-process pipeline runs the job in the
server's event loop; with a shared channel layer, `manage.py runworker
transport-worker` processes run it and send the reply back.
"""

import asyncio
import inspect
import logging
import uuid
from typing import Any, Protocol

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from opentelemetry import propagate, trace

from mailbox.api import source_context
from transport import idempotency, registry, spans
from transport.frames import encode
from transport.registry import ActionContext, ActionError

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("transport.worker")

Job = dict[str, Any]
Reply = dict[str, Any]


def ok_reply(action_id: Any, payload: dict[str, Any]) -> Reply:
    return {"type": "reply", "id": action_id, "ok": True, "payload": payload}


def error_reply(action_id: Any, code: str, message: str) -> Reply:
    return {
        "type": "reply",
        "id": action_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }


async def _call(handler: registry.Handler, ctx: ActionContext, payload: Any) -> Any:
    if inspect.iscoroutinefunction(handler):
        return await handler(ctx, payload)
    return await database_sync_to_async(handler)(ctx, payload)


async def run_job(job: Job) -> Reply:
    """Run a job's handler, store the reply for retries, and return it."""
    # A job run in this process is already in its router's context; one from
    # another process brings the context along.
    parent = propagate.extract(job["trace"]) if job.get("trace") else None
    with spans.child(tracer, "Transport.Worker.run_job/1", parent) as span:
        span.set_attribute("transport.action", job["action"])
        span.set_attribute("transport.session_id", job["session_id"])
        reply = await _run(job)

    idempotency.complete_later(job["session_id"], job["key"], reply)
    return reply


async def _run(job: Job) -> Reply:
    handler = registry.get(job["action"])
    if handler is None:
        return error_reply(job["id"], "unknown_action", f"no action {job['action']!r}")
    ctx = ActionContext(job["session_id"], job["key"], job["transport"])
    token = source_context.set("router")
    try:
        result = await _call(handler, ctx, job["payload"])
        if not isinstance(result, dict):
            raise TypeError(f"handler returned {type(result).__name__}, not a dict")
        encode(result)
        return ok_reply(job["id"], result)
    except ActionError as exc:
        return error_reply(job["id"], exc.code, exc.message)
    except Exception:
        logger.exception(
            "action handler failed",
            extra={"session_id": job["session_id"], "action": job["action"]},
        )
        return error_reply(job["id"], "handler_error", f"action {job['action']!r} failed")
    finally:
        source_context.reset(token)


class Pipeline(Protocol):
    async def submit(self, job: Job) -> Reply: ...


class InProcessPipeline:
    """Run jobs in the server process: the embedded default."""

    async def submit(self, job: Job) -> Reply:
        return await run_job(job)


WORKER_CHANNEL = "transport-worker"


class LayerPipeline:
    """Send jobs over the channel layer to `runworker` processes.

    Each server process listens on one reply channel of its own and matches
    replies to waiting actions by job id, so a reply costs no extra channel
    or group per action.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._channel: str | None = None
        self._listener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def submit(self, job: Job) -> Reply:
        layer = get_channel_layer()
        if layer is None:
            raise ImproperlyConfigured("TRANSPORT_WORKERS=layer needs CHANNEL_LAYERS")
        reply_to = await self._reply_channel()
        job_id = uuid.uuid4().hex
        job = {**job, "trace": {}}
        propagate.inject(job["trace"])
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        try:
            await layer.send(
                WORKER_CHANNEL,
                {"type": "transport.job", "job": job, "job_id": job_id, "reply_to": reply_to},
            )
            # A worker that dies mid-job never answers; the router's timeout
            # answers the client, and this bound frees the entry.
            return await asyncio.wait_for(future, LATE_REPLY_LIMIT * _action_timeout())
        finally:
            self._waiting.pop(job_id, None)

    async def _reply_channel(self) -> str:
        async with self._lock:
            if self._listener is None or self._listener.done():
                layer = get_channel_layer()
                assert layer is not None
                self._channel = await layer.new_channel()
                self._listener = asyncio.ensure_future(self._listen(self._channel))
            assert self._channel is not None
            return self._channel

    async def _listen(self, channel: str) -> None:
        layer = get_channel_layer()
        assert layer is not None
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis is away: waiting actions time out on their own; keep
                # this channel, replies sent to it after the outage still count.
                logger.warning("reply listener failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            future = self._waiting.get(str(message.get("job_id")))
            if future is not None and not future.done():
                future.set_result(message["reply"])


# A late reply is awaited this many action timeouts before it is given up;
# the reply is stored for retries in any case.
LATE_REPLY_LIMIT = 3


def _action_timeout() -> float:
    return float(settings.TRANSPORT_ACTION_TIMEOUT)


class WorkerConsumer(AsyncConsumer):
    """Run jobs arriving on the `transport-worker` channel (`manage.py runworker`)."""

    semaphore: asyncio.Semaphore | None = None

    async def transport_job(self, message: dict[str, Any]) -> None:
        """Called for each job: run it concurrently, up to the configured limit."""
        if WorkerConsumer.semaphore is None:
            WorkerConsumer.semaphore = asyncio.Semaphore(settings.TRANSPORT_WORKER_CONCURRENCY)
        # Take the slot before returning, so a flood waits on the channel
        # layer instead of piling up as tasks in this process.
        await WorkerConsumer.semaphore.acquire()
        task = asyncio.ensure_future(self._run(message))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def _run(self, message: dict[str, Any]) -> None:
        try:
            reply = await run_job(message["job"])
            layer = get_channel_layer()
            assert layer is not None
            await layer.send(
                message["reply_to"],
                {"type": "transport.reply", "job_id": message["job_id"], "reply": reply},
            )
        except Exception:
            logger.exception("job failed", extra={"session_id": message["job"].get("session_id")})
        finally:
            assert WorkerConsumer.semaphore is not None
            WorkerConsumer.semaphore.release()


_running: set[asyncio.Task[None]] = set()


def default_pipeline() -> Pipeline:
    """Return the pipeline TRANSPORT_WORKERS names."""
    if settings.TRANSPORT_WORKERS == "layer":
        return LayerPipeline()
    if settings.TRANSPORT_WORKERS == "inprocess":
        return InProcessPipeline()
    raise ImproperlyConfigured(
        f"TRANSPORT_WORKERS={settings.TRANSPORT_WORKERS!r}: use 'inprocess' or 'layer'"
    )

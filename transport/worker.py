"""The worker step: run an action's handler and store its reply.

The router hands each action to a pipeline as a job (a dict that crosses
process boundaries unchanged). The in-process pipeline runs the job in the
server's event loop; with a shared channel layer, `manage.py runworker
transport-worker` processes run it and send the reply back.
"""

import inspect
import logging
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from opentelemetry import propagate, trace

from mailbox.api import source_context
from transport import idempotency, registry
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
    return await sync_to_async(handler)(ctx, payload)


async def run_job(job: Job) -> Reply:
    """Run a job's handler, store the reply for retries, and return it."""
    parent = propagate.extract(job.get("trace") or {})
    with tracer.start_as_current_span("Transport.Worker.run_job/1", context=parent) as span:
        span.set_attribute("transport.action", job["action"])
        span.set_attribute("transport.session_id", job["session_id"])
        reply = await _run(job)

    await idempotency.acomplete(job["session_id"], job["key"], reply)
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

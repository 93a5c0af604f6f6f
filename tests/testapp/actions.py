"""Actions the multi-process tests send: deliver elsewhere, or stall a worker."""

import os
import time

from mailbox.api import deliver
from transport.registry import ActionContext, Payload, action


@action("test.deliver")
def deliver_to(ctx: ActionContext, payload: Payload) -> Payload:
    """Deliver `message_type`/`payload` to session `to`; answer the seq and our pid."""
    seq = deliver(payload["to"], payload["message_type"], payload.get("payload", {}))
    return {"seq": seq, "pid": os.getpid()}


@action("test.work")
def work(ctx: ActionContext, payload: Payload) -> Payload:
    """Tell the asking session it started, then take TEST_ACTION_DELAY seconds.

    A worker started with a long delay is one that hangs mid-action, ready
    to be killed; one started without answers at once.
    """
    deliver(ctx.session_id, "test.started", {"pid": os.getpid()})
    time.sleep(float(os.environ.get("TEST_ACTION_DELAY", "0")))
    return {"pid": os.getpid()}

"""Actions for the benchmark, loaded only with TRANSPORT_EXTRA_APPS=bench.

They let any client make the server deliver to any session it names, so no
deployment loads them. Deliveries stamp `t` with time.monotonic() just
before deliver(): CLOCK_MONOTONIC is one clock for every process of the
machine, so the client's receipt time minus `t` is enqueue → receipt.
"""

import threading
import time

from django.db import connection

from mailbox.api import adeliver, deliver
from transport.parking import parked_polls
from transport.registry import ActionContext, ActionError, Payload, action

# A burst longer than this is a mistake in the benchmark, not a measurement.
MAX_BURST = 1_000_000


@action("bench.deliver_burst")
def deliver_burst(ctx: ActionContext, payload: Payload) -> Payload:
    """Start delivering `count` messages round-robin to `sessions`, `rate` a second.

    The deliveries run on a thread of this server process, as a view or a
    signal handler of the site would call deliver(): the wake-up is direct,
    not the cross-process database watch. The reply comes at once; `rate`
    0 delivers as fast as the database takes them.
    """
    sessions = payload.get("sessions")
    count, rate = payload.get("count"), payload.get("rate", 0)
    if not isinstance(sessions, list) or not sessions:
        raise ActionError("bad_request", "payload needs `sessions`, a list of session ids")
    if not isinstance(count, int) or not 0 < count <= MAX_BURST:
        raise ActionError("bad_request", f"`count` must be 1 to {MAX_BURST}")
    if not isinstance(rate, int | float) or rate < 0:
        raise ActionError("bad_request", "`rate` must be a number of messages a second, >= 0")

    burst = threading.Thread(
        target=_burst, args=(list(map(str, sessions)), count, float(rate)), daemon=True
    )
    burst.start()
    return {"started": count}


def _burst(sessions: list[str], count: int, rate: float) -> None:
    """Deliver on a fixed schedule; when behind it, catch up without sleeping."""
    started = time.monotonic()
    try:
        for i in range(count):
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            deliver(sessions[i % len(sessions)], "bench.burst", {"i": i, "t": time.monotonic()})
    finally:
        connection.close()


@action("bench.push")
async def push(ctx: ActionContext, payload: Payload) -> Payload:
    """Deliver the payload to the asking session itself, stamped with `t`."""
    seq = await adeliver(ctx.session_id, "bench.push", {**payload, "t": time.monotonic()})
    return {"seq": seq}


@action("bench.parked")
async def parked(ctx: ActionContext, payload: Payload) -> Payload:
    """Answer how many long-polls are parked in this process."""
    return {"parked": len(parked_polls)}

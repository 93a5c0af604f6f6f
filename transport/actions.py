"""Built-in actions."""

from django.conf import settings

from mailbox.api import adeliver
from mailbox.errors import MailboxNotFound
from transport.registry import ActionContext, ActionError, Payload, action

# Longest text of one demo message; the demo is a toy, not a chat service.
DEMO_TEXT_MAX = 500


@action("echo")
async def echo(ctx: ActionContext, payload: Payload) -> Payload:
    """Answer with the payload it was sent: the protocol's smoke test."""
    return payload


@action("demo.send")
async def demo_send(ctx: ActionContext, payload: Payload) -> Payload:
    """Deliver a `demo.message` with `text` to the session `to`, for the demo page.

    Anyone holding a session id can message it, which is the demo's point
    and why TRANSPORT_DEMO turns it off.
    """
    if not settings.TRANSPORT_DEMO:
        raise ActionError("demo_disabled", "the demo is turned off (TRANSPORT_DEMO)")
    to, text = payload.get("to"), payload.get("text")
    if not isinstance(to, str) or not to:
        raise ActionError("bad_request", "payload needs `to`, a session id")
    if not isinstance(text, str) or not 0 < len(text) <= DEMO_TEXT_MAX:
        raise ActionError("bad_request", f"`text` must be 1 to {DEMO_TEXT_MAX} characters")

    message = {"from": ctx.session_id, "text": text}
    try:
        seq = await adeliver(to, "demo.message", message)
    except MailboxNotFound:
        raise ActionError("no_such_session", f"no live session {to!r}") from None
    return {"to": to, "seq": seq}

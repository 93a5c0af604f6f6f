"""Built-in actions."""

from transport.registry import ActionContext, Payload, action


@action("echo")
async def echo(ctx: ActionContext, payload: Payload) -> Payload:
    """Answer with the payload it was sent: the protocol's smoke test."""
    return payload

"""The action registry: plain functions registered by name.

A site registers its handlers in an `actions.py` module of any installed
app; every such module is imported at startup:

    from transport.registry import ActionContext, action

    @action("cart.add")
    def add_to_cart(ctx: ActionContext, payload: dict) -> dict:
        ...
        return {"items": 3}

A handler returns the reply payload (a JSON object). It may be sync (run in
a thread, free to use the ORM) or async, and may deliver messages to any
session with mailbox.api.deliver(). Raise ActionError to answer the client
with an error of your own code.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.utils.module_loading import autodiscover_modules


@dataclass(frozen=True)
class ActionContext:
    """Who asked for an action, and over which transport."""

    session_id: str
    action_id: str
    transport: str


Payload = dict[str, Any]
Handler = Callable[[ActionContext, Payload], Payload | Awaitable[Payload]]


class ActionError(Exception):
    """Raised by a handler to answer `{"ok": false, "error": {code, message}}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DuplicateAction(ValueError):
    """Two handlers were registered under one name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"action {name!r} is already registered")
        self.name = name


_handlers: dict[str, Handler] = {}


def register(name: str, handler: Handler) -> None:
    """Register `handler` under `name`."""
    existing = _handlers.get(name)
    if existing is not None and existing is not handler:
        raise DuplicateAction(name)
    _handlers[name] = handler


def action(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of action `name`."""

    def decorate(handler: Handler) -> Handler:
        register(name, handler)
        return handler

    return decorate


def get(name: str) -> Handler | None:
    return _handlers.get(name)


def names() -> list[str]:
    return sorted(_handlers)


def autodiscover() -> None:
    autodiscover_modules("actions")
